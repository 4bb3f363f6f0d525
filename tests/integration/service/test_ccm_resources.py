"""CCM's resource fields and operations beyond the seed's (issue 15): required and optional Account, App, Task
and User fields, the account/user operations, task filters and delete, and the list query parameters."""
from __future__ import annotations

import uuid

import pytest

from api.schemas.apps import AppListSchema, AppSchema
from api.schemas.builds import BuildListSchema, BuildSchema
from api.schemas.sys import AccountSchema, UserSchema
from api.schemas.tasks import TaskListSchema, TaskSchema
from tests.fixtures.service import PASSWORD, basic

from .helpers import body, drive_to_success, err, ok

pytestmark = pytest.mark.integration
SUBMIT = "/v1/builds/convert-app/nitro-enclaves"


def test_accounts_have_ccm_fields_and_operations(client, tenant, make_tenant):
    h = tenant.headers()
    acct = ok(client.post("/v1/accounts", json={
        "name": "ccm", "component": "CONFIDENTIAL_AI", "custom_logo": "bG9nbw==",
        "node_enrollment": {"attestation_enforcement_disabled_insecure": True}}, headers=h), AccountSchema)
    assert acct["roles"] == ["MANAGER"] and acct["component"] == "CONFIDENTIAL_AI"
    assert acct["node_enrollment"] == {"attestation_enforcement_disabled_insecure": True}
    plain = ok(client.post("/v1/accounts", json={"name": "plain"}, headers=h), AccountSchema)
    assert plain["component"] == "DEFAULT" and plain["node_enrollment"] == {
        "attestation_enforcement_disabled_insecure": False}
    got = ok(client.get(f"/v1/accounts/{acct['acct_id']}", headers=h), AccountSchema)
    assert got == acct
    changed = ok(client.patch(f"/v1/accounts/{acct['acct_id']}", json={"name": "renamed"}, headers=h), AccountSchema)
    assert changed["name"] == "renamed"
    err(client.post("/v1/accounts", json={"name": "x", "component": "SGX"}, headers=h), 422, "validation_failed")
    # Another user's account is a 404 for every operation; a non-MANAGER member may read but not change it.
    other = make_tenant().headers()
    for method in ("get", "delete"):
        err(getattr(client, method)(f"/v1/accounts/{acct['acct_id']}", headers=other), 404, "not_found")
    err(client.patch(f"/v1/accounts/{acct['acct_id']}", json={"name": "x"}, headers=other), 404, "not_found")
    err(client.patch(f"/v1/accounts/{tenant.account_id}", json={"name": "x"}, headers=tenant.headers("WRITER")),
        403, "forbidden")
    ok(client.delete(f"/v1/accounts/{acct['acct_id']}", headers=h), None, 204)
    err(client.get(f"/v1/accounts/{acct['acct_id']}", headers=h), 404, "not_found")


def test_user_and_users_operations(client, tenant):
    me = ok(client.get("/v1/user", headers=tenant.headers("WRITER")), UserSchema)
    assert me["user_email"] == tenant.emails["WRITER"] and me["roles"] == ["WRITER"] and me["status"] == "ACTIVE"
    got = ok(client.get(f"/v1/users/{me['user_id']}", headers=tenant.headers("READER")), UserSchema)
    assert got["user_id"] == me["user_id"]
    err(client.get(f"/v1/users/{uuid.uuid4()}", headers=tenant.headers("READER")), 404, "not_found")
    invited = ok(client.post("/v1/users/invite", json={"user_email": f"inv-{uuid.uuid4().hex[:6]}@example.test",
                                                      "roles": ["READER", "WRITER"]}, headers=tenant.headers()),
                 UserSchema, 201)
    assert invited["roles"] == ["WRITER"] and invited["status"] == "PENDING"
    err(client.post("/v1/users/invite", json={"user_email": "x@example.test", "roles": ["READER"]},
                    headers=tenant.headers("WRITER")), 403, "forbidden")
    # The invited user cannot sign in until a MANAGER gives a password.
    err(client.post("/v1/sys/auth", headers=basic(invited["user_email"], PASSWORD)), 401, "unauthenticated")
    changed = ok(client.patch(f"/v1/users/{invited['user_id']}", json={"roles": ["READER"]},
                              headers=tenant.headers()), UserSchema)
    assert changed["roles"] == ["READER"]
    mine = client.get(f"/v1/users/{me['user_id']}/accounts", headers=tenant.headers("WRITER"))
    assert mine.status_code == 200 and mine.json == {str(tenant.account_id): {"roles": ["WRITER"], "status": "ACTIVE"}}
    ok(client.delete(f"/v1/users/{invited['user_id']}/accounts", headers=tenant.headers()), None, 204)
    err(client.get(f"/v1/users/{invited['user_id']}", headers=tenant.headers()), 404, "not_found")
    # A READER may not remove someone else, but may leave.
    err(client.delete(f"/v1/users/{me['user_id']}/accounts", headers=tenant.headers("READER")), 403, "forbidden")


