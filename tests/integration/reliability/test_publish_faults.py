"""Publishing versus committing (RELIABILITY.md §B 14, 15): the API publishes only after its commit, a worker
handed an id whose row it cannot see (or whose row is not QUEUED) acks without side effects, and a message
published several times converts once."""
from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator

import psycopg2
import pytest

from common.queue.publish import enqueue_conversion
from common.queue.tasknames import QUEUE
from common.settings import Settings
from tests.fixtures.images import push_test_image

from .brokerview import drained
from .conftest import TERMINAL, RedisServer, api_for, events, row, wait_for, wait_terminal, with_hosts

pytestmark = pytest.mark.integration
HOLD_KEY = 8_140_014  # the advisory lock the test holds to keep a commit waiting


@pytest.fixture
def held_commits(rel_settings: Settings) -> Iterator[psycopg2.extensions.connection]:
    """A deferred constraint trigger on `builds`: every inserting transaction's COMMIT waits for the advisory
    lock HOLD_KEY, which the yielded connection holds. The window between "row inserted" and "row visible
    to others" becomes as long as the test wants."""
    holder = psycopg2.connect(rel_settings.database_url)
    holder.autocommit = True
    with holder.cursor() as cur:
        cur.execute(f"""
            CREATE FUNCTION test_hold_commit() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock({HOLD_KEY}); RETURN NULL; END $$;
            CREATE CONSTRAINT TRIGGER test_hold_commit AFTER INSERT ON builds
                DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION test_hold_commit();
            SELECT pg_advisory_lock({HOLD_KEY});""")
    try:
        yield holder
    finally:
        holder.close()  # releases the lock; the trigger goes with the test's own database


def _commits_waiting(s: Settings) -> int:
    with psycopg2.connect(s.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'")
        return int(cur.fetchone()[0])


def _visible_builds(s: Settings) -> int:
    with psycopg2.connect(s.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM builds")
        return int(cur.fetchone()[0])


def test_publish_api_publishes_only_after_its_commit(registry, rel_settings, own_redis: RedisServer,
                                                     held_commits):
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    image = push_test_image(registry, f"rel/pub-{uuid.uuid4().hex[:6]}", "1")
    redis = own_redis.client()
    results: list[str] = []
    submit = threading.Thread(target=lambda: results.append(api.submit(
        f"{registry.host}/{image.repo}:1", f"{registry.host}/rel/pub-out-{uuid.uuid4().hex[:6]}:1")))
    submit.start()
    try:
        wait_for(lambda: _commits_waiting(s) == 1, 30, "the API's commit to wait on the held lock")
        # The row is inserted but not committed: a message now would name a row no worker can see.
        assert _visible_builds(s) == 0
        assert redis.llen(QUEUE) == 0, "published before the commit"
    finally:
        with held_commits.cursor() as cur:
            cur.execute(f"SELECT pg_advisory_unlock({HOLD_KEY})")
        submit.join(30)
    (build_id,) = results
    assert row(s, build_id).conversion_state == "QUEUED"
    assert redis.llen(QUEUE) == 1  # and published right after it


def test_publish_worker_given_an_invisible_or_ended_build_acks_without_side_effects(
        registry, rel_settings, own_redis: RedisServer, stack):
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    image = push_test_image(registry, f"rel/pub-{uuid.uuid4().hex[:6]}", "1")
    procs = stack(s)
    worker = procs.worker()
    done = wait_terminal(s, api.submit(f"{registry.host}/{image.repo}:1",
                                       f"{registry.host}/rel/pub-out-{uuid.uuid4().hex[:6]}:1"))
    assert done.conversion_state == "SUCCEEDED"
    redis = own_redis.client()
    wait_for(lambda: drained(redis), 30, "the first delivery to be acked")
    trail = events(s, str(done.id))

    # A row inserted by a transaction that has not committed (and then rolls back): the publish-before-
    # commit bug. The worker cannot see it, so it must not create, convert or mark anything.
    ghost = uuid.uuid4()
    writer = psycopg2.connect(s.database_url)
    try:
        with writer.cursor() as cur:
            cur.execute("CREATE TEMP TABLE ghost ON COMMIT DROP AS SELECT * FROM builds WHERE id = %s",
                        (str(done.id),))
            cur.execute("UPDATE ghost SET id = %s, conversion_state = 'QUEUED', attempts = 0, "
                        "idempotency_key = NULL, pending_task_id = NULL, lease_owner = NULL", (str(ghost),))
            cur.execute("INSERT INTO builds SELECT * FROM ghost")
        for build_id in (ghost, uuid.uuid4(), done.id):  # uncommitted, never existed, already SUCCEEDED
            enqueue_conversion(s.redis_url, s.visibility_timeout, str(build_id))
        wait_for(lambda: drained(redis), 60, "the three deliveries to be acked")
    finally:
        writer.rollback()
        writer.close()
    assert worker.text().count("outcome=skipped") == 3
    with psycopg2.connect(s.database_url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM builds WHERE id = %s", (str(ghost),))
        assert cur.fetchone()[0] == 0
        cur.execute("SELECT count(*) FROM build_events WHERE build_id <> %s", (str(done.id),))
        assert cur.fetchone()[0] == 0
    after = row(s, str(done.id))
    assert (after.conversion_state, after.attempts, after.output_digest) == ("SUCCEEDED", 1, done.output_digest)
    assert events(s, str(done.id)) == trail


def test_publish_same_message_three_times_converts_once(registry, hostile_front, rel_settings,
                                                         own_redis: RedisServer, stack):
    image = push_test_image(registry, f"rel/dup-{uuid.uuid4().hex[:6]}", "1")
    out = hostile_front(registry.host)  # counts the pushes
    s = with_hosts(rel_settings, registry.host, out.host)
    api = api_for(s)
    redis = own_redis.client()
    build_id = api.submit(f"{registry.host}/{image.repo}:1", f"{out.host}/rel/dup-out-{uuid.uuid4().hex[:6]}:1")
    for _ in range(2):  # an outbox relay that crashed twice between "published" and "marked sent"
        enqueue_conversion(s.redis_url, s.visibility_timeout, build_id)
    assert redis.llen(QUEUE) == 3
    procs = stack(s)
    procs.worker("a")
    procs.worker("b")  # two consumers, so duplicates can really run side by side
    build = wait_terminal(s, build_id)
    wait_for(lambda: drained(redis), 60, "every copy to be acked")
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert build.attempts == 1
    trail = events(s, build_id)
    assert [dst for _, dst, _ in trail].count("PULLING") == 1
    assert sum(dst in TERMINAL for _, dst, _ in trail) == 1
    assert out.count("PUT", "/manifests/") == 1
