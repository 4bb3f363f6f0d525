"""kombu's restore lock stuck without a TTL (RELIABILITY.md §B 19): no worker can restore unacked messages any
more. The sweeper alerts (an ERROR log line `ALERT broker unacked_mutex ...`) and removes the lock, so the lost
delivery is restored again; meanwhile Postgres (lease expiry, sweeper requeue) already saved the build."""
from __future__ import annotations

import time
import uuid
from typing import cast

import pytest

from common.queue.publish import UNACKED_MUTEX_KEY

from .brokerview import drained, queued_conversions, unacked_conversions, wait_restorable
from .conftest import (
    TERMINAL,
    RedisServer,
    api_for,
    events,
    row,
    wait_for,
    wait_terminal,
    with_short_visibility,
)
from .gate import gated_pull

pytestmark = pytest.mark.integration


def test_broker_stuck_unacked_mutex_alerts_is_broken_and_the_lost_delivery_comes_back(
        registry, hostile_front, rel_settings, own_redis: RedisServer, stack):
    pull = gated_pull(registry, hostile_front, rel_settings, "mutex")
    s, gate = with_short_visibility(pull.settings), pull.gate
    api = api_for(s)
    redis = own_redis.client()
    # What a restorer that crashed between SETNX and EXPIRE leaves behind: the lock, forever.
    redis.set(UNACKED_MUTEX_KEY, "crashed-restorer")
    procs = stack(s)
    victim = procs.worker("victim")
    build_id = api.submit(pull.src, f"{registry.host}/rel/mutex-out-{uuid.uuid4().hex[:6]}:1")
    try:
        wait_for(lambda: gate.held == 1 and row(s, build_id).conversion_state == "PULLING", 60, "the pull to hang")
        victim.kill()
        assert len(unacked_conversions(redis)) == 1
        wait_restorable(redis, s.visibility_timeout)
        survivor = procs.worker("survivor")  # its start-up restore pass finds the delivery due...
        time.sleep(3)
        # ...and cannot take the lock: the fault is real, the delivery stays lost in the unacked hash.
        assert len(unacked_conversions(redis)) == 1 and queued_conversions(redis) == 0
        assert row(s, build_id).conversion_state == "PULLING"
        procs.beat()
        build = wait_terminal(s, build_id, timeout=90)  # Postgres saved the build: lease expiry + sweeper
        wait_for(lambda: "ALERT broker unacked_mutex" in survivor.text(), 30, "the alert")
        # Broken, or held again by a live restorer (which always sets a TTL).
        assert redis.exists(UNACKED_MUTEX_KEY) == 0 or cast(int, redis.ttl(UNACKED_MUTEX_KEY)) > 0
        fresh = procs.worker("fresh")  # a restore pass now takes the lock and gives the old delivery back
        try:
            wait_for(lambda: drained(redis), 60, "the old delivery to drain")
        except AssertionError as exc:
            raise AssertionError(f"{exc}: unacked={unacked_conversions(redis)} queued={queued_conversions(redis)} "
                                 f"mutex ttl={redis.ttl(UNACKED_MUTEX_KEY)}\n{fresh.text()[-3000:]}") from None
    finally:
        gate.open.set()
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    after = row(s, build_id)
    assert (after.conversion_state, after.attempts) == ("SUCCEEDED", 2)  # the old delivery did nothing more
    assert sum(dst in TERMINAL for _, dst, _ in events(s, build_id)) == 1