def test_apps_have_ccm_fields(client, tenant):
    h = tenant.headers("WRITER")
    plain = ok(client.post("/v1/apps", json={"name": f"a-{uuid.uuid4().hex[:6]}"}, headers=h), AppSchema)
    assert (plain["isvprodid"], plain["isvsvn"], plain["mem_size"], plain["threads"]) == (0, 0, 2048, 2)
    assert plain["input_image_name"] == "" and plain["labels"] == {} and plain["allowed_domains"] == []
    full = ok(client.post("/v1/apps", json={
        "name": f"b-{uuid.uuid4().hex[:6]}", "input_image_name": "127.0.0.1:5000/in:1",
        "output_image_name": "127.0.0.1:5000/out:1", "isvprodid": 7, "isvsvn": 3, "mem_size": 4096, "threads": 4,
        "allowed_domains": ["example.com"], "labels": {"team": "a", "tier": "1"}, "custom_metadata": {"k": "v"},
        "advanced_settings": {"entrypoint": ["/bin/app"], "allowCmdlineArgs": True}}, headers=h), AppSchema)
    assert full["labels"] == {"team": "a", "tier": "1"} and full["advanced_settings"]["allowCmdlineArgs"] is True
    patched = ok(client.patch(f"/v1/apps/{full['app_id']}", json={
        "isvsvn": 4, "labels": [{"op": "remove", "path": "/tier"}, {"op": "add", "path": "/env", "value": "prod"}],
        "custom_metadata": {"only": "this"}}, headers=h), AppSchema)
    assert patched["isvsvn"] == 4 and patched["labels"] == {"team": "a", "env": "prod"}
    assert patched["custom_metadata"] == {"only": "this"}
    err(client.patch(f"/v1/apps/{full['app_id']}", json={"labels": [{"op": "remove", "path": "/nope"}]},
                     headers=h), 422, "validation_failed")
    err(client.post("/v1/apps", json={"name": "c", "isvsvn": -1}, headers=h), 422, "validation_failed")
    found = ok(client.get(f"/v1/apps?all_search={full['name'][2:]}", headers=h), AppListSchema)
    assert [a["app_id"] for a in found["items"]] == [full["app_id"]]


def test_tasks_have_ccm_fields_filters_and_delete(client, tenant, service_settings):
    app_id = tenant.create_app()
    build = ok(client.post(SUBMIT, json=body(app_id), headers=tenant.headers("WRITER")), BuildSchema)
    drive_to_success(service_settings, build["build_id"])
    task_id = ok(client.get(f"/v1/builds/{build['build_id']}", headers=tenant.headers()), BuildSchema)[
        "pending_task_id"]
    task = ok(client.get(f"/v1/tasks/{task_id}", headers=tenant.headers()), TaskSchema)
    assert task["task_type"] == "BUILD_WHITELIST" and task["approvals"] == []
    assert task["requester_info"]["requester_type"] == "USER" and task["status"]["created_at"] == task["created_at"]
    assert [t["task_id"] for t in ok(client.get("/v1/tasks?status=PENDING", headers=tenant.headers()),
                                     TaskListSchema)["items"]] == [task_id]
    assert ok(client.get("/v1/tasks?status=CLOSED", headers=tenant.headers()), TaskListSchema)["items"] == []
    assert ok(client.get("/v1/tasks?task_type=NODE_ATTESTATION", headers=tenant.headers()),
              TaskListSchema)["items"] == []
    assert len(ok(client.get("/v1/tasks?all_search=127.0.0.1:5000/out", headers=tenant.headers()),
                  TaskListSchema)["items"]) == 1
    err(client.delete(f"/v1/tasks/{task_id}", headers=tenant.headers()), 409, "task_in_progress")
    decided = ok(client.patch(f"/v1/tasks/{task_id}", json={"status": "APPROVED"}, headers=tenant.headers()),
                 TaskSchema)
    assert decided["approvals"][0]["status"] == "APPROVED" and decided["task_status"]["status"] == "SUCCESS"
    assert [t["task_id"] for t in ok(client.get("/v1/tasks?status=CLOSED", headers=tenant.headers()),
                                     TaskListSchema)["items"]] == [task_id]
    err(client.delete(f"/v1/tasks/{task_id}", headers=tenant.headers("READER")), 403, "forbidden")
    ok(client.delete(f"/v1/tasks/{task_id}", headers=tenant.headers("WRITER")), None, 204)
    err(client.get(f"/v1/tasks/{task_id}", headers=tenant.headers()), 404, "not_found")
    assert ok(client.get(f"/v1/builds/{build['build_id']}", headers=tenant.headers()),
              BuildSchema)["status"]["status"] == "WHITELISTED"


