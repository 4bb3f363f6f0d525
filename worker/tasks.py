"""Celery entry points: thin wrappers that hand a build id to the runner or run the sweeper."""
from __future__ import annotations

import logging
import uuid

from celery import Task
from sqlalchemy import select
from sqlalchemy.exc import DBAPIError

from common import logs
from common.errors import DatabaseUnavailable
from common.queue.publish import enqueue_conversion
from common.queue.tasknames import CONVERT, SWEEP
from common.settings import Settings, get_settings
from common.store.engine import is_connection_error, session_scope
from common.store.models import Build
from worker.celery_app import app
from worker.engine import PipelineEngine
from worker.lifecycle import forget_claim, note_claim
from worker.metrics import MeteredEngine, record_outcome
from worker.runner import run
from worker.sweeper import sweep

log = logging.getLogger(__name__)


@app.task(name=CONVERT, bind=True, acks_late=True, reject_on_worker_lost=True)
def convert(self: Task, build_id: str) -> str:
    """Run one attempt of the conversion of `build_id` (the message carries nothing else)."""
    try:
        bid = uuid.UUID(build_id)
    except (ValueError, TypeError):
        log.warning("dropping malformed build id %r", build_id)
        return "skipped"
    s = get_settings()
    with logs.bound(build_id=bid):
        return _convert(self, bid, s)


def _convert(self: Task, bid: uuid.UUID, s: Settings) -> str:
    task_id = str(self.request.id or bid)
    try:
        result = run(bid, s, MeteredEngine(PipelineEngine(s)),
                     on_claim=lambda claimed: note_claim(s.state_dir, task_id, claimed))
    except (DBAPIError, DatabaseUnavailable) as exc:
        if isinstance(exc, DBAPIError) and not is_connection_error(exc):
            raise
        # Postgres is away: nothing was claimed (or the lease expires and the sweeper requeues it).
        # Back off and try again instead of failing the delivery; the sweeper covers a lost retry.
        countdown = min(60.0, 2.0 ** min(self.request.retries, 6))
        log.warning("database unavailable build_id=%s; retrying in %.0fs", bid, countdown)
        raise self.retry(countdown=countdown, max_retries=None) from None
    finally:
        forget_claim(s.state_dir, task_id)
    claimed = result.build_id or bid
    build_id = str(claimed)
    log.info("conversion build_id=%s outcome=%s", build_id, result.outcome)
    record_outcome(result.outcome, _error_code(s, claimed) if result.outcome == "failed" else None)
    if result.retry_in is not None:
        # The row is already QUEUED again; if this publish is lost the sweeper re-sends it.
        enqueue_conversion(s.redis_url, s.visibility_timeout, build_id, countdown=result.retry_in)
    return result.outcome


def _error_code(s: Settings, build_id: uuid.UUID) -> str | None:
    """The code the failed attempt recorded (the metric's label); None when the database cannot say."""
    try:
        with session_scope(s.database_url) as session:
            return session.execute(select(Build.error_code).where(Build.id == build_id)).scalar_one_or_none()
    except DBAPIError:
        return None


@app.task(name=SWEEP, ignore_result=True)
def sweep_stuck() -> dict[str, int]:
    """Re-send lost enqueues and requeue conversions whose lease expired."""
    report = sweep(get_settings())
    counts = {k: v if isinstance(v, int) else len(v) for k, v in vars(report).items()}
    if any(counts.values()):
        log.info("sweep %s", counts)
    return counts
