"""Stable Celery task names: the API and the sweeper address worker tasks by these strings only."""
from __future__ import annotations

CONVERT = "nitroconv.convert.v1"  # args: [build_id]
SWEEP = "nitroconv.sweep.v1"  # no args
QUEUE = "conversions"
