"""What kombu's Redis transport holds for the conversion queue: reserved-but-unacked deliveries and their age.

The `unacked` hash also holds the sweeper's reserved messages (acks_late applies to every task), so counts are
filtered by routing key."""
from __future__ import annotations

import json
import time
from typing import Any, cast

from common.queue.tasknames import QUEUE


def unacked_conversions(redis: Any) -> list[bytes]:
    """Delivery tags of reserved, not yet acked conversion messages."""
    tags = []
    for tag, raw in cast(dict[bytes, bytes], redis.hgetall("unacked")).items():
        _message, _exchange, routing_key = json.loads(raw)
        if routing_key == QUEUE:
            tags.append(tag)
    return tags


def queued_conversions(redis: Any) -> int:
    return int(redis.llen(QUEUE))


def drained(redis: Any) -> bool:
    return not unacked_conversions(redis) and queued_conversions(redis) == 0


def wait_restorable(redis: Any, visibility_timeout: int) -> None:
    """Sleep until every unacked conversion delivery is older than the visibility timeout (kombu restores
    only those)."""
    tags = set(unacked_conversions(redis))
    assert tags, "no unacked conversion delivery: it was acked (or never reserved)"
    scores = [score for tag, score in cast(list[tuple[bytes, float]],
                                           redis.zrange("unacked_index", 0, -1, withscores=True)) if tag in tags]
    delay = max(scores) + visibility_timeout + 1 - time.time()
    if delay > 0:
        time.sleep(delay)
