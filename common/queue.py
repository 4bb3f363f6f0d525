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
        # Celery publishes to a direct queue through the anonymous exchange, straight into the Redis list
        # named QUEUE, so declaring the queue on every publish (kombu's default) buys nothing: skip it.
        producer(redis_url, visibility_timeout).send_task(
            CONVERT, args=[build_id], queue=QUEUE, task_id=build_id, countdown=countdown, declare=[])
    except (KombuOperationalError, RedisError, OSError) as exc:
        raise QueueUnavailable("the task broker is unreachable") from exc


@functools.cache
def _redis(redis_url: str) -> Redis:
    return Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)


# kombu's Redis transport restores unacked messages only while holding this lock (its default key name).
UNACKED_MUTEX_KEY = "unacked_mutex"
# Delete the lock only if it still has no TTL: a live holder's lock always carries one.
_DELETE_IF_NO_TTL = "if redis.call('ttl', KEYS[1]) == -1 then return redis.call('del', KEYS[1]) end return 0"


def heal_unacked_mutex(redis_url: str) -> bool:
    """Break kombu's restore lock when it was left without a TTL (a crash between SETNX and EXPIRE, or a
    hand-made key): it would stop every worker from restoring unacked messages, forever. True when broken."""
    try:
        return bool(_redis(redis_url).eval(_DELETE_IF_NO_TTL, 1, UNACKED_MUTEX_KEY))
    except (RedisError, OSError) as exc:
        raise QueueUnavailable("the task broker is unreachable") from exc


def ping(redis_url: str) -> None:
    """Raise QueueUnavailable unless Redis answers PING."""
    try:
        _redis(redis_url).ping()
    except (RedisError, OSError) as exc:
        raise QueueUnavailable("the task broker is unreachable") from exc
