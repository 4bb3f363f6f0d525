"""The HTTP API against real Postgres and Redis: auth, scoping, validation, idempotency, approval."""
from __future__ import annotations

import base64
import uuid

import pytest
from sqlalchemy import func, select

from api.schemas.apps import AppListSchema, AppSchema
from api.schemas.builds import BuildListSchema, BuildSchema
from api.schemas.sys import (
    AccountListSchema,
    AccountSchema,
    HealthSchema,
    SessionResponseSchema,
    TokenSchema,
    UserSchema,
    VersionSchema,
)
from api.schemas.tasks import TaskListSchema, TaskSchema
from common.store.engine import session_scope
from common.store.models import Build, BuildEvent, Task
from tests.fixtures.service import PASSWORD, basic

from .helpers import PCRS, body, drive_to_success, err, ok

pytestmark = pytest.mark.integration


def test_api_health_and_version_need_no_auth(client):
    assert ok(client.get("/healthz"), HealthSchema)["checks"] == {"postgres": "ok", "redis": "ok"}
    ok(client.get("/v1/sys/version"), VersionSchema)


def test_api_openapi_document_lists_the_contract_paths(client):
    doc = client.get("/v1/openapi.json").json
    assert doc["openapi"].startswith("3.")
    for path in ("/v1/builds/convert-app/nitro-enclaves", "/v1/builds/{build_id}", "/v1/tasks/{task_id}",
                 "/v1/apps/{app_id}", "/v1/sys/auth", "/healthz"):
        assert path in doc["paths"]
    network = doc["components"]["schemas"]["ConverterOptions"]["properties"]["network"]
    assert network["type"] == "object" and "EXPOSE" in network["description"] and network["example"]["ingress"]
    assert "network" in doc["components"]["schemas"]["Conversion"]["properties"]
    assert client.get("/v1/docs").status_code == 200


def test_api_auth_issues_token_and_accepts_both_headers(client, tenant):
    data = ok(client.post("/v1/sys/auth", headers=basic(tenant.emails["READER"], PASSWORD)), TokenSchema)
    assert data["session_info"]["role"] == "READER"
    token = data["access_token"]
    for header in ("Authorization", "Authentication"):
        ok(client.get("/v1/builds", headers={header: f"Bearer {token}"}), BuildListSchema)


@pytest.mark.parametrize("headers", [
    {}, {"Authorization": "Bearer nonsense"}, {"Authorization": "Basic Zm9vOmJhcg=="},
])
def test_api_rejects_missing_or_bad_tokens(client, headers):
    err(client.get("/v1/builds", headers=headers), 401, "unauthenticated")


def test_api_auth_rejects_wrong_password_and_unknown_email(client, tenant):
    err(client.post("/v1/sys/auth", headers=basic(tenant.emails["MANAGER"], "wrong")), 401, "unauthenticated")
    err(client.post("/v1/sys/auth", headers=basic("nobody@example.test", PASSWORD)), 401, "unauthenticated")
    bad = {"Authorization": "Basic " + base64.b64encode(b"no-colon").decode()}
    err(client.post("/v1/sys/auth", headers=bad), 401)


def test_api_reader_cannot_convert_or_create(client, tenant):
    app_id = tenant.create_app()
    err(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=tenant.headers("READER")),
        403, "forbidden")
    err(client.post("/v1/apps", json={"name": "x"}, headers=tenant.headers("READER")), 403, "forbidden")


def test_api_objects_of_another_account_are_404(client, make_tenant):
    a, b = make_tenant(), make_tenant()
    app_id = a.create_app()
    build = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=a.headers("WRITER")),
               BuildSchema, 200)
    other = b.headers("MANAGER")
    err(client.get(f"/v1/builds/{build['build_id']}", headers=other), 404, "not_found")
    err(client.delete(f"/v1/builds/{build['build_id']}", headers=other), 404, "not_found")
    err(client.get(f"/v1/apps/{app_id}", headers=other), 404, "not_found")
    # B cannot submit against A's app either: it does not exist in B's account.
    e = err(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=b.headers("WRITER")),
            422, "validation_failed")
    assert "app_id" in e["details"]["fields"]
    assert ok(client.get("/v1/builds", headers=other), BuildListSchema)["metadata"]["total_count"] == 0


