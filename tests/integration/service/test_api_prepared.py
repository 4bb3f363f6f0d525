"""A submission and a poll of one build run as server-side prepared statements (api/prepared.py), on every new
connection too."""
from __future__ import annotations

from collections.abc import Iterator

import psycopg2
import pytest
from sqlalchemy import event

from common.db import engine_for

from .helpers import body

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
    resp = client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=tenant.headers("WRITER"))
    assert resp.status_code == 202, resp.json
    return resp.json["build_id"]


def test_prepared_statements_serve_submissions_and_polls(client, tenant, service_settings, sent):
    app_id = tenant.create_app()
    tenant.headers("READER")
    sent.clear()
    build_id = _submit(client, tenant, app_id)
    # The caller's role, the app under the account lock, the insert: all three prepared.
    assert len(sent) == 3 and all(s.startswith("EXECUTE nitroconv_") for s in sent), sent
    sent.clear()
    got = client.get(f"/v1/builds/{build_id}", headers=tenant.headers("READER"))
    assert got.status_code == 200 and got.json["build_id"] == build_id
    assert sent[-1].startswith("EXECUTE nitroconv_"), sent

    # New connections (a restart of Postgres, a recycle) know no prepared statement: they are prepared again.
    engine_for(service_settings.database_url).dispose()
    sent.clear()
    again = _submit(client, tenant, app_id)
    assert again != build_id and sum(s.startswith("EXECUTE nitroconv_") for s in sent) == 3
    with psycopg2.connect(service_settings.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM builds WHERE id IN (%s, %s)", (build_id, again))
        assert cur.fetchone()[0] == 2
