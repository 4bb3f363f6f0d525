"""A submission and a poll of one build run as server-side prepared statements (api/prepared.py), on every new
connection too."""
from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest
from sqlalchemy import event

from common.store.engine import engine_for

from .helpers import body, submit

pytestmark = pytest.mark.integration


@pytest.fixture
def sent(service_settings) -> Iterator[list[str]]:  # noqa: ANN001
    """The SQL text each cursor execution of the API's engine sent, in order."""
    engine = engine_for(service_settings.database_url)
    statements: list[str] = []

    def record(conn, cursor, statement, parameters, context, executemany) -> None:  # noqa: ANN001
        statements.append(statement)

    event.listen(engine, "after_cursor_execute", record)
    try:
        yield statements
    finally:
        event.remove(engine, "after_cursor_execute", record)


def _submit(client, tenant, app_id: str) -> str:  # noqa: ANN001
    return submit(client, tenant.headers("WRITER"), body(app_id))


def _prepared_here(engine) -> list[str]:  # noqa: ANN001
    """The names of the statements prepared on the connection the engine's pool hands out next."""
    with engine.connect() as conn:
        assert conn.connection.dbapi_connection.autocommit is False  # a submission leaves none in autocommit
        return sorted(conn.exec_driver_sql("SELECT name FROM pg_prepared_statements").scalars())


def test_prepared_statements_serve_submissions_and_polls(client, tenant, service_settings, sent):
    engine = engine_for(service_settings.database_url)
    app_id = tenant.create_app()
    tenant.headers("READER")
    _submit(client, tenant, app_id)  # the first of an app's submissions in a process learns its default settings
    sent.clear()
    build_id = _submit(client, tenant, app_id)
    # The caller's role, the app under the account lock, the quota and the insert: one prepared statement, sent
    # straight to the driver (nothing through SQLAlchemy).
    assert sent == [], sent
    sent.clear()
    got = client.get(f"/v1/builds/{build_id}", headers=tenant.headers("READER"))
    assert got.status_code == 200 and got.json["build_id"] == build_id
    # The caller's session with its role (one indexed query), then the build: both prepared.
    assert len(sent) == 2 and all(s.startswith("EXECUTE nitroconv_") for s in sent), sent

    # New connections (a restart of Postgres, a recycle) know no prepared statement: they are prepared again, once.
    engine.dispose()
    again = _submit(client, tenant, app_id)
    assert _prepared_here(engine) == ["nitroconv_submit"]
    third = _submit(client, tenant, app_id)
    assert _prepared_here(engine) == ["nitroconv_submit"]
    with psycopg2.connect(service_settings.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM builds WHERE id IN (%s, %s, %s)", (build_id, again, third))
        assert cur.fetchone()[0] == 3