def test_builds_list_takes_ccm_query_parameters(client, tenant):
    a, b = tenant.create_app(), tenant.create_app()
    h = tenant.headers("WRITER")
    ids = [ok(client.post(SUBMIT, json=body(app, output_image={"name": f"127.0.0.1:5000/{name}:1"}), headers=h),
              BuildSchema)["build_id"] for app, name in ((a, "zeta"), (a, "alpha"), (b, "alpha"))]
    page = ok(client.get("/v1/builds?sort_by=app_name:ASC,created_at:DESC", headers=h), BuildListSchema)
    names = sorted([(x["app_name"], -x["created_at"]) for x in page["items"]])
    assert [(x["app_name"], -x["created_at"]) for x in page["items"]] == names
    found = ok(client.get("/v1/builds?all_search=ALPHA", headers=h), BuildListSchema)
    assert sorted(x["build_id"] for x in found["items"]) == sorted(ids[1:])
    assert found["metadata"]["filtered_count"] == 2
    assert len(ok(client.get("/v1/builds?deployed_status=UNDEPLOYED", headers=h), BuildListSchema)["items"]) == 3
    assert ok(client.get("/v1/builds?deployed_status=DEPLOYED", headers=h), BuildListSchema)["items"] == []
    err(client.get("/v1/builds?sort_by=created_at:DESC,password:ASC", headers=h), 422, "validation_failed")
    err(client.get("/v1/builds?sort_by=created_at:SIDEWAYS", headers=h), 422, "validation_failed")
    changed = ok(client.patch(f"/v1/builds/{ids[0]}", json={"configs": {}}, headers=h), BuildSchema)
    assert changed["build_id"] == ids[0]


def test_other_platforms_and_nodes_answer_the_envelope_with_a_code(client, tenant):
    h = tenant.headers("WRITER")
    app_id = tenant.create_app(labels={"team": "a"})
    tenant.create_app(labels={"team": "a", "tier": "1"})
    build = ok(client.post(SUBMIT, json=body(app_id), headers=h), BuildSchema)
    for method, path, status, code in (
            ("post", "/v1/builds", 422, "platform_not_supported"),
            ("post", "/v1/builds/convert-app/aci", 422, "platform_not_supported"),
            ("get", f"/v1/builds/deployments/{build['build_id']}", 404, "nodes_not_supported"),
            ("get", f"/v1/apps/{app_id}/node/{uuid.uuid4()}/certificate", 404, "nodes_not_supported"),
            ("get", f"/v1/apps/{app_id}/node/{uuid.uuid4()}/certificate-details", 404, "nodes_not_supported"),
            ("get", "/v1/nodes", 404, "nodes_not_supported")):
        err(getattr(client, method)(path, json={}, headers=h), status, code)
    err(client.post("/v1/builds", json={}), 401, "unauthenticated")
    counts = client.get("/v1/apps/unique_labels/count", headers=h)
    assert counts.status_code == 200 and counts.json == {"items": [
        {"key": "team", "value": "a", "count": 2}, {"key": "tier", "value": "1", "count": 1}]}
    task_status = client.get(f"/v1/tasks/status/{uuid.uuid4()}", headers=h)
    assert task_status.status_code == 404
