"""Postgres or Redis going away: 503 envelopes, never a stack trace, and recovery without a restart."""
from __future__ import annotations

from dataclasses import replace

import pytest
from sqlalchemy.engine import make_url

from api.app import create_app
from api.schemas.builds import BuildListSchema, BuildSchema
from api.schemas.sys import HealthSchema

from .helpers import body, err, ok
from .tcpproxy import CuttableProxy

pytestmark = pytest.mark.integration


@pytest.fixture
def pg_proxy(service_settings):  # noqa: ANN001, ANN201
    url = make_url(service_settings.database_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy, url.set(port=proxy.port).render_as_string(hide_password=False)
    proxy.close()


@pytest.fixture
def redis_proxy(service_settings):  # noqa: ANN001, ANN201
    proxy = CuttableProxy("127.0.0.1", 6379)
    db = service_settings.redis_url.rsplit("/", 1)[1]
    yield proxy, f"redis://127.0.0.1:{proxy.port}/{db}"
    proxy.close()


def test_outage_postgres_down_is_503_and_the_api_recovers(service_settings, pg_proxy, tenant):
    proxy, url = pg_proxy
    client = create_app(replace(service_settings, database_url=url)).test_client()
    headers = tenant.headers("READER")  # token issued by the direct app; same secret
    ok(client.get("/healthz"), HealthSchema)
    ok(client.get("/v1/builds", headers=headers), BuildListSchema)
    proxy.cut()
    e = err(client.get("/v1/builds", headers=headers), 503, "database_unavailable")
    assert "Traceback" not in e["message"]
    err(client.get("/healthz"), 503, "database_unavailable")
    proxy.restore()
    ok(client.get("/healthz"), HealthSchema)
    ok(client.get("/v1/builds", headers=headers), BuildListSchema)


def test_outage_postgres_cut_under_a_submission_is_503_and_the_next_one_lands(service_settings, pg_proxy, tenant):
    """The submission's one round trip runs on a raw pooled connection (api/submission.py): a connection that
    died with Postgres is a 503, and is replaced, so the next submission after Postgres is back succeeds."""
    proxy, url = pg_proxy
    client = create_app(replace(service_settings, database_url=url)).test_client()
    app_id, headers = tenant.create_app(), tenant.headers("WRITER")
    first = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=headers),
               BuildSchema, 200)
    proxy.cut()
    e = err(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=headers),
            503, "database_unavailable")
    assert "Traceback" not in e["message"]
    proxy.restore()
    again = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=headers),
               BuildSchema, 200)
    assert again["build_id"] != first["build_id"] and again["conversion"]["state"] == "QUEUED"


def test_outage_redis_down_fails_health_but_submission_is_kept(service_settings, redis_proxy, tenant):
    proxy, url = redis_proxy
    client = create_app(replace(service_settings, redis_url=url)).test_client()
    app_id = tenant.create_app()
    proxy.cut()
    err(client.get("/healthz"), 503, "queue_unavailable")
    # The build is committed QUEUED; the sweeper publishes it once Redis is back (RELIABILITY §B 13).
    build = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id),
                           headers=tenant.headers("WRITER")), BuildSchema, 200)
    assert build["conversion"]["state"] == "QUEUED"
    proxy.restore()
    ok(client.get("/healthz"), HealthSchema)
