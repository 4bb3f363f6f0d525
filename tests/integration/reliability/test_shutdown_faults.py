"""Shutdowns at the worst moment, with real worker processes: a deploy's cold shutdown mid-build, and a worker
lost while the final status transition commits (RELIABILITY.md §A 4, 5).

Terminal states, attempt counts and the event trail are what is asserted: never which worker ran what.
"""
from __future__ import annotations

import os
import signal
import uuid
from dataclasses import dataclass

import psycopg2
import pytest
import requests
from sqlalchemy import func, select

from common.settings import Settings
from common.store.engine import session_scope
from common.store.models import Task
from tests.fixtures.hostile import HostileRegistry
from tests.fixtures.images import push_test_image

from .brokerview import drained, queued_conversions, unacked_conversions, wait_restorable
from .conftest import (
    TERMINAL,
    Proc,
    Stack,
    api_for,
    events,
    row,
    scratch_dirs,
    wait_for,
    wait_terminal,
    with_hosts,
    with_short_visibility,
)
from .gate import Gate, gated_pull

pytestmark = pytest.mark.integration


def _terminal_count(s, build_id: str) -> int:  # noqa: ANN001
    return sum(dst in TERMINAL for _, dst, _ in events(s, build_id))


def _tasks_of(s, build_id: str) -> int:  # noqa: ANN001
    with session_scope(s.database_url) as session:
        return session.execute(select(func.count()).select_from(Task)
                               .where(Task.build_id == uuid.UUID(build_id))).scalar_one()


def _tag_digest(registry, ref: str) -> str | None:  # noqa: ANN001
    repo, tag = ref.split("/", 1)[1].rsplit(":", 1)
    resp = requests.head(f"{registry.url}/v2/{repo}/manifests/{tag}", timeout=10,
                         headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                                                 "application/vnd.docker.distribution.manifest.v2+json"})
    return resp.headers.get("Docker-Content-Digest") if resp.status_code == 200 else None


def test_worker_cold_shutdown_mid_build_restores_the_message_and_ends_once(
        registry, hostile_front, rel_settings, own_redis, stack):
    pull = gated_pull(registry, hostile_front, rel_settings, "cold")
    s, gate = pull.settings, pull.gate
    api = api_for(s)
    procs = stack(s)
    leaving = procs.worker("leaving", NITROCONV_SOFT_SHUTDOWN_TIMEOUT="2")
    build_id = api.submit(pull.src, f"{registry.host}/rel/cold-out-{uuid.uuid4().hex[:6]}:1")
    try:
        wait_for(lambda: gate.held == 1 and row(s, build_id).conversion_state == "PULLING", 60, "the pull to hang")
        redis = own_redis.client()
        assert len(unacked_conversions(redis)) == 1  # reserved by the leaving worker, not acked (acks_late)
        leaving.proc.send_signal(signal.SIGTERM)  # the deploy's polite stop...
        wait_for(lambda: "Warm shutdown" in leaving.text(), 30, "the warm shutdown to begin")
        leaving.proc.send_signal(signal.SIGQUIT)  # ...and its impatient second signal: cold shutdown
        leaving.proc.wait(timeout=45)
        wait_for(lambda: not leaving.children(), 10, "the pool child to be gone")
        # The soft shutdown waited 2 s, then cancelled the conversion and gave its message back to Redis.
        assert unacked_conversions(redis) == []
        assert queued_conversions(redis) >= 1
        assert row(s, build_id).conversion_state == "PULLING"  # the dead attempt's lease still says so
        procs.worker("next")
        procs.beat()
        build = wait_terminal(s, build_id, timeout=90)
    finally:
        gate.open.set()
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert build.attempts == 2  # one cancelled attempt, one that converted: not lost, not done twice
    assert _terminal_count(s, build_id) == 1 and _tasks_of(s, build_id) == 1
    wait_for(lambda: scratch_dirs(s) == [], 30, "the cancelled attempt's scratch dir to be reaped")


@dataclass(frozen=True)
class _Push:
    """A build whose worker ("victim") hangs in PUSHING at the manifest PUT of the output (sent through a front),
    with a broker visibility short enough for its unacked message to come back within the test."""

    s: Settings
    out: HostileRegistry
    gate: Gate
    dst: str
    procs: Stack
    victim: Proc
    build_id: str

    def hanging(self) -> bool:
        return self.gate.held == 1 and row(self.s, self.build_id).conversion_state == "PUSHING"


