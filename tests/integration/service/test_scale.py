"""Scale with real `celery worker` processes: a queue per host class, and fair scheduling between accounts."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import pytest
from redis import Redis
from sqlalchemy import select

from api.app import create_app
from common.queue.tasknames import CONVERT, MAINTENANCE, QUEUE, SWEEP
from common.settings import Settings
from common.store.engine import session_scope
from common.store.models import Build
from tests.fixtures.images import push_test_image

from .conftest import CeleryProcess, settings_for_own_worker, start_worker
from .helpers import celery_producer, submit

pytestmark = pytest.mark.integration
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module")
def scale(service_settings, registry) -> Iterator[Settings]:  # noqa: ANN001
    s = settings_for_own_worker(service_settings, registry.host)  # a worker claims any QUEUED build: only ours
    yield s
    Redis.from_url(s.redis_url).flushdb()


@pytest.fixture
def workers(scale) -> Iterator[list[CeleryProcess]]:  # noqa: ANN001
    started: list[CeleryProcess] = []
    yield started
    for worker in started:
        worker.stop()


def _submit(client, tenant, app_id: str, src: str, dst: str) -> str:  # noqa: ANN001
    body = {"request": {"app_id": app_id, "input_image": {"name": src}, "output_image": {"name": dst},
                        "converter_options": {}},
            "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 512}}
    return submit(client, tenant.headers("WRITER"), body)


def _rows(s: Settings, ids: list[str]) -> dict[str, Build]:
    with session_scope(s.database_url) as session:
        rows = session.execute(select(Build).where(Build.id.in_([uuid.UUID(i) for i in ids]))).scalars().all()
        for row in rows:
            session.expunge(row)
    return {str(r.id): r for r in rows}


def _wait_terminal(s: Settings, ids: list[str], timeout: float) -> dict[str, Build]:
    deadline = time.monotonic() + timeout
    while True:
        rows = _rows(s, ids)
        if all(r.conversion_state in TERMINAL for r in rows.values()) or time.monotonic() > deadline:
            return rows
        time.sleep(0.5)


def test_scale_maintenance_worker_never_converts_and_a_convert_worker_does(scale, make_tenant, registry, workers):
    s = scale
    client = create_app(s).test_client()
    image = push_test_image(registry, f"scale/q-{uuid.uuid4().hex[:6]}", "1")
    tenant = make_tenant()
    tenant.client = client
    app_id = tenant.create_app()
    redis = Redis.from_url(s.redis_url)

    maintenance = start_worker(s, f"maint{uuid.uuid4().hex[:6]}", queues=MAINTENANCE)
    workers.append(maintenance)
    build_id = _submit(client, tenant, app_id, f"{registry.host}/{image.repo}:1", f"{registry.host}/scale/q-out:1")
    assert QUEUE == "convert" and redis.llen("convert") == 1  # the queue of Nitro hosts, by that name
    # The maintenance worker is alive and consuming its queue: it runs a sweep sent there...
    celery_producer(s.redis_url, s.visibility_timeout).send_task(SWEEP, queue=MAINTENANCE)
    deadline = time.monotonic() + 30
    while f"Task {SWEEP}[" not in maintenance.log.read_text(errors="replace") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"Task {SWEEP}[" in maintenance.log.read_text(errors="replace")
    # ...yet the conversion stays queued for a Nitro host.
    time.sleep(3)
    assert _rows(s, [build_id])[build_id].conversion_state == "QUEUED"
    assert redis.llen("convert") == 1
    assert f"Task {CONVERT}[" not in maintenance.log.read_text(errors="replace")
    # Nor does it spend memory on the conversion memos (worker.pipeline.warm), which a convert worker fills.
    assert "conversion memos warmed" not in maintenance.log.read_text(errors="replace")

    workers.append(start_worker(s, f"conv{uuid.uuid4().hex[:6]}", queues=QUEUE))
    row = _wait_terminal(s, [build_id], timeout=180)[build_id]
    assert row.conversion_state == "SUCCEEDED", (row.error_code, row.error_message)
    assert redis.llen("convert") == 0
    assert "conversion memos warmed" in workers[-1].log.read_text(errors="replace")


def test_scale_one_accounts_backlog_does_not_starve_another(scale, make_tenant, registry, workers):
    s = scale
    client = create_app(s).test_client()
    image = push_test_image(registry, f"scale/f-{uuid.uuid4().hex[:6]}", "1")
    src = f"{registry.host}/{image.repo}:1"
    a, b = make_tenant(), make_tenant()
    a.client = b.client = client
    a_app, b_app = a.create_app(), b.create_app()

    workers.append(start_worker(s, f"fair{uuid.uuid4().hex[:6]}"))
    a_ids = [_submit(client, a, a_app, src, f"{registry.host}/scale/a:{i}") for i in range(8)]
    b_id = _submit(client, b, b_app, src, f"{registry.host}/scale/b:1")
    rows = _wait_terminal(s, [*a_ids, b_id], timeout=600)
    assert {r.conversion_state for r in rows.values()} == {"SUCCEEDED"}, {
        i: (r.conversion_state, r.error_code) for i, r in rows.items()}
    assert all(r.attempts == 1 for r in rows.values())  # each converted once, duplicate tokens or not
    by_finish = sorted(rows, key=lambda i: rows[i].finished_at)  # type: ignore[arg-type, return-value]
    # One worker: B's single conversion waits for at most the one of A's already running.
    assert by_finish.index(b_id) <= 1, [("B" if i == b_id else "A") for i in by_finish]
