"""The submission's quota check (inside the INSERT, under the account lock) against real Postgres races."""
from __future__ import annotations

import threading
import uuid

import pytest

from api.limits import lock_account_app
from common import buildstore
from common.db import session_scope
from common.errors import QuotaExceeded

from .test_fair_claim import _account, _empty_queue, fair_db  # noqa: F401 - fixtures of this module too

pytestmark = pytest.mark.integration


def _new(account: tuple[uuid.UUID, uuid.UUID], key: str | None = None) -> buildstore.NewBuild:
    return buildstore.NewBuild(
        build_id=uuid.uuid4(), account_id=account[0], app_id=account[1], created_by=None,
        input_image_name="127.0.0.1:5000/in:1", output_image_name="127.0.0.1:5000/out:1", input_username=None,
        output_username=None, input_credentials=b"sealed", output_credentials=None, converter_options={"a": [1]},
        cpu_count=2, mem_size=None, enable_overlay_filesystem_persistence=True, request_fingerprint="f" * 64,
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


def test_submit_quota_races_take_exactly_the_free_slots(fair_db):  # noqa: F811
    account = _account(fair_db)
    other = _account(fair_db)
    assert _submit(fair_db, other, quota=3)  # another account's builds do not count
    results: list[bool] = []
    lock = threading.Lock()

    def submit() -> None:
        ok = _submit(fair_db, account, quota=5)
        with lock:
            results.append(ok)

    threads = [threading.Thread(target=submit) for _ in range(12)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sorted(results) == [False] * 7 + [True] * 5
    with session_scope(fair_db) as session:
        assert buildstore.count_unfinished(session, account[0], 100) == 5


def test_submit_quota_retried_key_returns_the_build_even_at_quota(fair_db):  # noqa: F811
    account = _account(fair_db)
    assert _submit(fair_db, account, quota=1, key="k1")
    assert not _submit(fair_db, account, quota=1, key="k2")  # a new request at the quota: refused
    with session_scope(fair_db) as session:  # the API passes no quota for a retry of a used key
        build, created = buildstore.insert_build(session, _new(account, "k1"), quota=None)
    assert not created and build.idempotency_key == "k1"
