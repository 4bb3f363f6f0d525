"""The API's publish is one LPUSH of a hand-built Celery message: it must be what Celery's own producer writes, and
a real `celery worker` of the minor version setup.cfg pins must run it (now, and after a countdown)."""
from __future__ import annotations

import configparser
import json
import re
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import celery
import kombu
import pytest
from redis import Redis

from common.queue.publish import enqueue_conversion
from common.queue.tasknames import CONVERT, QUEUE
from common.settings import Settings

from .conftest import CeleryProcess, settings_for_own_worker, start_worker
from .helpers import celery_producer

pytestmark = pytest.mark.integration
# Per message or per producer process: a fresh delivery tag, the producer's reply queue, the eta's clock.
_VARYING = {("properties", "delivery_tag"), ("properties", "reply_to"), ("headers", "eta")}


def _published(redis: Redis) -> dict:
    raw = redis.rpop(QUEUE)
    assert raw is not None
    return json.loads(raw)


def _without_varying(message: dict) -> dict:
    return {part: ({k: v for k, v in value.items() if (part, k) not in _VARYING} if isinstance(value, dict)
                   else value) for part, value in message.items()}


@pytest.mark.parametrize("countdown", [None, 30])
def test_publish_message_is_what_celery_send_task_writes(service_settings: Settings, countdown):
    redis = Redis.from_url(service_settings.redis_url)
    redis.delete(QUEUE)
    build_id = str(uuid.uuid4())
    enqueue_conversion(service_settings.redis_url, service_settings.visibility_timeout, build_id, countdown=countdown)
    ours = _published(redis)
    celery_producer(service_settings.redis_url, service_settings.visibility_timeout).send_task(
        CONVERT, args=[build_id], queue=QUEUE, task_id=build_id, countdown=countdown, declare=[])
    celerys = _published(redis)
    assert _without_varying(ours) == _without_varying(celerys)
    assert ours["body"] == celerys["body"]
    if countdown is None:
        assert ours["headers"]["eta"] is celerys["headers"]["eta"] is None
    else:
        skew = datetime.fromisoformat(celerys["headers"]["eta"]) - datetime.fromisoformat(ours["headers"]["eta"])
        assert abs(skew.total_seconds()) < 5
    assert ours["properties"]["delivery_tag"] != celerys["properties"]["delivery_tag"]


@pytest.fixture(scope="module")
def consumer(service_settings: Settings) -> Iterator[tuple[Settings, CeleryProcess]]:
    s = settings_for_own_worker(service_settings)
    worker = start_worker(s, f"pub{uuid.uuid4().hex[:6]}")
    try:
        yield s, worker
    finally:
        worker.stop()


def _wait_for_line(worker: CeleryProcess, line: str, timeout: float) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if line in worker.log.read_text(errors="replace"):
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"the worker never logged {line!r}: {worker.log.read_text()[-3000:]}")


@pytest.mark.parametrize("countdown", [None, 2])
def test_publish_message_is_run_by_a_real_worker(consumer, countdown):
    # No such build: the task runs, finds nothing to claim, and acks (its outcome is logged).
    s, worker = consumer
    build_id = str(uuid.uuid4())
    sent = time.monotonic()
    enqueue_conversion(s.redis_url, s.visibility_timeout, build_id, countdown=countdown)
    _wait_for_line(worker, f"Task {CONVERT}[{build_id}] received", 30)
    ran = _wait_for_line(worker, f"conversion build_id={build_id} outcome=skipped", 30)
    if countdown is not None:
        assert ran - sent >= countdown - 0.5, "the eta was not honoured"
    assert Redis.from_url(s.redis_url).llen(QUEUE) == 0


def _pinned(requirements: str, name: str) -> tuple[tuple[int, int], tuple[int, int]]:
    found = re.search(rf"^{name}(\[[a-z,]+\])?>=(\d+)\.(\d+),<(\d+)\.(\d+)$", requirements, re.MULTILINE)
    assert found is not None, f"{name} is not pinned to one minor version in setup.cfg"
    low, high = (int(found[2]), int(found[3])), (int(found[4]), int(found[5]))
    assert high == (low[0], low[1] + 1), f"{name}'s pin spans more than one minor version"
    return low, high


def test_publish_worker_is_of_the_pinned_celery_and_kombu(consumer):
    """The message is built for one Celery and one kombu: the worker that ran it above is of those versions."""
    _, worker = consumer
    cfg = configparser.ConfigParser()
    cfg.read(Path(__file__).resolve().parents[3] / "setup.cfg")
    requirements = cfg["options"]["install_requires"]
    for module, name in ((celery, "celery"), (kombu, "kombu")):
        low, high = _pinned(requirements, name)
        assert low <= tuple(int(p) for p in module.__version__.split(".")[:2]) < high, (name, module.__version__)
    _wait_for_line(worker, f" v{celery.__version__} ", 30)  # the worker's banner names the version it runs
