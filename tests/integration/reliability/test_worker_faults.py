"""Worker faults with real processes: SIGKILL mid-conversion, a build that kills every worker, time limits,
and the scratch dirs dead attempts leave behind (RELIABILITY.md §A 1, 2, 3, 10)."""
from __future__ import annotations

import os
import signal
import uuid
from dataclasses import replace

import pytest

from .conftest import api_for, events, row, scratch_dirs, wait_for, wait_terminal
from .gate import gated_pull

pytestmark = pytest.mark.integration


def _setup(registry, hostile_front, rel_settings, *, times: int | None):  # noqa: ANN001, ANN202
    """A build whose first layer's download, through a front, waits on the returned gate (the first `times`
    requests for it; None: every one), so the worker is "mid-pull" for as long as the test wants."""
    pull = gated_pull(registry, hostile_front, rel_settings, "app", times=times)
    dst = f"{registry.host}/rel/out-{uuid.uuid4().hex[:6]}:1"
    return pull.settings, api_for(pull.settings), pull.src, dst, pull.gate


def _pulling(s, build_id: str, attempt: int):  # noqa: ANN001, ANN202
    return lambda: (b := row(s, build_id)).conversion_state == "PULLING" and b.attempts == attempt


def test_worker_sigkill_mid_pull_is_redone_by_another_worker(registry, hostile_front, rel_settings, stack):
    s, api, src, dst, gate = _setup(registry, hostile_front, rel_settings, times=1)
    procs = stack(s)
    first = procs.worker("first")
    build_id = api.submit(src, dst)
    wait_for(lambda: gate.held == 1 and _pulling(s, build_id, 1)(), 60, "the first attempt to hang in the pull")
    assert len(scratch_dirs(s)) == 1
    first.kill()
    procs.worker("second")
    procs.beat()
    build = wait_terminal(s, build_id)
    gate.open.set()

    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert build.attempts == 2 and build.pcr0
    trail = events(s, build_id)
    assert [t for _, t, _ in trail].count("SUCCEEDED") == 1
    assert sum(t in {"SUCCEEDED", "FAILED", "CANCELLED"} for _, t, _ in trail) == 1
    assert ("PULLING", "QUEUED", "sweeper") in trail  # the lease expired and the sweeper gave it back
    # The dead attempt's scratch dir (named by its lease token) was reaped; the live one cleaned itself.
    wait_for(lambda: scratch_dirs(s) == [], 30, "the dead attempt's scratch dir to be reaped")


def test_worker_poison_build_fails_after_max_attempts(registry, hostile_front, rel_settings, stack):
    s, api, src, dst, gate = _setup(registry, hostile_front, rel_settings, times=None)
    s = replace(s, max_attempts=2)
    procs = stack(s)
    procs.beat()
    build_id = api.submit(src, dst)
    try:
        for attempt in (1, 2):
            # This build "kills its worker" every time: the test plays the OOM killer at the same point.
            worker = procs.worker(f"victim{attempt}")
            wait_for(lambda: gate.held == attempt and _pulling(s, build_id, attempt)(), 60,  # noqa: B023
                     f"attempt {attempt} to hang in the pull")
            worker.kill()
        procs.worker("survivor")  # runs the sweeper; it must not get the conversion a third time
        build = wait_terminal(s, build_id, timeout=120)
    finally:
        gate.open.set()
    assert build.conversion_state == "FAILED" and build.error_code == "attempts_exhausted"
    assert build.attempts == 2 and build.approval_status == "REJECTED"
    assert gate.held == 2
    wait_for(lambda: scratch_dirs(s) == [], 30, "the dead attempts' scratch dirs to be reaped")


def test_worker_soft_time_limit_fails_timeout_and_cleans_scratch(registry, hostile_front, rel_settings, stack):
    s, api, src, dst, gate = _setup(registry, hostile_front, rel_settings, times=None)
    s = replace(s, soft_time_limit=4, time_limit=60)
    procs = stack(s)
    procs.worker()
    build_id = api.submit(src, dst)
    try:
        wait_for(lambda: scratch_dirs(s), 60, "the attempt to start")
        build = wait_terminal(s, build_id, timeout=60)
    finally:
        gate.open.set()
    assert build.conversion_state == "FAILED" and build.error_code == "timeout", build.error_message
    assert build.attempts == 1
    assert scratch_dirs(s) == []


