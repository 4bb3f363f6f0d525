"""Abuse limits of the API: a fixed-window rate limit per caller, counted in Redis (the per-account quota is
the submission statement's: api/submission.py)."""
from __future__ import annotations

import hashlib
import logging
import time

from redis.exceptions import NoScriptError, RedisError

from common.errors import RateLimited
from common.queue.redisconn import command

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60


# Short: the limiter must never hold a request for long while Redis is away.
_TIMEOUT = 0.5
# INCR and set the window's expiry in one command (EVALSHA): one round trip and one reply to parse.
_COUNT = "local n = redis.call('INCR', KEYS[1]) if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[1]) end return n"
_COUNT_SHA = hashlib.sha1(_COUNT.encode()).hexdigest()


def _count(url: str, key: str) -> int:
    try:
        reply = command(url, _TIMEOUT, "EVALSHA", _COUNT_SHA, 1, key, WINDOW_SECONDS * 2)
    except NoScriptError:  # a restarted or flushed Redis: EVAL caches the script again
        reply = command(url, _TIMEOUT, "EVAL", _COUNT, 1, key, WINDOW_SECONDS * 2)
    return int(reply)  # type: ignore[call-overload]


def check_rate(redis_url: str, subject: str, limit: int, now: float | None = None) -> None:
    """Count one request of `subject` in the current window; RateLimited past `limit` (0: no limit).

    Fails open: with Redis down the API keeps serving (submissions are kept in Postgres anyway)
    rather than turning a broker outage into a full API outage.
    """
    if limit <= 0:
        return
    now = time.time() if now is None else now
    window = int(now // WINDOW_SECONDS)
    key = f"nitroconv:ratelimit:{subject}:{window}"
    try:
        count = _count(redis_url, key)
    except (RedisError, OSError):
        log.warning("rate limiter unavailable; allowing the request")
        return
    if count > limit:
        retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now))
        raise RateLimited(f"more than {limit} requests per {WINDOW_SECONDS} s; retry in {retry_after} s",
                          details={"limit": limit, "window_seconds": WINDOW_SECONDS, "retry_after": retry_after})
