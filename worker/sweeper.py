"""The periodic sweeper: re-sends conversions left QUEUED, requeues those whose worker lost its lease, and releases
builds left waiting for an identical one that ended without serving them."""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass, field
from datetime import timedelta

from sqlalchemy import func, select, update

from common.errors import QueueUnavailable
from common.queue.publish import UNACKED_MUTEX_KEY, enqueue_conversion, heal_unacked_mutex
from common.settings import Settings
from common.store import builds as buildstore
from common.store import followers
from common.store.engine import session_scope
from common.store.models import Build
from common.store.status import RUNNING, ConversionState
from worker.scratch import reap_dead

log = logging.getLogger(__name__)
BATCH = 200


@dataclass
class SweepReport:
    resent: list[uuid.UUID] = field(default_factory=list)
    requeued: list[uuid.UUID] = field(default_factory=list)
    cancelled: list[uuid.UUID] = field(default_factory=list)
    failed: list[uuid.UUID] = field(default_factory=list)
    released: list[uuid.UUID] = field(default_factory=list)  # followers whose leader ended without serving them
    reaped: int = 0
    mutex_healed: int = 0


def sweep(s: Settings) -> SweepReport:
    """One pass. Every write is a CAS, so concurrent sweepers and live workers cannot double-act."""
    report = SweepReport()
    stale_queue = func.now() - timedelta(seconds=s.requeue_after_seconds)
    with session_scope(s.database_url) as session:
        queued = session.execute(
            select(Build.id, Build.cancel_requested, Build.enqueued_at)
            .where(Build.conversion_state == ConversionState.QUEUED.value, Build.waits_for.is_(None),
                   (Build.enqueued_at.is_(None)) | (Build.enqueued_at < stale_queue))
            .order_by(Build.enqueued_at).limit(BATCH)).all()
        for build_id, cancel_requested, enqueued_at in queued:
            if cancel_requested:
                if buildstore.end_unsuccessfully(session, build_id, ConversionState.QUEUED, ConversionState.CANCELLED,
                                                 actor="sweeper", code="cancelled", message="cancelled by the user"):
                    report.cancelled.append(build_id)
                continue
            # Claim the re-send by moving enqueued_at; a concurrent sweeper sees 0 rows and skips it.
            moved = session.execute(
                update(Build).where(Build.id == build_id, Build.conversion_state == ConversionState.QUEUED.value,
                                    Build.enqueued_at.is_(None) if enqueued_at is None
                                    else Build.enqueued_at == enqueued_at)
                .values(enqueued_at=func.now()).execution_options(synchronize_session=False))
            if moved.rowcount == 1:  # type: ignore[attr-defined]
                report.resent.append(build_id)

        expired = session.execute(
            select(Build.id, Build.conversion_state, Build.cancel_requested, Build.attempts)
            .where(Build.conversion_state.in_([st.value for st in RUNNING]),
                   Build.lease_expires_at < func.now())
            .limit(BATCH)).all()
        for build_id, state, cancel_requested, attempts in expired:
            src = ConversionState(state)
            where = (Build.lease_expires_at < func.now(),)
            if cancel_requested:
                if buildstore.end_unsuccessfully(session, build_id, src, ConversionState.CANCELLED, actor="sweeper",
                                                 code="cancelled", message="cancelled by the user"):
                    report.cancelled.append(build_id)
            elif attempts >= s.max_attempts:
                ok = buildstore.transition_conversion(
                    session, build_id, src, ConversionState.FAILED, actor="sweeper", where=where,
                    reason=f"attempts_exhausted: worker lost {attempts} times",
                    values={"error_code": "attempts_exhausted", "finished_at": func.now(),
                            "error_message": f"the worker was lost on each of {attempts} attempts",
                            "lease_owner": None, "lease_expires_at": None})
                if ok:
                    buildstore.transition_approval(
                        session, build_id, buildstore.ApprovalStatus.PENDING, buildstore.ApprovalStatus.REJECTED,
                        actor="sweeper", reason="attempts_exhausted")
                    report.failed.append(build_id)
            elif buildstore.requeue(session, build_id, src, actor="sweeper", reason="lease expired"):
                report.requeued.append(build_id)
        report.released = followers.release_orphans(session, BATCH)
    # After the commit: a worker must never receive an id whose row it cannot yet see.
    for build_id in [*report.resent, *report.requeued, *report.released]:
        try:
            enqueue_conversion(s.redis_url, s.visibility_timeout, str(build_id))
        except QueueUnavailable:
            log.warning("sweeper could not publish build_id=%s; next pass retries", build_id)
            break
    try:
        if heal_unacked_mutex(s.redis_url):
            # An alert, not just a repair: something crashed inside kombu's restore path (RELIABILITY.md §B 19).
            log.error("ALERT broker %s had no TTL and blocked restoring unacked messages; removed it",
                      UNACKED_MUTEX_KEY)
            report.mutex_healed = 1
    except QueueUnavailable:
        log.warning("sweeper could not check %s; next pass retries", UNACKED_MUTEX_KEY)
    # This host's scratch dirs of attempts whose lease is gone (killed workers leave them behind).
    with session_scope(s.database_url) as session:
        report.reaped = len(reap_dead(s.state_dir, session))
    return report