def test_worker_hard_time_limit_fails_timeout_and_reaps_scratch(registry, hostile_front, rel_settings, stack):
    s, api, src, dst, gate = _setup(registry, hostile_front, rel_settings, times=None)
    s = replace(s, soft_time_limit=10, time_limit=14)
    procs = stack(s)
    worker = procs.worker()
    build_id = api.submit(src, dst)
    try:
        wait_for(lambda: gate.held == 1, 60, "the attempt to hang in the pull")
        # A child stuck where no signal reaches it (uninterruptible I/O, a C loop): the soft limit
        # cannot fire, so the main process must kill it at the hard limit and record the timeout.
        (child,) = worker.children()
        os.kill(child, signal.SIGSTOP)
        build = wait_terminal(s, build_id, timeout=60)
    finally:
        gate.open.set()
    assert build.conversion_state == "FAILED" and build.error_code == "timeout", build.error_message
    assert "hard limit" in (build.error_message or "")
    assert scratch_dirs(s) == []
    assert "Hard time limit" in worker.text()


def test_worker_stale_after_pause_never_moves_the_status_backwards(registry, hostile_front, rel_settings, stack):
    s, api, src, dst, gate = _setup(registry, hostile_front, rel_settings, times=1)
    procs = stack(s)
    stale = procs.worker("stale")
    build_id = api.submit(src, dst)
    wait_for(lambda: gate.held == 1 and _pulling(s, build_id, 1)(), 60, "the first attempt to hang in the pull")
    stale_fence = row(s, build_id).lease_owner
    # A whole-process pause (GC, swap storm, VM freeze) longer than the lease: the others think it is dead.
    os.killpg(stale.proc.pid, signal.SIGSTOP)
    try:
        procs.worker("fresh")
        procs.beat()
        build = wait_terminal(s, build_id)
        assert build.conversion_state == "SUCCEEDED" and build.attempts == 2
        before = events(s, build_id)
    finally:
        os.killpg(stale.proc.pid, signal.SIGCONT)
        gate.open.set()  # the stale attempt's pull now completes and it carries on where it was
    wait_for(lambda: f"build_id={build_id} outcome=lease_lost" in stale.text(), 60, "the stale attempt to notice")
    after = row(s, build_id)
    assert (after.conversion_state, after.attempts, after.pcr0) == ("SUCCEEDED", 2, build.pcr0)
    assert events(s, build_id) == before
    assert not any(actor == f"worker:{stale_fence}" for src_state, _, actor in before if src_state != "QUEUED")


def test_worker_warm_shutdown_finishes_its_conversion_and_leaves_the_queue_to_others(
        registry, hostile_front, rel_settings, stack):
    s, api, src, dst, gate = _setup(registry, hostile_front, rel_settings, times=1)
    procs = stack(s)
    leaving = procs.worker("leaving")
    running = api.submit(src, dst)
    wait_for(lambda: gate.held == 1 and _pulling(s, running, 1)(), 60, "the conversion to be mid-pull")
    leaving.proc.send_signal(signal.SIGTERM)  # a deploy: warm shutdown
    wait_for(lambda: "worker: Warm shutdown" in leaving.text(), 30, "the warm shutdown to begin")
    waiting = api.submit(src, f"{dst}-next")
    gate.open.set()
    assert leaving.proc.wait(timeout=120) == 0
    first = row(s, running)
    assert (first.conversion_state, first.attempts) == ("SUCCEEDED", 1)  # finished, not abandoned or redone
    assert row(s, waiting).conversion_state == "QUEUED"  # not taken by the leaving worker...
    procs.worker("next")
    second = wait_terminal(s, waiting)
    assert (second.conversion_state, second.attempts) == ("SUCCEEDED", 1)  # ...and not lost either
    assert scratch_dirs(s) == []
