"""A deploy stops a worker mid-conversion (RELIABILITY.md §A 4), the way `systemctl stop` of
deploy/systemd/nitroconv-worker@.service does it: the unit's KillMode, KillSignal, Environment and
TimeoutStopSec, played on a real worker. The conversion either ends within NITROCONV_SOFT_SHUTDOWN_TIMEOUT, or its
message goes back to the queue and another worker converts it; no build is lost, none ends twice."""
from __future__ import annotations

import threading
import uuid

import pytest

from common.settings import Settings
from tests.fixtures.repo import REPO

from .brokerview import drained, queued_conversions, unacked_conversions
from .conftest import TERMINAL, api_for, events, row, scratch_dirs, wait_for, wait_terminal
from .gate import gated_pull
from .systemdstop import Stopped, stop_policy, systemctl_stop

pytestmark = pytest.mark.integration
UNIT = REPO / "deploy" / "systemd" / "nitroconv-worker@.service"
MARGIN = 15.0  # seconds a loaded CI box may add to a shutdown


def _scaled_timeout(soft: int) -> float:
    """The unit's TimeoutStopSec for a soft shutdown of `soft` s instead of the default's: the same slack after it
    (what follows the soft shutdown, cancelling and restoring, takes the same time whatever its length)."""
    return stop_policy(UNIT).timeout_stop_sec - Settings().soft_shutdown_timeout + soft


def test_deploy_unit_leaves_the_soft_shutdown_time_to_act():
    policy = stop_policy(UNIT)
    # Only the main process may get the stop signal: a pool child's SIGTERM is the default action (Celery resets
    # it in the children), so signalling the whole control group kills the running conversion at once.
    assert policy.kill_mode == "mixed"
    # systemd's SIGKILL must not cut the soft shutdown short, nor the cold shutdown that restores the message.
    assert policy.timeout_stop_sec >= Settings().soft_shutdown_timeout + 30


def test_deploy_stop_lets_a_conversion_ending_within_the_soft_timeout_finish(
        registry, hostile_front, rel_settings, own_redis, stack):
    soft = 12
    policy = stop_policy(UNIT)
    pull = gated_pull(registry, hostile_front, rel_settings, "stopfin")
    s, gate = pull.settings, pull.gate
    api = api_for(s)
    procs = stack(s)
    worker = procs.worker("leaving", NITROCONV_SOFT_SHUTDOWN_TIMEOUT=str(soft), **policy.environment)
    build_id = api.submit(pull.src, f"{registry.host}/rel/stopfin-out-{uuid.uuid4().hex[:6]}:1")
    stopped: list[Stopped] = []
    try:
        wait_for(lambda: gate.held == 1 and row(s, build_id).conversion_state == "PULLING", 60, "the pull to hang")
        stopping = threading.Thread(target=lambda: stopped.append(
            systemctl_stop(worker, policy, timeout_stop_sec=_scaled_timeout(soft))))
        stopping.start()
        wait_for(lambda: "shutdown (MainProcess)" in worker.text(), 30, "the worker to begin its shutdown")
        gate.open.set()  # the rest of the conversion takes a second or two: well within the soft shutdown
        stopping.join(_scaled_timeout(soft) + MARGIN)
    finally:
        gate.open.set()
    (done,) = stopped
    assert not done.sigkilled and done.seconds < soft + MARGIN, (done, worker.text()[-3000:])
    assert done.returncode == 0  # systemd records a clean stop, not a failed unit
    build = row(s, build_id)
    assert build.conversion_state == "SUCCEEDED", (build.conversion_state, build.error_code, build.error_message,
                                                   worker.text()[-3000:])
    assert build.attempts == 1  # the stopped worker finished it
    trail = events(s, build_id)
    assert sum(dst in TERMINAL for _, dst, _ in trail) == 1
    assert scratch_dirs(s) == []
    # Celery's soft shutdown sleeps its whole timeout in a signal handler, so the finished task's result may not
    # have been read and its message is restored rather than acked: a worker given it afterwards changes nothing.
    redis = own_redis.client()
    if not drained(redis):
        after = procs.worker("after")
        wait_for(lambda: drained(redis), 60, "the restored copy to be acked")
        assert f"conversion build_id={build_id} outcome=skipped" in after.text()
    assert (row(s, build_id).attempts, events(s, build_id)) == (1, trail)


def test_deploy_stop_requeues_a_conversion_outliving_the_soft_timeout_and_it_ends_once(
        registry, hostile_front, rel_settings, own_redis, stack):
    soft = 2
    policy = stop_policy(UNIT)
    pull = gated_pull(registry, hostile_front, rel_settings, "stopreq")
    s, gate = pull.settings, pull.gate
    api = api_for(s)
    procs = stack(s)
    worker = procs.worker("leaving", NITROCONV_SOFT_SHUTDOWN_TIMEOUT=str(soft), **policy.environment)
    build_id = api.submit(pull.src, f"{registry.host}/rel/stopreq-out-{uuid.uuid4().hex[:6]}:1")
    try:
        wait_for(lambda: gate.held == 1 and row(s, build_id).conversion_state == "PULLING", 60, "the pull to hang")
        redis = own_redis.client()
        assert len(unacked_conversions(redis)) == 1
        done = systemctl_stop(worker, policy, timeout_stop_sec=_scaled_timeout(soft))
        # The worker waited out its soft shutdown, cancelled the conversion and gave the message back itself:
        # systemd's SIGKILL (which would leave it unacked until the visibility timeout) was never needed.
        assert not done.sigkilled and done.seconds < soft + MARGIN, (done, worker.text()[-3000:])
        assert done.seconds >= soft - 0.5  # and it did give the conversion its soft shutdown time
        assert done.returncode == 0
        assert unacked_conversions(redis) == []
        assert queued_conversions(redis) >= 1
        procs.worker("next")
        procs.beat()
        build = wait_terminal(s, build_id, timeout=90)
    finally:
        gate.open.set()
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert build.attempts == 2  # one cancelled attempt, one that converted: not lost, not done twice
    assert sum(dst in TERMINAL for _, dst, _ in events(s, build_id)) == 1
    wait_for(lambda: scratch_dirs(s) == [], 30, "the cancelled attempt's scratch dir to be reaped")
