"""Redis commands on direct per-thread connections: the API's rate-limit count and every publish (common.queue.publish).

redis-py's pool checkout, retry wrapper and command helpers cost more CPU than the command itself, and the API
runs these two on every submission: each thread keeps one connection per URL and speaks on it directly.
"""
from __future__ import annotations

import functools
import os
import threading

from redis import ConnectionPool
from redis.connection import ConnectionInterface
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

_connections = threading.local()


@functools.cache
def _pool(url: str, timeout: float) -> ConnectionPool:
    # Only a factory of connections with the URL's settings: nothing is ever checked out of it.
    return ConnectionPool.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)


def _connection(url: str, timeout: float) -> ConnectionInterface:
    # Keyed by process too: a forked child inherits its parent's thread-locals, and must not speak on its socket.
    mine: dict[tuple[int, str, float], ConnectionInterface] = _connections.__dict__.setdefault("by_url", {})
    key = (os.getpid(), url, timeout)
    conn = mine.get(key)
    if conn is None:
        conn = mine[key] = _pool(url, timeout).make_connection()
    return conn


def _once(conn: ConnectionInterface, args: tuple[object, ...]) -> object:
    try:
        conn.send_command(*args)
        return conn.read_response()
    except (RedisError, OSError):
        conn.disconnect()  # a reply half read, or a dead socket, must not meet the next command
        raise


def command(url: str, timeout: float, *args: object) -> object:
    """`args`' reply from Redis at `url` (socket timeouts `timeout` s). A connection that died since its last use
    (Redis restarted) is replaced once, as redis-py's own retry would; any other failure is raised."""
    conn = _connection(url, timeout)
    try:
        return _once(conn, args)
    except RedisConnectionError:
        return _once(conn, args)
