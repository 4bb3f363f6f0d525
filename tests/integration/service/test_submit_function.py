"""The submission's one statement (`nitroconv_submit_build`, api/submission.py) against real Postgres: the quota
under concurrent submissions, the role, a stale view of the app's settings, pinned settings, retries; and through
the API, a change of the app's defaults taking effect on the next submission."""
from __future__ import annotations

import json
import re
import threading
import time
import uuid

import psycopg2
import pytest
from sqlalchemy import func, select, update

from api.schemas.builds import BuildSchema
from api.submission import roles_at_least, submit_build, submit_build_pinned
from common.store import builds as buildstore
from common.store.accounts import Role
from common.store.engine import engine_for, session_scope
from common.store.models import App, Build, Membership, User

from .helpers import body, err, new_account, new_build, ok, race

pytestmark = pytest.mark.integration

WRITERS = roles_at_least(Role.WRITER)


def _member(url: str, account_id: uuid.UUID, role: str) -> uuid.UUID:
    with session_scope(url) as session:
        user = User(id=uuid.uuid4(), email=f"u-{uuid.uuid4().hex[:8]}@example.test", password_hash="x")
        session.add(user)
        session.flush()
        session.add(Membership(user_id=user.id, account_id=account_id, role=role))
        return user.id


def _submit(url: str, account: tuple[uuid.UUID, uuid.UUID], user_id: uuid.UUID, quota: int | None,
            key: str | None = None, settings: str | None = "{}"):  # noqa: ANN202
    row = buildstore.build_row(new_build(account, created_by=user_id, idempotency_key=key,
                                         input_credentials=b"sealed", converter_options={"env_vars": ["A=1"]}))
    return submit_build(engine_for(url, 20), row, user_id=user_id, account_id=account[0], roles=WRITERS,
                        app_settings=settings, quota=quota)


def _unfinished(url: str, account_id: uuid.UUID) -> int:
    with session_scope(url) as session:
        return session.execute(select(func.count()).select_from(Build).where(
            Build.account_id == account_id, Build.conversion_state.in_(buildstore.UNFINISHED))).scalar_one()


def test_submit_function_races_take_exactly_the_free_slots(queue_db):
    account, other = new_account(queue_db), new_account(queue_db)
    user, other_user = _member(queue_db, account[0], "WRITER"), _member(queue_db, other[0], "MANAGER")
    assert _submit(queue_db, other, other_user, quota=3).outcome == "created"  # another account's do not count
    outcomes: list[str] = []
    lock = threading.Lock()

    def submit() -> None:
        got = _submit(queue_db, account, user, quota=5)
        with lock:
            outcomes.append(got.outcome)

    race(submit, threads=16)
    assert sorted(outcomes) == ["created"] * 5 + ["quota"] * 11
    assert _unfinished(queue_db, account[0]) == 5


def _waiting_on_a_lock(url: str) -> int:
    with psycopg2.connect(url) as conn, conn.cursor() as cur:
        cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                    "AND wait_event_type = 'Lock'")
        return int(cur.fetchone()[0])


def test_submit_function_counts_a_build_committed_while_it_waited_for_the_lock(queue_db):
    """The count sees what committed after the statement began, while it waited for the account's lock: a count
    in the snapshot the statement started with would miss it and take a slot the quota does not have."""
    account = new_account(queue_db)
    user = _member(queue_db, account[0], "WRITER")
    holder = psycopg2.connect(queue_db)
    try:
        with holder.cursor() as cur:  # another submission: the account's lock, then its build, not committed yet
            cur.execute("SELECT id FROM accounts WHERE id = %s FOR UPDATE", (str(account[0]),))
            cur.execute("INSERT INTO builds (id, account_id, app_id, request_fingerprint, input_image_name, "
                        "output_image_name, converter_options, cpu_count, enable_overlay_filesystem_persistence, "
                        "approval_status, conversion_state, progress, attempts, cancel_requested, exposed_ports, "
                        "warnings) VALUES (%s, %s, %s, 'f', 'a', 'b', '{}', 2, true, 'PENDING', 'QUEUED', 0, 0, "
                        "false, '[]', '[]')", (str(uuid.uuid4()), str(account[0]), str(account[1])))
        got: list[str] = []
        waiter = threading.Thread(target=lambda: got.append(_submit(queue_db, account, user, quota=1).outcome))
        waiter.start()
        deadline = time.monotonic() + 20
        while _waiting_on_a_lock(queue_db) == 0:
            assert time.monotonic() < deadline, "the submission never waited for the account's lock"
            time.sleep(0.02)
        holder.commit()
        waiter.join(timeout=20)
    finally:
        holder.close()
    assert got == ["quota"]
    assert _unfinished(queue_db, account[0]) == 1


