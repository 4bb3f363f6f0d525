"""A submission in one statement: `nitroconv_submit_build` (migrations 0006, 0007, 0011 and 0012) holds every rule.

The caller's session and role, the app under the account's lock, the quota, the Idempotency-Key and the insert are
one statement. It normally runs in autocommit, so the submission is one round trip and one transaction. The
statement goes straight to the driver as a prepared statement (api/prepared.py), not through SQLAlchemy's
execution of nineteen parameters.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypeVar

import psycopg2
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from api.prepared import PreparedForm, execute_form
from common.store.accounts import RANK, Role

_PARAMS = ("session_id", "user_id", "account_id", "roles", "app_id", "app_settings", "quota", "id", "idempotency_key",
           "request_fingerprint", "input_image_name", "output_image_name", "input_username", "output_username",
           "input_credentials", "output_credentials", "converter_options", "cpu_count", "mem_size",
           "enable_overlay_filesystem_persistence")
SUBMIT_SQL = (
    "SELECT outcome, member_role, app_name, app_description, app_settings, unfinished, stamped_created_at, "
    "stamped_updated_at, stamped_approval_updated_at, session_user_id, session_account_id, app_group_id, waits_for "
    "FROM nitroconv_submit_build("
    + ", ".join(f"%({name})s" for name in _PARAMS) + ")")
SUBMIT_FORM = PreparedForm.of("nitroconv_submit", SUBMIT_SQL)
# The app's settings as the function compares them (the same cast), held still until the transaction ends: an
# update of the app waits for this lock.
_PIN_SETTINGS_SQL = ("SELECT default_build_settings::text FROM apps "
                     "WHERE id = %(app_id)s AND account_id = %(account_id)s FOR SHARE")


@dataclass(frozen=True)
class Outcome:
    """What the function answered; see migrations 0006, 0007, 0011 and 0012 for the meaning of each `outcome`."""

    outcome: str
    role: str | None
    app_name: str | None
    app_description: str | None
    app_settings: str | None  # the app's default_build_settings as jsonb text
    unfinished: int | None
    created_at: datetime | None
    updated_at: datetime | None
    approval_updated_at: datetime | None
    session_user_id: uuid.UUID | str | None  # with `moved`: the session's user and account now
    session_account_id: uuid.UUID | str | None
    app_group_id: uuid.UUID | str | None = None  # the app's group: its Build's `group_id`
    # With `created`: the identical queued build this one waits for (it is then not published).
    waits_for: uuid.UUID | str | None = None


def roles_at_least(role: Role) -> list[str]:
    return [r.value for r in Role if RANK[r] >= RANK[role]]


def _driver_value(value: object) -> object:
    # Text for the driver: the function's signature gives each parameter its type.
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def _params(values: Mapping[str, object], *, user_id: uuid.UUID, account_id: uuid.UUID, roles: list[str],
            app_settings: str | None, quota: int | None, session_id: uuid.UUID | None) -> dict[str, object]:
    params = {name: _driver_value(values[name]) for name in _PARAMS if name in values}
    params.update(session_id=str(session_id) if session_id else None, user_id=str(user_id),
                  account_id=str(account_id), roles=roles, app_settings=app_settings, quota=quota)
    return params


_T = TypeVar("_T")


def _on_driver(engine: Engine, autocommit: bool, work: Callable[[Any, Any, dict[Any, Any]], _T]) -> _T:
    """`work(dbapi connection, cursor, pool record info)` on a pooled connection. A database error is raised as
    SQLAlchemy's DBAPIError (the API's 503 or 500), a lost connection invalidated as SQLAlchemy would."""
    raw = engine.raw_connection()
    dbapi = raw.dbapi_connection
    assert dbapi is not None
    try:
        dbapi.autocommit = autocommit
        try:
            cursor = dbapi.cursor()
            try:
                return work(dbapi, cursor, raw.info)
            finally:
                cursor.close()
        finally:
            if not dbapi.closed:
                if not autocommit and dbapi.status != psycopg2.extensions.STATUS_READY:
                    dbapi.rollback()
                dbapi.autocommit = False
    except psycopg2.Error as exc:
        lost = engine.dialect.is_disconnect(exc, dbapi, None)
        if lost:
            # What SQLAlchemy does on a lost connection: this one is dropped, and the pool's older ones are
            # replaced at their next checkout (they most likely died with it).
            engine.pool._invalidate(raw, exc)
        raise DBAPIError.instance(SUBMIT_SQL, None, exc, psycopg2.Error, connection_invalidated=lost) from exc
    finally:
        raw.close()


def _run(cursor: Any, info: dict[Any, Any], params: Mapping[str, object]) -> Outcome:
    cursor.execute(execute_form(SUBMIT_FORM, info, cursor), params)
    row = cursor.fetchone()
    assert row is not None  # the function always answers one row
    return Outcome(*row)


def submit_build(engine: Engine, values: Mapping[str, object], *, user_id: uuid.UUID, account_id: uuid.UUID,
                 roles: list[str], app_settings: str | None, quota: int | None,
                 session_id: uuid.UUID | None = None) -> Outcome:
    """Run the submission's statement in autocommit; `values` are the build's columns as buildstore.build_row
    gives them.

    `app_settings`: the app's default_build_settings (jsonb text) the values were merged with; None when not known
    yet (the answer is then `stale`, with the current ones). `session_id`: the caller's session, which must be
    live and still be `user_id`'s in `account_id` (else `session` or `moved`); None skips the check.
    """
    params = _params(values, user_id=user_id, account_id=account_id, roles=roles, app_settings=app_settings,
                     quota=quota, session_id=session_id)
    return _on_driver(engine, True, lambda _dbapi, cursor, info: _run(cursor, info, params))


def submit_build_pinned(engine: Engine, values_for: Callable[[str | None], Mapping[str, object]], *,
                        app_id: uuid.UUID, user_id: uuid.UUID, account_id: uuid.UUID, roles: list[str],
                        quota: int | None, session_id: uuid.UUID | None = None
                        ) -> tuple[Outcome, Mapping[str, object]]:
    """The same statement, for an app whose settings keep changing: in one transaction, the app's settings are read
    under a share lock on its row, `values_for(settings)` merges them, and the statement then runs with settings
    that cannot have changed, so it never answers `stale`. Returns the answer and the values sent.

    An app not in `account_id` gives `values_for(None)`, and the statement answers as it does for any caller
    (`session`, `moved`, `role` or `no_app`).
    """

    def work(dbapi: Any, cursor: Any, info: dict[Any, Any]) -> tuple[Outcome, Mapping[str, object]]:
        cursor.execute(_PIN_SETTINGS_SQL, {"app_id": str(app_id), "account_id": str(account_id)})
        found = cursor.fetchone()
        settings = found[0] if found is not None else None
        values = values_for(settings)
        got = _run(cursor, info, _params(values, user_id=user_id, account_id=account_id, roles=roles,
                                         app_settings=settings, quota=quota, session_id=session_id))
        dbapi.commit()
        return got, values

    return _on_driver(engine, False, work)
