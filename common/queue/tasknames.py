"""Stable Celery task names: the API and the sweeper address worker tasks by these strings only."""
from __future__ import annotations

CONVERT = "nitroconv.convert.v1"  # args: [build_id]
SWEEP = "nitroconv.sweep.v1"  # no args
# Queues per host class: conversions run on Nitro hosts (`convert`); the sweeper on any worker (`maintenance`).
QUEUE = "convert"
MAINTENANCE = "maintenance"
QUEUES = (QUEUE, MAINTENANCE)
