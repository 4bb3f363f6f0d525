"""Abuse limits of the API: a fixed-window rate limit per caller (in Redis) and the per-account quota."""
from __future__ import annotations

import functools
import logging
import time
import uuid

from redis import Redis
from redis.exceptions import RedisError
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from common.errors import QuotaExceeded, RateLimited
from common.models import Account, Build
from common.status import CONVERSION_TERMINAL

log = logging.getLogger(__name__)
WINDOW_SECONDS = 60


@functools.cache
def _redis(url: str) -> Redis:
    # Short timeouts: the limiter must never hold a request for long while Redis is away.
    return Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5)


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
        pipe = _redis(redis_url).pipeline()
        pipe.incr(key)
        pipe.expire(key, WINDOW_SECONDS * 2)
        count = int(pipe.execute()[0])
    except RedisError:
        log.warning("rate limiter unavailable; allowing the request")
        return
    if count > limit:
        retry_after = max(1, int((window + 1) * WINDOW_SECONDS - now))
        raise RateLimited(f"more than {limit} requests per {WINDOW_SECONDS} s; retry in {retry_after} s",
                          details={"limit": limit, "window_seconds": WINDOW_SECONDS, "retry_after": retry_after})


def check_quota(session: Session, account_id: uuid.UUID, limit: int) -> None:
    """QuotaExceeded when the account already has `limit` unfinished conversions.

    The account row is locked first, so two concurrent submissions cannot both take the last slot.
    """
    session.execute(select(Account.id).where(Account.id == account_id).with_for_update())
    unfinished = session.execute(select(func.count()).select_from(Build).where(
        Build.account_id == account_id,
        Build.conversion_state.not_in([st.value for st in CONVERSION_TERMINAL]))).scalar_one()
    if unfinished >= limit:
        raise QuotaExceeded(f"the account has {unfinished} unfinished conversions (quota {limit}); "
                            "wait for some to end or cancel them",
                            details={"limit": limit, "unfinished": unfinished, "retry_after": 30})
