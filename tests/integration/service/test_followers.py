"""Identical requests in flight are converted once (migration 0012): real API, real worker process, real registries.

A submission identical to a QUEUED, unclaimed build of its app waits for it (no broker message); the leader's worker
serves the waiting builds whose credentials are the leader's; every other end releases them to convert on their own,
and the sweeper releases those a leader left behind.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest
from redis import Redis
from sqlalchemy import text

from api.app import create_app
from common.queue.tasknames import QUEUE
from common.settings import Settings
from common.store import builds as buildstore
from common.store.engine import session_scope
from tests.fixtures.images import push_test_image
from tests.fixtures.service import new_tenant
from worker.sweeper import sweep

from .conftest import settings_for_own_worker, start_worker
from .helpers import convert_request, submit, wait_ended

pytestmark = pytest.mark.integration


class Mod(NamedTuple):
    s: Settings
    client: Any
    registry: Any
    basic: Any


@pytest.fixture(scope="module")
def mod(service_settings: Settings, registry, basic_registry) -> Iterator[Mod]:  # noqa: ANN001
    s = settings_for_own_worker(service_settings, registry.host, basic_registry.host)
    yield Mod(s, create_app(s).test_client(), registry, basic_registry)


def _hex() -> str:
    return uuid.uuid4().hex[:8]


def _waits_for(s: Settings, build_ids: list[str]) -> dict[str, str | None]:
    with session_scope(s.database_url) as session:
        rows = session.execute(text("SELECT id::text, waits_for::text FROM builds WHERE id::text = ANY(:ids)"),
                               {"ids": build_ids}).all()
    return {row[0]: row[1] for row in rows}


def _events(s: Settings, build_id: str) -> list[tuple[str, str, str, str, str | None]]:
    with session_scope(s.database_url) as session:
        return [tuple(r) for r in session.execute(text(  # type: ignore[misc]
            "SELECT machine, from_state, to_state, actor, reason FROM build_events WHERE build_id::text = :id "
            "ORDER BY id"), {"id": build_id})]


def _converted(mod: Mod, tenant, ids: list[str]) -> list[dict]:  # noqa: ANN001
    """Start a worker, wait for every build to end through the API, stop the worker."""
    worker = start_worker(mod.s, f"follow{_hex()}")
    try:
        return [wait_ended(mod.client, tenant.headers(), b) for b in ids]
    finally:
        worker.stop()


def _scene(mod: Mod, name: str) -> tuple[str, str, Any, str]:
    """A fresh image on the anonymous registry, an output name for it, a tenant and its app."""
    image = push_test_image(mod.registry, f"follow/{name}-{_hex()}", "1")
    tenant = new_tenant(mod.s, mod.client)
    return (f"{mod.registry.host}/{image.repo}:1", f"{mod.registry.host}/follow/{name}-out-{_hex()}:1", tenant,
            tenant.create_app())


def test_identical_submissions_in_flight_are_converted_once(mod: Mod):
    s, client = mod.s, mod.client
    src, dst, tenant, app_id = _scene(mod, "app")
    redis = Redis.from_url(s.redis_url)
    queued = redis.llen(QUEUE)

    ids = [submit(client, tenant.headers("WRITER"), convert_request(app_id, src, dst)) for _ in range(4)]
    assert redis.llen(QUEUE) - queued == 1, "only the first of identical submissions is published"
    waits = _waits_for(s, ids)
    assert waits[ids[0]] is None and all(waits[b] == ids[0] for b in ids[1:]), waits
    # Anything that changes the result does not wait: another option, another app.
    other = submit(client, tenant.headers("WRITER"), convert_request(app_id, src, dst, env="GREETING=other"))
    elsewhere = submit(client, tenant.headers("WRITER"), convert_request(tenant.create_app(), src, dst))
    assert _waits_for(s, [other, elsewhere]) == {other: None, elsewhere: None}
    assert redis.llen(QUEUE) - queued == 3

    leader, *followers = _converted(mod, tenant, ids)
    assert leader["conversion"]["state"] == "SUCCEEDED", leader["conversion"]
    assert leader["conversion"]["reused_from"] is None
    worker_actor = _events(s, ids[0])[-2][3]  # PUSHING -> SUCCEEDED, by the leader's worker
    assert worker_actor.startswith("worker:")
    tasks = {leader["pending_task_id"]}
    for build in followers:
        c = build["conversion"]
        assert c["state"] == "SUCCEEDED" and c["reused_from"] == ids[0], c
        for key in ("output_digest", "eif_sha256", "input_digest"):
            assert c[key] == leader["conversion"][key], key
        assert build["attributes"]["eif"]["nitro_enclave"] == leader["attributes"]["eif"]["nitro_enclave"]
        assert build["status"]["status"] == "PENDING" and build["pending_task_id"] not in tasks
        tasks.add(build["pending_task_id"])
        events = _events(s, build["build_id"])
        assert [(e[1], e[2]) for e in events if e[0] == "conversion"] == [
            ("QUEUED", "PULLING"), ("PULLING", "BUILDING"), ("BUILDING", "MEASURING"), ("MEASURING", "PUSHING"),
            ("PUSHING", "SUCCEEDED")]
        assert {e[3] for e in events if e[0] == "conversion"} == {worker_actor}
        assert all(e[4] == f"served by the identical build {ids[0]}" for e in events if e[0] == "conversion")
        assert ("task", "", "INPROGRESS") in [(e[0], e[1], e[2]) for e in events]
    # A served build is approved like any other.
    task = followers[0]["pending_task_id"]
    resp = client.patch(f"/v1/tasks/{task}", json={"status": "APPROVED"}, headers=tenant.headers("MANAGER"))
    assert resp.status_code == 200, resp.json
    assert wait_ended(client, tenant.headers(), followers[0]["build_id"])["status"]["status"] == "WHITELISTED"


def test_a_follower_with_other_credentials_converts_on_its_own(mod: Mod):
    s, client, basic, registry = mod.s, mod.client, mod.basic, mod.registry
    image = push_test_image(basic, f"follow/private-{_hex()}", "1")
    src, dst = f"{basic.host}/{image.repo}:1", f"{registry.host}/follow/p-{_hex()}:1"
    tenant = new_tenant(s, client)
    app_id = tenant.create_app()
    good = {"username": basic.username, "password": basic.password}
    bad = {"username": basic.username, "password": "wrong-password"}  # same username: same fingerprint and columns
    ids = [submit(client, tenant.headers("WRITER"), convert_request(app_id, src, dst, auth=auth))
           for auth in (good, bad, good)]
    waits = _waits_for(s, ids)
    assert waits[ids[1]] == ids[0] and waits[ids[2]] == ids[0], waits

    leader, stranger, twin = _converted(mod, tenant, ids)
    assert leader["conversion"]["state"] == "SUCCEEDED", leader["conversion"]
    assert twin["conversion"]["state"] == "SUCCEEDED" and twin["conversion"]["reused_from"] == ids[0]
    # Served by the leader, not converted on its own (which the conversion cache would also name the leader for).
    assert {e[4] for e in _events(s, ids[2]) if e[0] == "conversion"} == {f"served by the identical build {ids[0]}"}
    assert {e[4] for e in _events(s, ids[1]) if e[0] == "conversion" and e[2] == "PULLING"} == {None}
    # Released, it pulled with its own (wrong) password, as it would have without a leader.
    assert stranger["conversion"]["state"] == "FAILED", stranger["conversion"]
    assert stranger["conversion"]["error"]["code"] == "unauthorized"


def test_when_the_leader_fails_its_followers_convert_on_their_own(mod: Mod):
    s, client, registry = mod.s, mod.client, mod.registry
    src, dst = f"{registry.host}/follow/missing-{_hex()}:1", f"{registry.host}/follow/m-{_hex()}:1"
    tenant = new_tenant(s, client)
    app_id = tenant.create_app()
    ids = [submit(client, tenant.headers("WRITER"), convert_request(app_id, src, dst)) for _ in range(3)]
    assert list(_waits_for(s, ids).values()).count(ids[0]) == 2

    builds = _converted(mod, tenant, ids)
    codes = {b["conversion"]["state"] + ":" + b["conversion"]["error"]["code"] for b in builds}
    assert len(codes) == 1 and codes.pop().startswith("FAILED:"), [b["conversion"] for b in builds]
    actors = [{e[3] for e in _events(s, b) if e[0] == "conversion" and e[2] == "PULLING"} for b in ids]
    assert all(len(a) == 1 and next(iter(a)).startswith("worker:") for a in actors), actors
    assert len(set().union(*actors)) == 3, "each follower was pulled by an attempt of its own"


def test_cancelling_a_queued_leader_releases_its_followers(mod: Mod):
    s, client = mod.s, mod.client
    src, dst, tenant, app_id = _scene(mod, "cancel")
    redis = Redis.from_url(s.redis_url)
    ids = [submit(client, tenant.headers("WRITER"), convert_request(app_id, src, dst)) for _ in range(3)]
    queued = redis.llen(QUEUE)
    resp = client.post(f"/v1/builds/{ids[0]}/cancel", headers=tenant.headers("WRITER"))
    assert resp.status_code == 200 and resp.json["conversion"]["state"] == "CANCELLED", resp.json
    assert _waits_for(s, ids[1:]) == {ids[1]: None, ids[2]: None}
    assert redis.llen(QUEUE) - queued == 2, "each released follower is published"
    _, *rest = _converted(mod, tenant, ids)
    assert [b["conversion"]["state"] for b in rest] == ["SUCCEEDED", "SUCCEEDED"], [b["conversion"] for b in rest]


def test_the_sweeper_releases_followers_of_an_ended_leader_and_only_those(mod: Mod):
    s, client, registry = mod.s, mod.client, mod.registry
    tenant = new_tenant(s, client)
    app_id = tenant.create_app()
    redis = Redis.from_url(s.redis_url)

    def pair(name: str) -> list[str]:
        req = convert_request(app_id, f"{registry.host}/follow/{name}-{_hex()}:1", f"{registry.host}/follow/o:1")
        ids = [submit(client, tenant.headers("WRITER"), req) for _ in range(2)]
        assert _waits_for(s, ids)[ids[1]] == ids[0]
        return ids

    ended, alive, claimed = pair("ended"), pair("alive"), pair("claimed")
    with session_scope(s.database_url) as session:
        # The leader's worker died after ending it, before serving anyone.
        session.execute(text("UPDATE builds SET conversion_state = 'FAILED' WHERE id::text = :id"), {"id": ended[0]})
        # Everything has waited long enough for the sweeper's re-send.
        session.execute(text("UPDATE builds SET enqueued_at = now() - interval '1 day' WHERE id::text = ANY(:ids)"),
                        {"ids": ended + alive + claimed})
        assert buildstore.claim(session, uuid.UUID(claimed[0]), lease_seconds=600) is not None
    # Once its leader is claimed, an identical submission leads: the leader's pull may predate it.
    later = submit(client, tenant.headers("WRITER"), convert_request(
        app_id, *(r for r in _images_of(s, claimed[0]))))
    assert _waits_for(s, [later]) == {later: None}

    queued = redis.llen(QUEUE)
    report = sweep(s)
    assert [str(b) for b in report.released] == [ended[1]]
    assert alive[1] not in {str(b) for b in report.resent}, "a follower of a live leader is not re-sent"
    assert alive[0] in {str(b) for b in report.resent}
    assert _waits_for(s, [ended[1], alive[1], claimed[1]]) == {ended[1]: None, alive[1]: alive[0],
                                                               claimed[1]: claimed[0]}
    assert redis.llen(QUEUE) - queued == len(report.resent) + len(report.requeued) + 1
    with session_scope(s.database_url) as session:  # leave nothing for the next module's worker
        session.execute(text("UPDATE builds SET conversion_state = 'CANCELLED' WHERE app_id::text = :app "
                             "AND conversion_state IN ('QUEUED', 'PULLING')"), {"app": app_id})
    Redis.from_url(s.redis_url).delete(QUEUE)


def _images_of(s: Settings, build_id: str) -> tuple[str, str]:
    with session_scope(s.database_url) as session:
        row = session.execute(text("SELECT input_image_name, output_image_name FROM builds WHERE id::text = :id"),
                              {"id": build_id}).one()
    return str(row[0]), str(row[1])