def test_submit_function_checks_the_role_and_inserts_nothing_without_it(queue_db):
    account = new_account(queue_db)
    reader = _member(queue_db, account[0], "READER")
    stranger = _member(queue_db, new_account(queue_db)[0], "MANAGER")
    refused = _submit(queue_db, account, reader, quota=5)
    assert (refused.outcome, refused.role) == ("role", "READER")
    refused = _submit(queue_db, account, stranger, quota=5)
    assert (refused.outcome, refused.role) == ("role", None)
    manager = _member(queue_db, account[0], "MANAGER")
    assert _submit(queue_db, account, manager, quota=5).outcome == "created"
    assert _unfinished(queue_db, account[0]) == 1


def test_submit_function_answers_stale_settings_with_the_current_ones(queue_db):
    account = new_account(queue_db)
    user = _member(queue_db, account[0], "WRITER")
    with session_scope(queue_db) as session:
        session.execute(update(App).where(App.id == account[1]).values(
            default_build_settings={"nitro_enclaves": {"cpu_count": 4}}))
    unknown = _submit(queue_db, account, user, quota=5, settings=None)
    assert unknown.outcome == "stale" and unknown.app_name == "app"
    stale = _submit(queue_db, account, user, quota=5, settings="{}")
    assert stale.outcome == "stale" and stale.app_settings == unknown.app_settings
    assert _unfinished(queue_db, account[0]) == 0
    created = _submit(queue_db, account, user, quota=5, settings=unknown.app_settings)
    assert created.outcome == "created" and created.created_at is not None
    assert created.created_at == created.updated_at == created.approval_updated_at
    missing = _submit(queue_db, (account[0], uuid.uuid4()), user, quota=5)
    assert missing.outcome == "no_app"


def test_submit_function_with_pinned_settings_merges_the_apps_own_and_keeps_every_rule(queue_db):
    account = new_account(queue_db)
    user, reader = _member(queue_db, account[0], "WRITER"), _member(queue_db, account[0], "READER")
    with session_scope(queue_db) as session:
        session.execute(update(App).where(App.id == account[1]).values(
            default_build_settings={"nitro_enclaves": {"cpu_count": 4}}))
    seen: list[str | None] = []

    def pinned(user_id: uuid.UUID, app: tuple[uuid.UUID, uuid.UUID], quota: int = 5):  # noqa: ANN202
        def values_for(settings: str | None) -> dict:
            seen.append(settings)
            return buildstore.build_row(new_build(app, created_by=user_id))

        got, _ = submit_build_pinned(engine_for(queue_db, 20), values_for, app_id=app[1], user_id=user_id,
                                     account_id=app[0], roles=WRITERS, quota=quota)
        return got

    assert pinned(user, account).outcome == "created"
    assert json.loads(seen[-1]) == {"nitro_enclaves": {"cpu_count": 4}}
    assert pinned(user, account, quota=1).outcome == "quota"
    assert (pinned(reader, account).outcome, seen[-1] is not None) == ("role", True)
    assert pinned(user, (account[0], new_account(queue_db)[1])).outcome == "no_app"  # another account's app
    assert seen[-1] is None
    assert _unfinished(queue_db, account[0]) == 1
    # The transaction ended: an update of the app does not wait on the submission's lock.
    with psycopg2.connect(queue_db) as conn, conn.cursor() as cur:
        cur.execute("SET lock_timeout = '2s'; UPDATE apps SET description = 'x' WHERE id = %s", (str(account[1]),))


def test_submit_function_retried_key_is_found_even_at_the_quota(queue_db):
    account = new_account(queue_db)
    user = _member(queue_db, account[0], "WRITER")
    assert _submit(queue_db, account, user, quota=1, key="k1").outcome == "created"
    assert _submit(queue_db, account, user, quota=1, key="k2").outcome == "quota"
    assert _submit(queue_db, account, user, quota=1, key="k1").outcome == "exists"
    assert _unfinished(queue_db, account[0]) == 1


def test_submit_function_counts_the_unfinished_states_the_store_does(queue_db):
    with psycopg2.connect(queue_db) as conn, conn.cursor() as cur:
        cur.execute("SELECT pg_get_functiondef('nitroconv_submit_build'::regproc)")
        source = cur.fetchone()[0]
    states = re.search(r"conversion_state IN \(([^)]*)\)", source)
    assert states is not None
    assert tuple(s.strip().strip("'") for s in states.group(1).split(",")) == buildstore.UNFINISHED