def test_api_submit_returns_200_build_location_and_redacts_passwords(client, tenant, service_settings):
    app_id = tenant.create_app(description="demo")
    req = body(app_id, input_image={"name": "127.0.0.1:5000/in:1",
                                    "auth_config": {"username": "alice", "password": "canary-pw-123"}})
    resp = client.post("/v1/builds/convert-app/nitro-enclaves", json=req, headers=tenant.headers("WRITER"))
    build = ok(resp, BuildSchema, 200)
    assert resp.headers["Location"] == f"/v1/builds/{build['build_id']}"
    assert build["status"]["status"] == "PENDING" and build["conversion"]["state"] == "QUEUED"
    assert build["app_description"] == "demo" and build["mem_size"] == 512 and build["threads"] == 2
    assert build["conversion"]["request"]["input_image"]["auth_config"] == {"username": "alice", "password": "***"}
    assert "canary-pw-123" not in resp.get_data(as_text=True)
    with session_scope(service_settings.database_url) as session:
        row = session.get(Build, uuid.UUID(build["build_id"]))
        assert row.input_credentials and b"canary-pw-123" not in row.input_credentials
    again = ok(client.get(resp.headers["Location"], headers=tenant.headers("READER")), BuildSchema)
    assert again["build_id"] == build["build_id"]


def test_api_submit_flat_form_and_app_defaults(client, tenant):
    app_id = tenant.create_app(default_build_settings={"nitro_enclaves": {
        "cpu_count": 4, "mem_size": 4096, "converter_options": {"env_vars": ["FROM_APP=1"]}}})
    flat = {"app_id": app_id, "input_image": {"name": "127.0.0.1:5000/in:1"},
            "output_image": {"name": "127.0.0.1:5000/out:1"}}
    build = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=flat, headers=tenant.headers("WRITER")),
               BuildSchema, 200)
    assert build["threads"] == 4 and build["mem_size"] == 4096
    assert build["advanced_settings"]["manifestEnv"] == ["FROM_APP=1"]


def test_api_submit_validation_is_422_with_fields(client, tenant):
    app_id = tenant.create_app()
    bad = body(app_id, input_image={"name": "127.0.0.1:5000/in:1"}, output_image={"name": "127.0.0.1:5000/in:1"})
    e = err(client.post("/v1/builds/convert-app/nitro-enclaves", json=bad, headers=tenant.headers("WRITER")),
            422, "validation_failed")
    assert "output_image" in e["details"]["fields"]
    bad = body(app_id, converter_options={"env_vars": ["no-equals"], "java_mode": "BASIC"})
    bad["nitro_enclaves_options"] = {"cpu_count": 0, "mem_size": 0}
    e = err(client.post("/v1/builds/convert-app/nitro-enclaves", json=bad, headers=tenant.headers("WRITER")), 422)
    assert {"cpu_count", "mem_size", "converter_options"} <= set(e["details"]["fields"])
    bad = body(app_id, converter_options={"network": {"ingress": [8080], "egress": {"deny": [{"host": "a.b", "ports": ["x"]}]}}})
    e = err(client.post("/v1/builds/convert-app/nitro-enclaves", json=bad, headers=tenant.headers("WRITER")), 422)
    assert e["details"]["fields"] == {"converter_options": {"network": [
        "network.egress.deny[0].ports[0]: 'x' is not a range LOW-HIGH of ports from 1 to 65535"]}}
    e = err(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(str(uuid.uuid4())),
                        headers=tenant.headers("WRITER")), 422)
    assert "app_id" in e["details"]["fields"]
    err(client.post("/v1/builds/convert-app/nitro-enclaves", data="{not json", content_type="application/json",
                    headers=tenant.headers("WRITER")), 400)


def test_api_idempotent_retry_gives_one_build(client, tenant, service_settings):
    app_id = tenant.create_app()
    headers = tenant.headers("WRITER", **{"Idempotency-Key": "retry-1"})
    first = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=headers),
               BuildSchema, 200)
    second = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=headers),
                BuildSchema, 200)
    assert first["build_id"] == second["build_id"]
    with session_scope(service_settings.database_url) as session:
        count = session.execute(select(func.count()).select_from(Build)
                                .where(Build.account_id == tenant.account_id)).scalar_one()
    assert count == 1
    changed = body(app_id, output_image={"name": "127.0.0.1:5000/elsewhere:1"})
    err(client.post("/v1/builds/convert-app/nitro-enclaves", json=changed, headers=headers), 409,
        "idempotency_key_reused")


def test_api_builds_list_paginates_filters_and_sorts(client, tenant):
    app_a, app_b = tenant.create_app(), tenant.create_app()
    h = tenant.headers("WRITER")
    ids = [ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(a), headers=h), BuildSchema, 200)
           ["build_id"] for a in (app_a, app_a, app_b)]
    page = ok(client.get("/v1/builds?limit=2&offset=0&sort_by=created_at:ASC", headers=h), BuildListSchema)
    assert page["metadata"] == {"page": 1, "pages": 2, "limit": 2, "total_count": 3, "filtered_count": 3}
    assert [b["build_id"] for b in page["items"]] == ids[:2]
    page = ok(client.get(f"/v1/builds?app_id={app_b}", headers=h), BuildListSchema)
    assert [b["build_id"] for b in page["items"]] == ids[2:]
    assert page["metadata"]["filtered_count"] == 1
    assert ok(client.get("/v1/builds?status=WHITELISTED", headers=h), BuildListSchema)["items"] == []
    err(client.get("/v1/builds?sort_by=password:ASC", headers=h), 422, "validation_failed")


