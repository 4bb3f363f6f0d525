"""A deploy's cold shutdown lands while the worker's final transition (PUSHING -> SUCCEEDED) is in its COMMIT
(RELIABILITY.md §A 5). The commit window is made as long as the test wants by a deferred constraint trigger of the
test's own database, which waits at COMMIT time for an advisory lock the test holds.

The cold shutdown's cancel is a SIGTERM to the pool child, whose handler (billiard's, raising SystemExit) runs only
once libpq returns: the shutdown waits for the COMMIT, which either completes (the transition is durable, yet the task
never returns and its message is handed back) or fails (the test cuts the connection: rolled back). The restored
message is delivered again: it must see what was committed and neither push nor transition twice."""
from __future__ import annotations

import signal
import time
import uuid
from collections.abc import Iterator

import psycopg2
import pytest
from sqlalchemy import func, select

from common.settings import Settings
from common.store.engine import session_scope
from common.store.models import Task
from tests.fixtures.images import push_test_image

from .brokerview import drained, queued_conversions, unacked_conversions
from .conftest import TERMINAL, api_for, events, row, wait_for, wait_terminal, with_hosts

pytestmark = pytest.mark.integration
HOLD_KEY = 8_140_005  # the advisory lock the success COMMIT waits for


@pytest.fixture
def held_success_commit(rel_settings: Settings) -> Iterator[psycopg2.extensions.connection]:
    """Every transaction that moves a build to SUCCEEDED waits, in its COMMIT, for the lock the yielded
    connection holds (released by `pg_advisory_unlock`, or when the connection closes)."""
    holder = psycopg2.connect(rel_settings.database_url)
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute(f"""
            CREATE FUNCTION test_hold_success() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock({HOLD_KEY}); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER test_hold_success AFTER UPDATE ON builds
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW
                WHEN (NEW.conversion_state = 'SUCCEEDED' AND OLD.conversion_state <> 'SUCCEEDED')
                EXECUTE FUNCTION test_hold_success();
            SELECT pg_advisory_lock({HOLD_KEY});""")
    try:
        yield holder
    finally:
        holder.close()


def _committing(s: Settings) -> list[int]:
    """Backends of this database waiting on the held lock inside a COMMIT."""
    with psycopg2.connect(s.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND wait_event = 'advisory' "
                    "AND query ILIKE 'COMMIT%%'")
        return [int(r[0]) for r in cur.fetchall()]


def _tasks_of(s: Settings, build_id: str) -> int:
    with session_scope(s.database_url) as session:
        return session.execute(select(func.count()).select_from(Task)
                               .where(Task.build_id == uuid.UUID(build_id))).scalar_one()


@pytest.mark.parametrize("commit", ["lands", "rolls_back"])
def test_cold_shutdown_inside_the_success_commit_redelivery_neither_pushes_nor_transitions_twice(
        registry, hostile_front, rel_settings, own_redis, stack, held_success_commit, commit: str):
    image = push_test_image(registry, f"rel/incommit-{uuid.uuid4().hex[:6]}", "1")
    out = hostile_front(registry.host)  # counts the output pushes
    s = with_hosts(rel_settings, registry.host, out.host)
    api = api_for(s)
    procs = stack(s)
    victim = procs.worker("victim", NITROCONV_SOFT_SHUTDOWN_TIMEOUT="1")
    build_id = api.submit(f"{registry.host}/{image.repo}:1", f"{out.host}/rel/incommit-out-{uuid.uuid4().hex[:6]}:1")
    (backend,) = wait_for(lambda: _committing(s), 60, "the worker's success COMMIT to wait")  # type: ignore[misc]
    pushes = out.count("PUT", "/manifests/")
    assert pushes == 1

    # The deploy's stop, as the systemd unit sends it: SIGTERM (warm), then SIGQUIT (soft, then cold shutdown).
    victim.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "Warm shutdown" in victim.text(), 30, "the warm shutdown to begin")
    victim.proc.send_signal(signal.SIGQUIT)
    wait_for(lambda: "Initiating Soft Shutdown" in victim.text(), 30, "the soft shutdown to begin")
    time.sleep(3)  # the 1 s soft shutdown is over and the child was told to stop: it is still in its COMMIT
    assert victim.proc.poll() is None and _committing(s) == [backend]
    assert row(s, build_id).conversion_state == "PUSHING"  # what others see while the COMMIT is pending

    with held_success_commit.cursor() as cur:
        if commit == "rolls_back":
            cur.execute("SELECT pg_terminate_backend(%s)", (backend,))
            wait_for(lambda: not _committing(s), 30, "the cut transaction to be gone")
        cur.execute(f"SELECT pg_advisory_unlock({HOLD_KEY})")
    victim.proc.wait(timeout=45)
    wait_for(lambda: not victim.children(), 10, "the pool child to be gone")
    redis = own_redis.client()
    assert unacked_conversions(redis) == [] and queued_conversions(redis) >= 1  # the message was handed back
    if commit == "lands":
        landed = row(s, build_id)
        assert landed.conversion_state == "SUCCEEDED"  # committed, though the task never returned
    else:
        assert row(s, build_id).conversion_state == "PUSHING"

    after = procs.worker("after")
    procs.beat()
    build = wait_terminal(s, build_id, timeout=90)
    wait_for(lambda: drained(redis), 60, "the redelivered message to be acked")
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    trail = events(s, build_id)
    assert sum(dst in TERMINAL for _, dst, _ in trail) == 1
    assert _tasks_of(s, build_id) == 1
    if commit == "lands":
        # The redelivery saw SUCCEEDED and did nothing: no second attempt, push or transition.
        assert f"conversion build_id={build_id} outcome=skipped" in after.text()
        assert (build.attempts, build.output_digest) == (1, landed.output_digest)
        assert out.count("PUT", "/manifests/") == 1
    else:
        # Nothing was committed: the build was converted again, once, and pushed the same reproducible manifest.
        assert build.attempts == 2
        assert out.count("PUT", "/manifests/") == 2
        assert ("PUSHING", "QUEUED", "sweeper") in trail
