"""The fair claim against real Postgres: round robin across accounts, retry backoff, exactly once under races.

A database of its own: the claim looks at every QUEUED build, so other tests' builds must not be there.
"""
from __future__ import annotations

import secrets
import threading
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select, text, update

from common import buildstore
from common import db as database
from common.db import create_database_if_missing, drop_database, migrate, session_scope
from common.models import Account, App, Build

from .conftest import PG_BASE

pytestmark = pytest.mark.integration
LEASE = 60
MAX_ATTEMPTS = 3


@pytest.fixture(scope="module")
def fair_db() -> Iterator[str]:
    url = f"{PG_BASE}/nitroconv_fair_{secrets.token_hex(4)}"
    create_database_if_missing(url)
    migrate(url)
    yield url
    database.engine_for(url).dispose()
    drop_database(url)


@pytest.fixture(autouse=True)
def _empty_queue(fair_db: str) -> None:
    with session_scope(fair_db) as session:
        session.execute(text("DELETE FROM builds"))


def _account(url: str) -> tuple[uuid.UUID, uuid.UUID]:
    with session_scope(url) as session:
        account = Account(id=uuid.uuid4(), name=f"acct-{secrets.token_hex(3)}")
        session.add(account)
        session.flush()
        app = App(id=uuid.uuid4(), account_id=account.id, name="app", description="", default_build_settings={},
                  auto_approve=False)
        session.add(app)
        return account.id, app.id


def _submit(url: str, account: tuple[uuid.UUID, uuid.UUID]) -> uuid.UUID:
    build_id = uuid.uuid4()
    with session_scope(url) as session:
        buildstore.insert_build(session, buildstore.NewBuild(
            build_id=build_id, account_id=account[0], app_id=account[1], created_by=None,
            input_image_name="127.0.0.1:5000/in:1", output_image_name="127.0.0.1:5000/out:1", input_username=None,
            output_username=None, input_credentials=None, output_credentials=None, converter_options={},
            cpu_count=2, mem_size=512, enable_overlay_filesystem_persistence=True, request_fingerprint="f" * 64))
    return build_id


def _claim(url: str) -> buildstore.Claim | None:
    with session_scope(url) as session:
        return buildstore.claim_next(session, lease_seconds=LEASE, max_attempts=MAX_ATTEMPTS)


def _finish(url: str, claim: buildstore.Claim) -> None:
    """End the attempt (any terminal end will do for the scheduler)."""
    with session_scope(url) as session:
        assert buildstore.end_unsuccessfully(session, claim.build_id, buildstore.ConversionState.PULLING,
                                             buildstore.ConversionState.FAILED, actor="test", code="x",
                                             message="x", fence=claim.fence)


def test_fair_claim_one_worker_round_robins_accounts(fair_db):
    a, b = _account(fair_db), _account(fair_db)
    a_builds = [_submit(fair_db, a) for _ in range(4)]
    first = _claim(fair_db)
    assert first is not None and first.build_id == a_builds[0]  # only A waited
    _finish(fair_db, first)
    b_build = _submit(fair_db, b)  # B submits behind A's backlog
    order = [first.build_id]
    while (claim := _claim(fair_db)) is not None:
        order.append(claim.build_id)
        _finish(fair_db, claim)  # one worker: nothing else runs while it converts
    # B was never served, A just was: B goes next, then A's backlog in submission order.
    assert order == [a_builds[0], b_build, *a_builds[1:]]


def test_fair_claim_fewest_running_first(fair_db):
    a, b, c = _account(fair_db), _account(fair_db), _account(fair_db)
    a_builds = [_submit(fair_db, a) for _ in range(3)]
    b_builds = [_submit(fair_db, b) for _ in range(2)]
    c_build = _submit(fair_db, c)
    # Several workers, none finishing: each claim goes to an account with the fewest running.
    claims = [_claim(fair_db) for _ in range(6)]
    ids = [c.build_id for c in claims if c is not None]
    assert len(ids) == 6 and set(ids) == {*a_builds, *b_builds, c_build}
    # The first three claims serve the three accounts once each; A's third build comes last.
    assert {ids[0], ids[1], ids[2]} == {a_builds[0], b_builds[0], c_build}
    assert ids[5] == a_builds[2]
    assert _claim(fair_db) is None


def test_fair_claim_honours_the_retry_backoff(fair_db):
    a = _account(fair_db)
    build_id = _submit(fair_db, a)
    claim = _claim(fair_db)
    assert claim is not None
    with session_scope(fair_db) as session:
        assert buildstore.requeue(session, build_id, buildstore.ConversionState.PULLING, actor="test",
                                  reason="flaky", fence=claim.fence, backoff_seconds=30)
    assert _claim(fair_db) is None  # QUEUED, but not before its backoff ends
    with session_scope(fair_db) as session:
        session.execute(update(Build).where(Build.id == build_id).values(not_before=func.now()))
    again = _claim(fair_db)
    assert again is not None and again.build_id == build_id and again.attempt == 2


def test_fair_claim_skips_cancelled_and_exhausted(fair_db):
    a = _account(fair_db)
    cancelled, exhausted, good = (_submit(fair_db, a) for _ in range(3))
    with session_scope(fair_db) as session:
        session.execute(update(Build).where(Build.id == cancelled).values(cancel_requested=True))
        session.execute(update(Build).where(Build.id == exhausted).values(attempts=MAX_ATTEMPTS))
    claim = _claim(fair_db)
    assert claim is not None and claim.build_id == good
    assert _claim(fair_db) is None


def test_fair_claim_races_claim_each_build_exactly_once(fair_db):
    accounts = [_account(fair_db) for _ in range(3)]
    submitted = {_submit(fair_db, accounts[i % 3]) for i in range(24)}
    claimed: list[uuid.UUID] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            while (claim := _claim(fair_db)) is not None:
                with lock:
                    claimed.append(claim.build_id)
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors
    assert sorted(claimed) == sorted(submitted)  # every build once, none twice
    with session_scope(fair_db) as session:
        attempts = session.execute(select(Build.attempts).where(Build.id.in_(submitted))).scalars().all()
    assert set(attempts) == {1}
