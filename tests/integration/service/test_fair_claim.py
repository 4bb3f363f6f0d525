"""The fair claim against real Postgres (a database of the module's own, `queue_db`): round robin across
accounts, retry backoff, exactly once under races."""
from __future__ import annotations

import threading
import uuid

import pytest
from sqlalchemy import func, insert, select, update

from common.store import builds as buildstore
from common.store.engine import session_scope
from common.store.models import Build

from .helpers import new_account, new_build, race

pytestmark = pytest.mark.integration
LEASE = 60
MAX_ATTEMPTS = 3


def _submit(url: str, account: tuple[uuid.UUID, uuid.UUID]) -> uuid.UUID:
    new = new_build(account)
    with session_scope(url) as session:
        session.execute(insert(Build).values(**buildstore.build_row(new)))
    return new.build_id


def _claim(url: str) -> buildstore.Claim | None:
    with session_scope(url) as session:
        return buildstore.claim_next(session, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS)


def _finish(url: str, claim: buildstore.Claim) -> None:
    """End the attempt (any terminal end will do for the scheduler)."""
    with session_scope(url) as session:
        assert buildstore.end_unsuccessfully(session, claim.build_id, buildstore.ConversionState.PULLING,
                                             buildstore.ConversionState.FAILED, actor="test", code="x",
                                             message="x", fence=claim.fence)


def test_fair_claim_one_worker_round_robins_accounts(queue_db):
    a, b = new_account(queue_db), new_account(queue_db)
    a_builds = [_submit(queue_db, a) for _ in range(4)]
    first = _claim(queue_db)
    assert first is not None and first.build_id == a_builds[0]  # only A waited
    _finish(queue_db, first)
    b_build = _submit(queue_db, b)  # B submits behind A's backlog
    order = [first.build_id]
    while (claim := _claim(queue_db)) is not None:
        order.append(claim.build_id)
        _finish(queue_db, claim)  # one worker: nothing else runs while it converts
    # B was never served, A just was: B goes next, then A's backlog in submission order.
    assert order == [a_builds[0], b_build, *a_builds[1:]]


def test_fair_claim_fewest_running_first(queue_db):
    a, b, c = new_account(queue_db), new_account(queue_db), new_account(queue_db)
    a_builds = [_submit(queue_db, a) for _ in range(3)]
    b_builds = [_submit(queue_db, b) for _ in range(2)]
    c_build = _submit(queue_db, c)
    # Several workers, none finishing: each claim goes to an account with the fewest running.
    claims = [_claim(queue_db) for _ in range(6)]
    ids = [c.build_id for c in claims if c is not None]
    assert len(ids) == 6 and set(ids) == {*a_builds, *b_builds, c_build}
    # The first three claims serve the three accounts once each; A's third build comes last.
    assert {ids[0], ids[1], ids[2]} == {a_builds[0], b_builds[0], c_build}
    assert ids[5] == a_builds[2]
    assert _claim(queue_db) is None


def test_fair_claim_honours_the_retry_backoff(queue_db):
    a = new_account(queue_db)
    build_id = _submit(queue_db, a)
    claim = _claim(queue_db)
    assert claim is not None
    with session_scope(queue_db) as session:
        assert buildstore.requeue(session, build_id, buildstore.ConversionState.PULLING, actor="test",
                                  reason="flaky", fence=claim.fence, backoff_seconds=30)
    assert _claim(queue_db) is None  # QUEUED, but not before its backoff ends
    with session_scope(queue_db) as session:
        session.execute(update(Build).where(Build.id == build_id).values(not_before=func.now()))
    again = _claim(queue_db)
    assert again is not None and again.build_id == build_id and again.attempt == 2


def test_fair_claim_skips_cancelled_and_exhausted(queue_db):
    a = new_account(queue_db)
    cancelled, exhausted, good = (_submit(queue_db, a) for _ in range(3))
    with session_scope(queue_db) as session:
        session.execute(update(Build).where(Build.id == cancelled).values(cancel_requested=True))
        session.execute(update(Build).where(Build.id == exhausted).values(attempts=MAX_ATTEMPTS))
    claim = _claim(queue_db)
    assert claim is not None and claim.build_id == good
    assert _claim(queue_db) is None


def test_fair_claim_races_claim_each_build_exactly_once(queue_db):
    accounts = [new_account(queue_db) for _ in range(3)]
    submitted = {_submit(queue_db, accounts[i % 3]) for i in range(24)}
    claimed: list[uuid.UUID] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while (claim := _claim(queue_db)) is not None:
                with lock:
                    claimed.append(claim.build_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    race(worker, threads=4)
    assert not errors
    assert sorted(claimed) == sorted(submitted)  # every build once, none twice
    with session_scope(queue_db) as session:
        attempts = session.execute(select(Build.attempts).where(Build.id.in_(submitted))).scalars().all()
    assert set(attempts) == {1}
