"""Abuse limits of the API: a fixed-window rate limit per caller (in Redis) and the per-account quota."""
from __future__ import annotations

import hashlib
import logging
import time
import uuid

from redis.exceptions import NoScriptError, RedisError
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from common.errors import RateLimited
from common.queue.redisconn import command
from common.store.models import Account, App

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


# Built once with bound parameters: SQLAlchemy reuses their compiled form and cache key per submission.
_APP_COLUMNS = (App.id, App.account_id, App.name, App.description, App.default_build_settings)
_APP = (select(*_APP_COLUMNS).join(Account, Account.id == App.account_id)
        .where(App.id == bindparam("app_id"), App.account_id == bindparam("account_id")))
_APP_LOCKING_ACCOUNT = _APP.with_for_update(of=Account)
APP_STATEMENTS = (_APP, _APP_LOCKING_ACCOUNT)


def lock_account_app(session: Session, account_id: uuid.UUID, app_id: object, *, lock: bool) -> App | None:
    """The account's app `app_id` (None if it has no such app), with the account row locked for the quota
    check when `lock`: one round trip for both, and the lock is held only until the submission commits."""
    # Core on the session's connection, not an ORM load: the submission only reads these columns.
    row = session.connection().execute(_APP_LOCKING_ACCOUNT if lock else _APP,
                                       {"app_id": app_id, "account_id": account_id}).one_or_none()
    if row is None:
        return None
    return App(**{column.key: value for column, value in zip(_APP_COLUMNS, row, strict=True)})
