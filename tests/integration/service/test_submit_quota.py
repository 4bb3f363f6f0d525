"""The submission's quota check (inside the INSERT, under the account lock) against real Postgres races."""
from __future__ import annotations

import threading
import uuid

import pytest

from api.limits import lock_account_app
from common.errors import QuotaExceeded
from common.store import builds as buildstore
from common.store.engine import session_scope

from .helpers import new_account, new_build, race

pytestmark = pytest.mark.integration


def _new(account: tuple[uuid.UUID, uuid.UUID], key: str | None = None) -> buildstore.NewBuild:
    return new_build(account, input_credentials=b"sealed", converter_options={"a": [1]}, mem_size=None,
                     idempotency_key=key)


def _submit(url: str, account: tuple[uuid.UUID, uuid.UUID], quota: int, key: str | None = None) -> bool:
    with session_scope(url) as session:
        assert lock_account_app(session, account[0], account[1], lock=True) is not None
        try:
            build, created = buildstore.insert_build(session, _new(account, key), quota=quota)
        except QuotaExceeded as exc:
            assert exc.details["limit"] == quota and exc.details["unfinished"] == quota
            return False
        assert build.conversion_state == "QUEUED" and build.created_at is not None
        return created


def test_submit_quota_races_take_exactly_the_free_slots(queue_db):
    account = new_account(queue_db)
    other = new_account(queue_db)
    assert _submit(queue_db, other, quota=3)  # another account's builds do not count
    results: list[bool] = []
    lock = threading.Lock()

    def submit() -> None:
        ok = _submit(queue_db, account, quota=5)
        with lock:
            results.append(ok)

    race(submit, threads=12)
    assert sorted(results) == [False] * 7 + [True] * 5
    with session_scope(queue_db) as session:
        assert buildstore.count_unfinished(session, account[0], 100) == 5


def test_submit_quota_retried_key_returns_the_build_even_at_quota(queue_db):
    account = new_account(queue_db)
    assert _submit(queue_db, account, quota=1, key="k1")
    assert not _submit(queue_db, account, quota=1, key="k2")  # a new request at the quota: refused
    with session_scope(queue_db) as session:  # the API passes no quota for a retry of a used key
        build, created = buildstore.insert_build(session, _new(account, "k1"), quota=None)
    assert not created and build.idempotency_key == "k1"
