"""Celery entry points: thin wrappers that hand a build id to the runner or run the sweeper."""
from __future__ import annotations

import logging
import uuid

from celery import Task

from common.queue import enqueue_conversion
from common.settings import get_settings
from common.tasknames import CONVERT, SWEEP
from worker.celery_app import app
from worker.engine import PipelineEngine
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
    result = run(bid, s, PipelineEngine(s))
    log.info("conversion build_id=%s outcome=%s", build_id, result.outcome)
    if result.retry_in is not None:
        # The row is already QUEUED again; if this publish is lost the sweeper re-sends it.
        enqueue_conversion(s.redis_url, s.visibility_timeout, build_id, countdown=result.retry_in)
    return result.outcome


@app.task(name=SWEEP, ignore_result=True)
def sweep_stuck() -> dict[str, int]:
    """Re-send lost enqueues and requeue conversions whose lease expired."""
    report = sweep(get_settings())
    counts = {k: len(v) for k, v in vars(report).items()}
    if any(counts.values()):
        log.info("sweep %s", counts)
    return counts
