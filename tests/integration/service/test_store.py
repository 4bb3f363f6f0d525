"""The build store and the worker runner against real Postgres: CAS races, leases, cancel, retry, sweeper."""
from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest
from sqlalchemy import select, text, update

from common.errors import Cancelled, InvalidTransition, RegistryUnavailable, Unauthorized
from common.store import builds as buildstore
from common.store.engine import session_factory, session_scope
from common.store.models import Build, BuildEvent
from common.store.status import ConversionState
from worker import runner
from worker.sweeper import sweep

from .conftest import cancel_queued
from .helpers import PCRS, body, submit

pytestmark = pytest.mark.integration
C = ConversionState
OUTCOME = buildstore.Outcome(input_digest="sha256:" + "1" * 64, output_digest="sha256:" + "2" * 64,
                             output_size=1 << 20, eif_size=1 << 19, eif_sha256="3" * 64, pcr8=None,
                             exposed_ports=(), warnings=("w",), docker_version=None, **PCRS)


def _submit(client, tenant, **app_fields) -> uuid.UUID:  # noqa: ANN001
    app_id = tenant.create_app(**app_fields)
    return uuid.UUID(submit(client, tenant.headers("WRITER"), body(app_id, input_image={
        "name": "127.0.0.1:5000/in:1", "auth_config": {"username": "u", "password": "pw"}})))


@pytest.fixture(autouse=True)
def _only_this_tests_builds_queued(service_settings):  # noqa: ANN001, ANN202
    cancel_queued(service_settings.database_url)  # the runner would claim other tests' QUEUED builds first


def _row(s, build_id) -> Build:  # noqa: ANN001
    with session_scope(s.database_url) as session:
        row = session.get(Build, build_id)
        session.expunge(row)
        return row


class FakeEngine:
    """Stands in for the pipeline at the process edge: reports stages, honours cancel, returns or raises."""

    def __init__(self, stages=("PULLING", "BUILDING", "MEASURING", "PUSHING"), error=None,  # noqa: ANN001
                 on=None):  # noqa: ANN001
        self.stages, self.error, self.on, self.seen = stages, error, on, []

    def __call__(self, build, creds_in, creds_out, *, scratch: Path, on_stage, should_cancel):  # noqa: ANN001
        self.seen.append((build.id, creds_in, creds_out, scratch.is_dir()))
        for i, stage in enumerate(self.stages):
            on_stage(stage, i / len(self.stages))
            if self.on is not None:
                self.on(stage, build.id)
            if should_cancel():
                raise Cancelled("cancelled between steps")
        if self.error is not None:
            raise self.error
        return OUTCOME


def test_store_two_session_cas_race_has_exactly_one_winner(client, tenant, service_settings):
    build_id = _submit(client, tenant)
    factory = session_factory(service_settings.database_url)
    a, b = factory(), factory()
    try:
        # Both sessions saw QUEUED; a's UPDATE holds the row lock, b's waits on it and then re-checks.
        results: dict[str, bool] = {}
        assert buildstore.claim(a, build_id, lease_seconds=60) is not None
        t = threading.Thread(target=lambda: results.setdefault("b", buildstore.claim(b, build_id, lease_seconds=60)
                                                               is not None))
        t.start()
        t.join(timeout=0.5)
        a.commit()
        t.join(timeout=10)
        b.commit()
        assert results == {"b": False}
    finally:
        a.close()
        b.close()
    with session_scope(service_settings.database_url) as session:
        claims = session.execute(select(BuildEvent).where(BuildEvent.build_id == build_id,
                                                          BuildEvent.to_state == "PULLING")).all()
    assert len(claims) == 1 and _row(service_settings, build_id).attempts == 1


def test_store_refuses_edges_outside_the_table(client, tenant, service_settings):
    build_id = _submit(client, tenant)
    with session_scope(service_settings.database_url) as session:
        with pytest.raises(InvalidTransition):
            buildstore.transition_conversion(session, build_id, C.QUEUED, C.SUCCEEDED, actor="t")
        with pytest.raises(InvalidTransition):
            buildstore.transition_conversion(session, build_id, C.SUCCEEDED, C.QUEUED, actor="t")
        # A stale source loses the CAS rather than overwriting.
        assert not buildstore.transition_conversion(session, build_id, C.PULLING, C.BUILDING, actor="t")


def test_store_database_rejects_an_unknown_state(client, tenant, service_settings):
    build_id = _submit(client, tenant)
    with pytest.raises(Exception, match="ck_builds_conversion_state"):
        with session_scope(service_settings.database_url) as session:
            session.execute(update(Build).where(Build.id == build_id).values(conversion_state="DONE"))


