"""Time budgets for remote calls: per-request timeouts, an overall deadline, and bounded backoff with Retry-After."""
from __future__ import annotations

import email.utils
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from common.errors import RegistryTimeout

# 429 is "slow down"; the 5xx here are the ones a proxy or an overloaded registry answer with.
RETRYABLE_STATUSES: frozenset[int] = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class Timeouts:
    """Seconds for establishing a connection and for each wait on the socket while reading."""

    connect: float = 10.0
    read: float = 60.0


@dataclass(frozen=True)
class RetryPolicy:
    """At most `attempts` tries per request; waits grow exponentially and honour Retry-After up to a cap."""

    attempts: int = 5
    base_delay: float = 0.5
    max_delay: float = 30.0
    max_retry_after: float = 120.0

    def backoff(self, retry: int, *, jitter: Callable[[float, float], float] = random.uniform) -> float:
        """Delay before retry number `retry` (1-based) when the server gave no Retry-After."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (retry - 1)))
        # Half fixed, half random: spreads a fleet of workers without ever collapsing to zero.
        return ceiling / 2 + jitter(0.0, ceiling / 2)


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or HTTP-date); None if absent or garbled."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(int(value))
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - (now or datetime.now(UTC))).total_seconds())


@dataclass
class Deadline:
    """An absolute point on the monotonic clock after which a client gives up; None means no deadline."""

    seconds: float | None
    clock: Callable[[], float] = time.monotonic
    _at: float | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        if self.seconds is not None:
            self._at = self.clock() + self.seconds

    def remaining(self) -> float | None:
        return None if self._at is None else max(0.0, self._at - self.clock())

    @property
    def expired(self) -> bool:
        return self._at is not None and self.clock() >= self._at

    def expire(self) -> None:
        """End the budget now: whatever still runs on it stops at its next check (an abandoned download)."""
        if self.seconds is None:
            self.seconds = 0.0
        self._at = self.clock()

    def check(self, what: str = "registry operation") -> None:
        if self.expired:
            raise RegistryTimeout(f"{what} exceeded the overall deadline of {self.seconds:g}s",
                                  details={"deadline_s": self.seconds})

    def cap(self, seconds: float) -> float:
        """`seconds`, shortened so that waiting it does not run past the deadline (never below a tick)."""
        remaining = self.remaining()
        return seconds if remaining is None else max(0.001, min(seconds, remaining))