def test_api_cancel_of_a_queued_build_rejects_it(client, tenant):
    app_id = tenant.create_app()
    h = tenant.headers("WRITER")
    build = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=h), BuildSchema, 200)
    done = ok(client.post(f"/v1/builds/{build['build_id']}/cancel", headers=h), BuildSchema, 200)
    assert done["conversion"]["state"] == "CANCELLED" and done["status"]["status"] == "REJECTED"
    assert done["conversion"]["error"]["code"] == "cancelled"
    err(client.post(f"/v1/builds/{build['build_id']}/cancel", headers=h), 409, "invalid_transition")


def test_api_delete_removes_a_build_cancelling_it_first(client, tenant, service_settings):
    app_id = tenant.create_app()
    h = tenant.headers("WRITER")
    queued = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=h), BuildSchema, 200)
    err(client.delete(f"/v1/builds/{queued['build_id']}", headers=tenant.headers("READER")), 403, "forbidden")
    ok(client.delete(f"/v1/builds/{queued['build_id']}", headers=h), None, 204)
    err(client.get(f"/v1/builds/{queued['build_id']}", headers=h), 404, "not_found")
    err(client.delete(f"/v1/builds/{queued['build_id']}", headers=h), 404, "not_found")
    # A finished build (CCM deletes any build, where a cancel would be a 409).
    done = _converted(client, tenant, service_settings)
    ok(client.delete(f"/v1/builds/{done['build_id']}", headers=h), None, 204)
    with session_scope(service_settings.database_url) as session:
        assert session.get(Build, uuid.UUID(done["build_id"])) is None


def test_api_convert_answers_202_when_asked_to_respond_async(client, tenant):
    app_id = tenant.create_app()
    h = tenant.headers("WRITER", Prefer="respond-async")
    resp = client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id), headers=h)
    build = ok(resp, BuildSchema, 202)
    assert resp.headers["Location"] == f"/v1/builds/{build['build_id']}"


def _converted(client, tenant, settings, **app_fields):
    app_id = tenant.create_app(**app_fields)
    build = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id),
                           headers=tenant.headers("WRITER")), BuildSchema, 200)
    drive_to_success(settings, build["build_id"])
    return ok(client.get(f"/v1/builds/{build['build_id']}", headers=tenant.headers("READER")), BuildSchema)


def test_api_approval_whitelists_and_only_a_manager_may(client, tenant, service_settings):
    build = _converted(client, tenant, service_settings)
    assert build["status"]["status"] == "PENDING" and build["conversion"]["state"] == "SUCCEEDED"
    assert build["attributes"] == {"eif": {"nitro_enclave": {"hash_algorithm": "Sha384", **PCRS}}}
    assert build["docker_info"]["docker_version"] == ""  # the image did not say: still a string (CCM)
    assert build["docker_info"]["exposed_ports"] == [{"port": 8080, "protocol": "Tcp"}]
    task_id = build["pending_task_id"]
    task = ok(client.get(f"/v1/tasks/{task_id}", headers=tenant.headers("READER")), TaskSchema)
    assert task["status"]["status"] == "INPROGRESS" and task["entity_id"] == build["build_id"]
    err(client.patch(f"/v1/tasks/{task_id}", json={"status": "APPROVED"}, headers=tenant.headers("WRITER")),
        403, "forbidden")
    task = ok(client.patch(f"/v1/tasks/{task_id}", json={"status": "APPROVED"}, headers=tenant.headers()),
              TaskSchema)
    assert task["status"]["status"] == "SUCCESS" and task["approver"]["user_name"] == tenant.emails["MANAGER"]
    build = ok(client.get(f"/v1/builds/{build['build_id']}", headers=tenant.headers()), BuildSchema)
    assert build["status"]["status"] == "WHITELISTED" and build["pending_task_id"] is None
    err(client.patch(f"/v1/tasks/{task_id}", json={"status": "DENIED"}, headers=tenant.headers()),
        409, "invalid_transition")
    listed = ok(client.get("/v1/tasks?status=SUCCESS", headers=tenant.headers()), TaskListSchema)
    assert [t["task_id"] for t in listed["items"]] == [task_id]