def _push_that_hangs(registry, hostile_front, rel_settings, stack) -> _Push:  # noqa: ANN001
    image = push_test_image(registry, f"rel/commit-{uuid.uuid4().hex[:6]}", "1")
    out = hostile_front(registry.host)
    gate = Gate()
    out.on("PUT", "/manifests/", gate, times=1)
    s = with_short_visibility(with_hosts(rel_settings, registry.host, out.host))
    dst = f"{out.host}/rel/commit-out-{uuid.uuid4().hex[:6]}:1"
    api = api_for(s)
    procs = stack(s)
    victim = procs.worker("victim")
    return _Push(s, out, gate, dst, procs, victim, api.submit(f"{registry.host}/{image.repo}:1", dst))


def _lock_waiters(s) -> int:  # noqa: ANN001
    with psycopg2.connect(s.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND query ILIKE 'UPDATE builds%%SUCCEEDED%%'")
        return int(cur.fetchone()[0])


def test_worker_lost_while_success_commit_waits_redoes_the_build_once(
        registry, hostile_front, rel_settings, own_redis, stack):
    push = _push_that_hangs(registry, hostile_front, rel_settings, stack)
    s, gate, build_id = push.s, push.gate, push.build_id
    blocker = psycopg2.connect(s.database_url)
    try:
        wait_for(push.hanging, 60, "the worker to hang in the push")
        # The test's transaction holds the build row: the worker's PUSHING -> SUCCEEDED UPDATE queues behind it.
        with blocker.cursor() as cur:
            cur.execute("SELECT id FROM builds WHERE id = %s FOR UPDATE", (build_id,))
        gate.open.set()
        wait_for(lambda: _lock_waiters(s) >= 1, 30, "the worker's final UPDATE to wait on the row lock")
        push.victim.kill()  # lost mid-commit: its transaction can never commit now
        blocker.rollback()
        wait_for(lambda: _lock_waiters(s) == 0, 30, "the dead worker's transaction to be gone")
        assert row(s, build_id).conversion_state == "PUSHING"  # the transition did not land
        push.procs.worker("next")
        push.procs.beat()
        build = wait_terminal(s, build_id, timeout=90)
    finally:
        gate.open.set()
        blocker.close()
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert build.attempts == 2
    assert _terminal_count(s, build_id) == 1 and _tasks_of(s, build_id) == 1
    # Both attempts pushed the same reproducible manifest: the tag names the digest the build recorded.
    assert _tag_digest(registry, f"{registry.host}/{push.dst.split('/', 1)[1]}") == build.output_digest
    trail = events(s, build_id)
    assert ("PUSHING", "QUEUED", "sweeper") in trail


def test_worker_lost_after_success_commit_before_ack_does_nothing_on_redelivery(
        registry, hostile_front, rel_settings, own_redis, stack):
    push = _push_that_hangs(registry, hostile_front, rel_settings, stack)
    s, gate, build_id = push.s, push.gate, push.build_id
    try:
        wait_for(push.hanging, 60, "the worker to hang in the push")
        # Freeze the main process (it holds the broker connection and would ack): the pool child still
        # finishes the push and commits SUCCEEDED, but the ack can never be sent.
        os.kill(push.victim.proc.pid, signal.SIGSTOP)
        gate.open.set()
        wait_for(lambda: row(s, build_id).conversion_state == "SUCCEEDED", 60, "the commit to land")
        push.victim.kill()
    finally:
        gate.open.set()
    done = row(s, build_id)
    trail, pushes = events(s, build_id), push.out.count("PUT", "/manifests/")
    redis = own_redis.client()
    assert len(unacked_conversions(redis)) == 1  # the delivery was never acked
    wait_restorable(redis, s.visibility_timeout)
    again = push.procs.worker("again")  # restores the expired delivery at start and runs it
    wait_for(lambda: f"conversion build_id={build_id} outcome=skipped" in again.text(), 60,
             "the redelivered message to run")
    wait_for(lambda: drained(redis), 30,
             "the redelivery to be acked")
    after = row(s, build_id)
    assert (after.conversion_state, after.attempts, after.output_digest) == ("SUCCEEDED", 1, done.output_digest)
    assert events(s, build_id) == trail  # no second transition...
    assert push.out.count("PUT", "/manifests/") == pushes == 1  # ...no second push...
    assert _tasks_of(s, build_id) == 1  # ...and no second approval task
