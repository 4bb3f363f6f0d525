"""Server-side prepared statements for the statements the API runs most (a submission's, a poll of one build).

psycopg2 sends each statement's full text, which Postgres parses and plans again every time (a large part of
the backend's work for these short statements; bench/README.md). A `before_cursor_execute` hook swaps a registered statement for
`EXECUTE` of a copy prepared once per DBAPI connection; the statements, their parameters and their results are
unchanged, and anything not registered runs as before.
"""
from __future__ import annotations

import functools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Engine, event
from sqlalchemy.sql import Executable

_PARAM = re.compile(r"%\((\w+)\)s")
# The engine's registered statements, and per DBAPI connection (its pool record's info, which is cleared when the
# connection is replaced) the names already prepared there.
_PREPARED_KEY = "nitroconv.prepared"


@dataclass(frozen=True)
class PreparedForm:
    name: str
    prepare: str  # PREPARE name AS <the statement with $n placeholders>
    execute: str  # EXECUTE name(%(param)s, ...) in the driver's pyformat

    @classmethod
    def of(cls, name: str, sql: str) -> PreparedForm:
        """The prepared form of `sql` (psycopg2 pyformat): each distinct parameter becomes one $n."""
        names: list[str] = []

        def number(match: re.Match[str]) -> str:
            if match.group(1) not in names:
                names.append(match.group(1))
            return f"${names.index(match.group(1)) + 1}"

        body = _PARAM.sub(number, sql).replace("%%", "%")  # PREPARE is sent without parameters: no escapes
        args = ", ".join(f"%({n})s" for n in names)
        return cls(name, f"PREPARE {name} AS {body}", f"EXECUTE {name}({args})" if names else f"EXECUTE {name}")


def compiled_sql(engine: Engine, statement: Executable) -> str:
    """The SQL text SQLAlchemy hands the driver for `statement` on `engine`."""
    return str(statement.compile(dialect=engine.dialect))  # type: ignore[attr-defined]


def install(engine: Engine, statements: Iterable[Executable]) -> None:
    """Run `statements` as prepared statements on `engine`'s connections (idempotent per engine)."""
    forms: dict[str, PreparedForm] | None = engine.__dict__.get(_PREPARED_KEY)
    if forms is None:
        forms = engine.__dict__[_PREPARED_KEY] = {}
        event.listen(engine, "before_cursor_execute", functools.partial(_swap, forms), retval=True)
    for statement in statements:
        sql = compiled_sql(engine, statement)
        forms.setdefault(sql, PreparedForm.of(f"nitroconv_{len(forms)}", sql))


def _swap(forms: Mapping[str, PreparedForm], conn: Any, cursor: Any, statement: str, parameters: Any,
          context: Any, executemany: bool) -> tuple[str, Any]:
    form = forms.get(statement)
    if form is None or executemany or not isinstance(parameters, Mapping):
        return statement, parameters
    return execute_form(form, conn.connection.info, cursor), parameters


def execute_form(form: PreparedForm, info: dict[Any, Any], cursor: Any) -> str:
    """`form`'s EXECUTE text, after PREPAREing it on `cursor`'s connection if its pool record (`info`) has not."""
    done: set[str] = info.setdefault(_PREPARED_KEY, set())
    if form.name not in done:
        cursor.execute(form.prepare)
        done.add(form.name)
    return form.execute