def test_api_denial_rejects_with_reason(client, tenant, service_settings):
    build = _converted(client, tenant, service_settings)
    task = ok(client.patch(f"/v1/tasks/{build['pending_task_id']}",
                           json={"status": "DENIED", "denial_reason": "unknown base image"},
                           headers=tenant.headers()), TaskSchema)
    assert task["status"]["status"] == "DENIED" and task["denial_reason"] == "unknown base image"
    build = ok(client.get(f"/v1/builds/{build['build_id']}", headers=tenant.headers()), BuildSchema)
    assert build["status"]["status"] == "REJECTED"
    err(client.patch(f"/v1/tasks/{task['task_id']}", json={"status": "MAYBE"}, headers=tenant.headers()), 422)


def test_api_auto_approve_whitelists_as_system(client, tenant, service_settings):
    build = _converted(client, tenant, service_settings, auto_approve=True)
    assert build["status"]["status"] == "WHITELISTED"
    tasks = ok(client.get(f"/v1/tasks?build_id={build['build_id']}", headers=tenant.headers()), TaskListSchema)
    assert tasks["items"][0]["approver"] == {"user_id": None, "user_name": "SYSTEM"}


def test_api_approving_an_unconverted_build_is_409(client, tenant, service_settings):
    app_id = tenant.create_app()
    build = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=body(app_id),
                           headers=tenant.headers("WRITER")), BuildSchema, 200)
    task_id = uuid.uuid4()
    with session_scope(service_settings.database_url) as session:
        session.add(Task(id=task_id, account_id=tenant.account_id, build_id=uuid.UUID(build["build_id"]),
                         status="INPROGRESS", type="BUILD_WHITELIST"))
    err(client.patch(f"/v1/tasks/{task_id}", json={"status": "APPROVED"}, headers=tenant.headers()), 409)
    with session_scope(service_settings.database_url) as session:
        assert session.get(Task, task_id).status == "INPROGRESS"  # the task write rolled back too
        assert session.get(Build, uuid.UUID(build["build_id"])).approval_status == "PENDING"


def test_api_every_transition_leaves_an_event(client, tenant, service_settings):
    build = _converted(client, tenant, service_settings, auto_approve=True)
    with session_scope(service_settings.database_url) as session:
        events = session.execute(select(BuildEvent.machine, BuildEvent.from_state, BuildEvent.to_state)
                                 .where(BuildEvent.build_id == uuid.UUID(build["build_id"]))
                                 .order_by(BuildEvent.id)).all()
    assert [tuple(e) for e in events] == [
        ("conversion", "QUEUED", "PULLING"), ("conversion", "PULLING", "BUILDING"),
        ("conversion", "BUILDING", "MEASURING"), ("conversion", "MEASURING", "PUSHING"),
        ("conversion", "PUSHING", "SUCCEEDED"), ("task", "", "INPROGRESS"),
        ("task", "INPROGRESS", "SUCCESS"), ("approval", "PENDING", "WHITELISTED")]


def test_api_apps_crud(client, tenant):
    h = tenant.headers("WRITER")
    app = ok(client.post("/v1/apps", json={"name": "crud", "auto_approve": True,
                                           "input_image_name": "127.0.0.1:5000/x:1"}, headers=h), AppSchema, 200)
    err(client.post("/v1/apps", json={"name": "crud"}, headers=h), 409)
    app = ok(client.patch(f"/v1/apps/{app['app_id']}", json={"description": "d", "auto_approve": False},
                          headers=h), AppSchema)
    assert app["description"] == "d" and app["auto_approve"] is False
    assert ok(client.get("/v1/apps?name=crud", headers=h), AppListSchema)["metadata"]["filtered_count"] == 1
    ok(client.delete(f"/v1/apps/{app['app_id']}", headers=h), None, 204)
    err(client.get(f"/v1/apps/{app['app_id']}", headers=h), 404)


def test_api_accounts_and_users(client, tenant):
    h = tenant.headers()
    acct = ok(client.post("/v1/accounts", json={"name": "second"}, headers=h), AccountSchema, 200)
    assert len(ok(client.get("/v1/accounts", headers=h), AccountListSchema)["items"]) == 2
    switched = ok(client.post(f"/v1/sys/session/select_account/{acct['acct_id']}", headers=h),
                  SessionResponseSchema)
    assert switched["session_info"]["selected_account_id"] == acct["acct_id"] == switched["session_info"]["acct_id"]
    err(client.post(f"/v1/sys/session/select_account/{uuid.uuid4()}", headers=h), 404)
    user = ok(client.post("/v1/users", json={"email": "new@example.test", "password": "long-enough-pw",
                                             "role": "WRITER"}, headers=h), UserSchema, 201)
    err(client.post("/v1/users", json={"email": "x@example.test", "role": "READER"},
                    headers=tenant.headers("WRITER")), 403)
    user = ok(client.patch(f"/v1/users/{user['user_id']}", json={"role": "READER"}, headers=h), UserSchema)
    assert user["role"] == "READER"
    ok(client.delete(f"/v1/users/{user['user_id']}", headers=h), None, 204)
