"""Producer side of the broker: enqueue a conversion by task name, carrying the build id only."""
from __future__ import annotations

import base64
import functools
import json
import logging
import os
import socket
import uuid
from datetime import UTC, datetime, timedelta

from redis import Redis
from redis.exceptions import RedisError

from common.errors import QueueUnavailable
from common.queue.redisconn import command
from common.queue.tasknames import CONVERT, QUEUE

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


# Task protocol 2's third body element: no callbacks, errbacks, chain or chord.
_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
# Results are ignored (task_ignore_result), so replies go nowhere; Celery still expects the property.
_REPLY_TO = str(uuid.uuid4())
_HOST = socket.gethostname()


def _origin() -> str:
    return f"gen{os.getpid()}@{_HOST}"  # Celery's own producer tag, as Flower shows it


def conversion_message(build_id: str, *, eta: datetime | None = None, origin: str = "") -> bytes:
    """The Redis list entry `send_task(CONVERT, args=[build_id], queue=QUEUE, task_id=build_id)` writes: Celery's
    task protocol 2 (JSON body) in kombu's Redis transport envelope, which any `celery worker` consumes.

    Built by hand, for the Celery and kombu minor versions setup.cfg pins (a test runs it on a real worker of
    those): Celery's `send_task` and kombu's producer make a redis-py client, route, serialise and signal on
    every publish, several times the CPU of this and one LPUSH (bench/README.md, figure 4).
    """
    body = json.dumps([[build_id], {}, _EMBED]).encode()
    headers: dict[str, object] = {
        "lang": "py", "task": CONVERT, "id": build_id, "shadow": None,
        "eta": eta.isoformat() if eta is not None else None, "expires": None, "group": None,
        "group_index": None, "retries": 0, "timelimit": [None, None], "root_id": build_id, "parent_id": None,
        "argsrepr": repr([build_id]), "kwargsrepr": "{}", "origin": origin, "ignore_result": None,
        "replaced_task_nesting": 0, "stamped_headers": None, "stamps": {},
    }
    properties = {
        "correlation_id": build_id, "reply_to": _REPLY_TO, "delivery_mode": 2,
        "delivery_info": {"exchange": "", "routing_key": QUEUE}, "priority": 0,
        "body_encoding": "base64", "delivery_tag": str(uuid.uuid4()),
    }
    return json.dumps({"body": base64.b64encode(body).decode(), "content-encoding": "utf-8",
                       "content-type": "application/json", "headers": headers,
                       "properties": properties}).encode()


# A connection Redis closed is replaced once (common.queue.redisconn), then the publish fails: the row is already
# committed and the sweeper publishes it later, so an HTTP request is never held through a backoff.
_PUBLISH_TIMEOUT = 2


def enqueue_conversion(redis_url: str, visibility_timeout: int, build_id: str,
                       countdown: float | None = None) -> None:
    """Publish the conversion of `build_id`. Raises QueueUnavailable when the broker is down.

    A countdown must stay far below the visibility timeout, or Redis redelivers the waiting message.
    """
    if countdown is not None and countdown >= visibility_timeout / 4:
        raise ValueError("countdown too close to the visibility timeout")
    eta = datetime.now(UTC) + timedelta(seconds=countdown) if countdown is not None else None
    try:
        # A direct queue through the anonymous exchange is the Redis list named QUEUE (priority 0 has no
        # suffix): one LPUSH is the whole publish, as kombu's own `_put` does it.
        command(redis_url, _PUBLISH_TIMEOUT, "LPUSH", QUEUE,
                conversion_message(build_id, eta=eta, origin=_origin()))
    except (RedisError, OSError) as exc:
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
