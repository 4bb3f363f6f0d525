"""Producer side of the broker: enqueue a conversion by task name, carrying the build id only."""
from __future__ import annotations

import functools
import logging

from celery import Celery
from kombu.exceptions import OperationalError as KombuOperationalError
from redis import Redis
from redis.exceptions import RedisError

from common.errors import QueueUnavailable
from common.tasknames import CONVERT, QUEUE

log = logging.getLogger(__name__)


def broker_transport_options(visibility_timeout: int) -> dict[str, object]:
    """Shared by producers and workers: kombu uses the shortest visibility timeout it sees on a DB."""
    return {
        "visibility_timeout": visibility_timeout,
        "socket_timeout": 10,
        "socket_connect_timeout": 3,
        "socket_keepalive": True,
        "health_check_interval": 25,
        "retry_on_timeout": True,
    }


@functools.cache
def producer(redis_url: str, visibility_timeout: int) -> Celery:
    """A Celery app used only to publish; it never imports or runs worker code."""
    app = Celery("nitroconv-producer", broker=redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        broker_transport_options=broker_transport_options(visibility_timeout),
        broker_connection_timeout=3,
        # The row is already committed: a failed publish is covered by the sweeper, so fail fast
        # rather than hold the HTTP request through kombu's default retry schedule.
        task_publish_retry_policy={"max_retries": 1, "interval_start": 0, "interval_step": 0.2,
                                   "interval_max": 0.2},
    )
    return app


def enqueue_conversion(redis_url: str, visibility_timeout: int, build_id: str,
                       countdown: float | None = None) -> None:
    """Publish the conversion of `build_id`. Raises QueueUnavailable when the broker is down.

    A countdown must stay far below the visibility timeout, or Redis redelivers the waiting message.
    """
    if countdown is not None and countdown >= visibility_timeout / 4:
        raise ValueError("countdown too close to the visibility timeout")
    try:
        producer(redis_url, visibility_timeout).send_task(
            CONVERT, args=[build_id], queue=QUEUE, task_id=build_id, countdown=countdown)
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise QueueUnavailable("the task broker is unreachable") from exc


@functools.cache
def _redis(redis_url: str) -> Redis:
    return Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)


def ping(redis_url: str) -> None:
    """Raise QueueUnavailable unless Redis answers PING."""
    try:
        _redis(redis_url).ping()
    except (RedisError, OSError) as exc:
        raise QueueUnavailable("the task broker is unreachable") from exc