def test_api_submit_takes_the_apps_changed_defaults_at_once(client, tenant):
    app_id = tenant.create_app(default_build_settings={"nitro_enclaves": {"cpu_count": 4}})
    flat = {"app_id": app_id, "input_image": {"name": "127.0.0.1:5000/in:1"},
            "output_image": {"name": "127.0.0.1:5000/out:1"}}
    submit = "/v1/builds/convert-app/nitro-enclaves"
    ok(client.post(submit, json=flat, headers=tenant.headers("WRITER")), None, 200)
    build = ok(client.post(submit, json=flat, headers=tenant.headers("WRITER")), BuildSchema, 200)
    assert build["threads"] == 4 and build["mem_size"] is None
    changed = {"default_build_settings": {"nitro_enclaves": {"cpu_count": 6, "mem_size": 2048}}}
    assert client.patch(f"/v1/apps/{app_id}", json=changed, headers=tenant.headers("WRITER")).status_code == 200
    build = ok(client.post(submit, json=flat, headers=tenant.headers("WRITER")), BuildSchema, 200)
    assert build["threads"] == 6 and build["mem_size"] == 2048
    # The request's own values still win over the app's.
    build = client.post(submit, json=body(app_id), headers=tenant.headers("WRITER")).json
    assert build["threads"] == 2 and build["mem_size"] == 512


def test_api_submit_answers_the_build_the_function_stored(client, tenant):
    """The 200's Build is assembled from the values sent and the row's timestamps; the function's INSERT sets
    the rest (state, progress, attempts…) itself: a later GET must read the very same Build."""
    app_id = tenant.create_app(default_build_settings={"nitro_enclaves": {"converter_options": {"debug": True}}})
    request = body(app_id)
    request["request"]["input_image"]["auth_config"] = {"username": "u", "password": "p"}
    request["request"]["converter_options"] = {"env_vars": ["A=1"], "entrypoint": ["/bin/app"]}
    submitted = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=request,
                               headers=tenant.headers("WRITER")), BuildSchema, 200)
    stored = ok(client.get(f"/v1/builds/{submitted['build_id']}", headers=tenant.headers("READER")), BuildSchema)
    assert submitted == stored


def test_api_submit_checks_the_role_before_the_requests_own_errors(client, tenant):
    app_id = tenant.create_app()
    submit = "/v1/builds/convert-app/nitro-enclaves"
    long_key = {"Idempotency-Key": "k" * 300}
    err(client.post(submit, json=body(app_id), headers=tenant.headers("READER", **long_key)), 403, "forbidden")
    err(client.post(submit, json=body(app_id), headers=tenant.headers("WRITER", **long_key)), 422, "validation_failed")
    err(client.post(submit, json=body(app_id), headers=tenant.headers("READER")), 403, "forbidden")
    # The wait query and a body of another JSON type go the documented way (webargs), with the same outcome.
    build = ok(client.post(f"{submit}?wait=0", data=json.dumps(body(app_id)), content_type="application/json",
                           headers=tenant.headers("WRITER")), BuildSchema, 200)
    assert build["app_id"] == app_id
    err(client.post(submit, json=[body(app_id)], headers=tenant.headers("WRITER")), 422, "validation_failed")


def test_api_submit_reads_the_settings_under_the_lock_when_they_keep_changing(client, tenant, monkeypatch):
    """With no try left (the app's settings changed under each), the statement runs with the settings read under a
    share lock on the app's row, in one transaction: same Build, same merge, same rules."""
    from api.services import builds

    monkeypatch.setattr(builds, "_STALE_TRIES", 0)
    app_id = tenant.create_app(default_build_settings={"nitro_enclaves": {
        "cpu_count": 4, "converter_options": {"env_vars": ["FROM_APP=1"]}}})
    flat = {"app_id": app_id, "input_image": {"name": "127.0.0.1:5000/in:1"},
            "output_image": {"name": "127.0.0.1:5000/out:1"}}
    submit = "/v1/builds/convert-app/nitro-enclaves"
    build = ok(client.post(submit, json=flat, headers=tenant.headers("WRITER", **{"Idempotency-Key": "again"})),
               BuildSchema, 200)
    assert build["threads"] == 4 and build["advanced_settings"]["manifestEnv"] == ["FROM_APP=1"]
    retried = ok(client.post(submit, json=flat, headers=tenant.headers("WRITER", **{"Idempotency-Key": "again"})),
                 BuildSchema, 200)
    assert retried["build_id"] == build["build_id"]
    err(client.post(submit, json=body(str(uuid.uuid4())), headers=tenant.headers("WRITER")), 422, "validation_failed")
