"""Broker and database faults with servers of the test's own: Redis killed and restarted, Postgres cut away
from the workers, dropped connections, a forged pickle message (RELIABILITY.md §B 13, 16, 17, 18, 21, 23)."""
from __future__ import annotations

import os
import uuid
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from celery import Celery
from sqlalchemy.engine import make_url

from common.queue.tasknames import CONVERT, QUEUE
from tests.fixtures.images import push_test_image
from tests.integration.service.tcpproxy import CuttableProxy

from .conftest import api_for, row, wait_for, wait_terminal, with_hosts

pytestmark = pytest.mark.integration


def _image(registry) -> str:  # noqa: ANN001
    image = push_test_image(registry, f"rel/app-{uuid.uuid4().hex[:6]}", "1")
    return f"{registry.host}/{image.repo}:1"


def _out(registry) -> str:  # noqa: ANN001
    return f"{registry.host}/rel/out-{uuid.uuid4().hex[:6]}:1"


def test_broker_redis_down_at_submit_is_202_and_runs_when_redis_returns(registry, rel_settings, own_redis, stack):
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    src = _image(registry)
    procs = stack(s)
    worker = procs.worker()
    procs.beat()
    own_redis.kill()
    build_id = api.submit(src, _out(registry))  # committed; the publish failed fast
    assert row(s, build_id).conversion_state == "QUEUED"
    own_redis.start()  # same port, same (empty) AOF: the message was never written
    build = wait_terminal(s, build_id)
    assert build.conversion_state == "SUCCEEDED" and build.attempts == 1
    assert worker.proc.poll() is None  # the same worker reconnected; nothing was restarted


def test_broker_redis_killed_with_jobs_queued_loses_none(registry, rel_settings, own_redis, stack):
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    src = _image(registry)
    ids = [api.submit(src, _out(registry)) for _ in range(2)]
    redis = own_redis.client()
    assert redis.llen(QUEUE) == 2
    own_redis.kill()  # SIGKILL, no shutdown save: only the AOF keeps the queue
    own_redis.start()
    assert redis.llen(QUEUE) == 2
    assert redis.config_get("maxmemory-policy")["maxmemory-policy"] == "noeviction"
    procs = stack(s)
    procs.worker()  # no beat: the sweeper must not be what saves these
    for build_id in ids:
        build = wait_terminal(s, build_id)
        assert build.conversion_state == "SUCCEEDED" and build.attempts == 1


def test_db_postgres_down_workers_back_off_without_side_effects(registry, rel_settings, stack):
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)  # the API talks to Postgres directly; only the workers lose it
    src, dst = _image(registry), _out(registry)
    url = make_url(s.database_url)
    proxy = CuttableProxy(url.host or "127.0.0.1", url.port or 5432)
    try:
        ws = replace(s, database_url=url.set(port=proxy.port).render_as_string(hide_password=False))
        procs = stack(ws)
        worker = procs.worker()
        procs.beat()
        proxy.cut()
        build_id = api.submit(src, dst)
        wait_for(lambda: worker.text().count(f"database unavailable build_id={build_id}") >= 2, 60,
                 "the worker to back off at least twice")
        build = row(s, build_id)
        assert (build.conversion_state, build.attempts) == ("QUEUED", 0)
        repo, tag = dst.split("/", 1)[1].rsplit(":", 1)
        assert requests.get(f"{registry.url}/v2/{repo}/manifests/{tag}", timeout=5).status_code == 404
        proxy.restore()
        build = wait_terminal(s, build_id)
        assert build.conversion_state == "SUCCEEDED" and build.attempts == 1
        assert worker.proc.poll() is None
    finally:
        proxy.close()


def test_broker_connections_killed_the_worker_reconnects_and_drains(registry, rel_settings, own_redis, stack):
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    src = _image(registry)
    procs = stack(s)
    worker = procs.worker()
    # An idle-timeout or failover drops every client connection (RELIABILITY.md §B 17).
    killed = own_redis.client().execute_command("CLIENT", "KILL", "TYPE", "normal", "SKIPME", "yes")
    assert int(killed) >= 1
    build = wait_terminal(s, api.submit(src, _out(registry)))
    assert build.conversion_state == "SUCCEEDED" and build.attempts == 1
    assert worker.proc.poll() is None


class _Exploit:
    """Runs a command when unpickled: what a forged broker message would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_broker_pickle_message_is_refused_and_runs_nothing(registry, rel_settings, own_redis, stack, tmp_path):
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    src = _image(registry)
    procs = stack(s)
    worker = procs.worker()
    marker = tmp_path / "pwned"
    forger = Celery("forger", broker=s.redis_url, set_as_current=False)
    forger.send_task(CONVERT, args=[_Exploit(marker)], queue=QUEUE, serializer="pickle")  # RELIABILITY.md §B 23
    wait_for(lambda: "Refusing to deserialize" in worker.text(), 60, "the worker to refuse the pickle")
    assert not marker.exists()
    build = wait_terminal(s, api.submit(src, _out(registry)))  # and it carries on with real work
    assert build.conversion_state == "SUCCEEDED"
    assert worker.proc.poll() is None and not marker.exists()
