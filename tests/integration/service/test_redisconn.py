"""The API's direct Redis connections (common/queue/redisconn.py) against the real Redis: a connection Redis closed is
replaced once, an unreachable Redis is an error at once, and the rate limit and the publish still fail as they
did through redis-py's client."""
from __future__ import annotations

import os
import time
import uuid

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from api.limits import check_rate
from common.errors import RateLimited
from common.queue import redisconn

pytestmark = pytest.mark.integration

UNREACHABLE = "redis://127.0.0.1:1/0"


def test_redisconn_replaces_a_connection_redis_closed(service_redis):
    key = f"test:redisconn:{uuid.uuid4().hex}"
    assert redisconn.command(service_redis, 0.5, "INCR", key) == 1
    ours = redisconn.command(service_redis, 0.5, "CLIENT", "ID")  # this thread's connection, and only it
    admin = Redis.from_url(service_redis)
    assert admin.client_kill_filter(_id=ours) == 1
    assert redisconn.command(service_redis, 0.5, "INCR", key) == 2
    admin.delete(key)


def test_redisconn_a_forked_child_gets_a_connection_of_its_own(service_redis):
    """A Celery pool child or a gunicorn worker is forked: the parent's socket must not carry its commands."""
    parent = redisconn.command(service_redis, 0.5, "CLIENT", "ID")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report its connection's id, then leave without running any test teardown
        try:
            os.write(write, str(redisconn.command(service_redis, 0.5, "CLIENT", "ID")).encode())
        finally:
            os._exit(0)
    os.close(write)
    child = int(os.read(read, 64))
    os.close(read)
    os.waitpid(pid, 0)
    assert child != parent
    assert redisconn.command(service_redis, 0.5, "CLIENT", "ID") == parent  # the parent's is intact


def test_redisconn_raises_when_redis_is_unreachable():
    started = time.monotonic()
    with pytest.raises(RedisConnectionError):
        redisconn.command(UNREACHABLE, 0.5, "PING")
    assert time.monotonic() - started < 3


def test_rate_limit_counts_on_the_direct_connection_and_fails_open(service_redis):
    subject = f"test-{uuid.uuid4().hex}"
    Redis.from_url(service_redis).script_flush()  # the first count loads the script again
    for _ in range(3):
        check_rate(service_redis, subject, 3)
    with pytest.raises(RateLimited):
        check_rate(service_redis, subject, 3)
    check_rate(UNREACHABLE, subject, 1)  # Redis away: the request is allowed