def test_runner_success_walks_every_state_and_unseals_credentials(client, tenant, service_settings):
    build_id = _submit(client, tenant)
    engine = FakeEngine(stages=("PULLING", "PUSHING"))  # skipped stages are still recorded in order
    assert runner.run(build_id, service_settings, engine).outcome == "succeeded"
    seen_id, creds_in, creds_out, had_scratch = engine.seen[0]
    assert seen_id == build_id and (creds_in.username, creds_in.password) == ("u", "pw") and creds_out is None
    row = _row(service_settings, build_id)
    assert (row.conversion_state, row.approval_status, row.pcr0) == ("SUCCEEDED", "PENDING", PCRS["pcr0"])
    assert row.pending_task_id is not None and row.progress == 1.0 and row.lease_owner is None
    with session_scope(service_settings.database_url) as session:
        states = session.execute(select(BuildEvent.to_state).where(
            BuildEvent.build_id == build_id, BuildEvent.machine == "conversion").order_by(BuildEvent.id)).scalars()
        assert list(states) == ["PULLING", "BUILDING", "MEASURING", "PUSHING", "SUCCEEDED"]
    # A redelivered message finds nothing to claim and changes nothing.
    assert runner.run(build_id, service_settings, FakeEngine()).outcome == "skipped"


def test_runner_auto_approve(client, tenant, service_settings):
    build_id = _submit(client, tenant, auto_approve=True)
    runner.run(build_id, service_settings, FakeEngine())
    assert _row(service_settings, build_id).approval_status == "WHITELISTED"


def test_runner_permanent_error_fails_and_rejects(client, tenant, service_settings):
    build_id = _submit(client, tenant)
    result = runner.run(build_id, service_settings, FakeEngine(error=Unauthorized("registry refused the credentials")))
    assert result.outcome == "failed"
    row = _row(service_settings, build_id)
    assert (row.conversion_state, row.error_code, row.approval_status) == ("FAILED", "unauthorized", "REJECTED")
    assert row.approval_reason.startswith("unauthorized")


def test_runner_retryable_error_requeues_until_attempts_run_out(client, tenant, settings_with):
    s = settings_with(max_attempts=2)
    build_id = _submit(client, tenant)
    flaky = FakeEngine(error=RegistryUnavailable("503 from registry"))
    first = runner.run(build_id, s, flaky)
    assert first.outcome == "requeued" and first.retry_in and _row(s, build_id).conversion_state == "QUEUED"
    early = runner.run(build_id, s, flaky)  # within the backoff: nothing claimed, the token comes back later
    assert early.outcome == "skipped" and early.retry_in and 0 < early.retry_in <= first.retry_in + 1
    with session_scope(s.database_url) as session:  # the backoff has passed
        session.execute(update(Build).where(Build.id == build_id).values(not_before=text("now()")))
    assert runner.run(build_id, s, flaky).outcome == "failed"
    row = _row(s, build_id)
    assert (row.conversion_state, row.error_code, row.attempts) == ("FAILED", "registry_unavailable", 2)


def test_runner_cancel_between_steps(client, tenant, service_settings):
    build_id = _submit(client, tenant)

    def cancel_during_build(stage, bid):  # noqa: ANN001
        if stage == "BUILDING":
            resp = client.post(f"/v1/builds/{bid}/cancel", headers=tenant.headers("WRITER"))
            assert resp.status_code == 202  # running: the worker stops at its next step

    result = runner.run(build_id, service_settings, FakeEngine(on=cancel_during_build))
    assert result.outcome == "cancelled"
    row = _row(service_settings, build_id)
    assert (row.conversion_state, row.approval_status, row.error_code) == ("CANCELLED", "REJECTED", "cancelled")


def test_runner_stale_worker_loses_its_lease(client, tenant, service_settings):
    build_id = _submit(client, tenant)

    def steal(stage, bid):  # noqa: ANN001
        if stage == "BUILDING":
            # The sweeper decided this worker was dead and another attempt claimed the build.
            with session_scope(service_settings.database_url) as session:
                session.execute(update(Build).where(Build.id == bid).values(lease_expires_at=text("now() - interval '1 s'")))
            report = sweep(service_settings)
            assert bid in report.requeued
            with session_scope(service_settings.database_url) as session:
                assert buildstore.claim(session, bid, lease_seconds=60) is not None

    assert runner.run(build_id, service_settings, FakeEngine(on=steal)).outcome == "lease_lost"
    row = _row(service_settings, build_id)
    assert row.conversion_state == "PULLING" and row.attempts == 2  # the new owner's, untouched by the stale one


def test_sweeper_resends_stale_queued_and_fails_exhausted(client, tenant, settings_with):
    s = settings_with(max_attempts=1)
    queued, stuck = _submit(client, tenant), _submit(client, tenant)
    with session_scope(s.database_url) as session:
        session.execute(update(Build).where(Build.id == queued).values(enqueued_at=text("now() - interval '1 hour'")))
        assert buildstore.claim(session, stuck, lease_seconds=60) is not None
        session.execute(update(Build).where(Build.id == stuck).values(lease_expires_at=text("now() - interval '1 s'")))
    report = sweep(s)
    assert queued in report.resent and stuck in report.failed
    assert queued not in sweep(s).resent  # enqueued_at moved: no duplicate send on the next pass
    row = _row(s, stuck)
    assert (row.conversion_state, row.error_code, row.approval_status) == ("FAILED", "attempts_exhausted", "REJECTED")
