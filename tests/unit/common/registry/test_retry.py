"""Retry-After parsing, backoff bounds and the overall deadline."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from common.errors import RegistryTimeout
from common.registry.retry import Deadline, RetryPolicy, parse_retry_after


def test_parse_retry_after_seconds_and_http_date():
    assert parse_retry_after("7") == 7.0
    now = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("Thu, 01 Jan 2026 12:00:30 GMT", now=now) == 30.0
    assert parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5e9x"])
def test_parse_retry_after_garbage_is_none(value):
    assert parse_retry_after(value) is None


def test_backoff_grows_and_is_capped():
    policy = RetryPolicy(base_delay=1.0, max_delay=5.0)
    top = [policy.backoff(n, jitter=lambda lo, hi: hi) for n in range(1, 7)]
    low = [policy.backoff(n, jitter=lambda lo, hi: lo) for n in range(1, 7)]
    assert top == [1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    assert low == [0.5, 1.0, 2.0, 2.5, 2.5, 2.5]


def test_deadline_remaining_cap_and_check():
    now = [100.0]
    deadline = Deadline(10.0, clock=lambda: now[0])
    assert deadline.remaining() == 10.0 and deadline.cap(60.0) == 10.0 and deadline.cap(3.0) == 3.0
    deadline.check()
    now[0] = 110.0
    assert deadline.expired
    with pytest.raises(RegistryTimeout) as exc:
        deadline.check("pull")
    assert exc.value.code == "registry_timeout" and exc.value.retryable


def test_no_deadline_never_expires():
    deadline = Deadline(None)
    assert deadline.remaining() is None and not deadline.expired and deadline.cap(5.0) == 5.0


@pytest.mark.parametrize("seconds", [3600.0, None])
def test_expired_deadline_stops_what_runs_on_it(seconds):
    deadline = Deadline(seconds)
    deadline.check()
    deadline.expire()
    assert deadline.expired and deadline.remaining() == 0.0
    with pytest.raises(RegistryTimeout):
        deadline.check("download of a blob")
