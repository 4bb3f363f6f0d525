"""The requests CCM documents beyond the first conformance pass: an app's certificate policy, signers and group,
an account's auth configs, status and group ids, a user's names, e-mail and account status, the accounts' and
users' list parameters, and a build's application configs. Each is kept and returned, or refused with a code."""
from __future__ import annotations

import json
import uuid

import pytest

from api.schemas.apps import AppListSchema, AppSchema
from api.schemas.builds import BuildListSchema, BuildSchema
from api.schemas.sys import AccountListSchema, AccountSchema, UserListSchema, UserSchema
from api.schemas.tasks import TaskListSchema
from tests.fixtures.service import PASSWORD, basic

from .helpers import body, drive_to_success, err, ok

pytestmark = pytest.mark.integration
SUBMIT = "/v1/builds/convert-app/nitro-enclaves"
PASSWORD_CONFIG = {"password": {"require_2fa": False, "administrators_only": False}}


def test_app_certificate_policy_signers_and_group_are_kept(client, tenant):
    h = tenant.headers("WRITER")
    group, pcr8 = str(uuid.uuid4()), "ab" * 48
    app = ok(client.post("/v1/apps", json={
        "name": f"s-{uuid.uuid4().hex[:6]}", "group_id": group,
        "certificate_policy": {"require_known_image": True, "require_known_signer": False},
        "signers": [{"nitro_enclave": {"pcr8": pcr8}}, {"sgx": {"mrsigner": "cd" * 32, "isvprodid": 1}}]},
        headers=h), AppSchema)
    assert app["group_id"] == group and app["signers"][0] == {"nitro_enclave": {"pcr8": pcr8}}
    assert app["certificate_policy"] == {"require_known_image": True, "require_known_signer": False,
                                         "require_known_node": True}
    assert ok(client.get(f"/v1/apps/{app['app_id']}", headers=h), AppSchema) == app
    patched = ok(client.patch(f"/v1/apps/{app['app_id']}", json={"signers": [], "certificate_policy": {
        "require_known_image": False, "require_known_signer": True, "require_known_node": False}}, headers=h),
        AppSchema)
    assert patched["signers"] == [] and patched["certificate_policy"]["require_known_signer"] is True
    sgx = {"isvprodid": 3, "mem_size": 1024, "threads": 8}
    both = ok(client.patch(f"/v1/apps/{app['app_id']}", json={"default_build_settings": {
        "sgx": sgx, "nitro_enclaves": {"cpu_count": 4}}}, headers=h), AppSchema)
    assert both["default_build_settings"] == {"sgx": sgx, "nitro_enclaves": {"cpu_count": 4}}
    built = ok(client.post(SUBMIT, json=body(app["app_id"]) | {"nitro_enclaves_options": {}}, headers=h),
               BuildSchema)
    assert built["threads"] == 4  # the Nitro defaults apply; the SGX ones are only recorded
    plain = ok(client.post("/v1/apps", json={"name": f"p-{uuid.uuid4().hex[:6]}"}, headers=h), AppSchema)
    assert plain["signers"] == [] and plain["certificate_policy"] is None and plain["group_id"] is None
    for bad in ({"signers": [{}]}, {"signers": [{"nitro_enclave": {"pcr8": pcr8}, "sgx": {"mrsigner": "cd" * 32,
                                                                                         "isvprodid": 1}}]},
                {"signers": [{"nitro_enclave": {"pcr8": "zz"}}]}, {"certificate_policy": {"require_known_image": True}},
                {"group_id": "not-a-uuid"}):
        err(client.patch(f"/v1/apps/{app['app_id']}", json=bad, headers=h), 422, "validation_failed")
    err(client.patch(f"/v1/apps/{app['app_id']}", json={"group_id": group}, headers=tenant.headers("READER")),
        403, "forbidden")


def test_account_auth_configs_status_and_groups(client, tenant):
    h = tenant.headers()
    acct = ok(client.post("/v1/accounts", json={"name": "auth", "auth_configs": [PASSWORD_CONFIG]}, headers=h),
              AccountSchema)
    [(config_id, config)] = acct["auth_configs"].items()
    assert config == PASSWORD_CONFIG
    path = f"/v1/accounts/{acct['acct_id']}"
    group, market = str(uuid.uuid4()), str(uuid.uuid4())
    changed = ok(client.patch(path, json={
        "enabled": True, "account_status": "Active", "default_group_id": group, "marketplace_group_id": market,
        "azure_cvm_pcr_priority": list(range(22, -1, -1)), "add_auth_configs": [PASSWORD_CONFIG],
        "mod_auth_configs": {config_id: PASSWORD_CONFIG}}, headers=h), AccountSchema)
    assert (changed["default_group_id"], changed["marketplace_group_id"]) == (group, market)
    assert changed["azure_cvm_pcr_priority"] == list(range(22, -1, -1)) and changed["account_status"] == "Active"
    assert ok(client.get(path, headers=h), AccountSchema)["totals"] is None
    assert ok(client.get(f"{path}?with_totals=true", headers=h), AccountSchema)["totals"] == {
        "datasets": 0, "final_workflows": 0, "nodes": 0}
    for bad, status, code in (
            ({"enabled": False, "account_status": "Active"}, 422, "account_status_conflict"),
            ({"add_auth_configs": [{"password": {"require_2fa": True, "administrators_only": False}}]}, 422,
             "auth_method_unsupported"),
            ({"add_auth_configs": [{"oauth": {"idp_name": "x"}}]}, 422, "auth_method_unsupported"),
            ({"del_auth_configs": [config_id]}, 422, "auth_config_required"),
            ({"del_auth_configs": [str(uuid.uuid4())]}, 404, "auth_config_not_found"),
            ({"mod_auth_configs": {str(uuid.uuid4()): PASSWORD_CONFIG}}, 404, "auth_config_not_found"),
            ({"azure_cvm_pcr_priority": [0, 1, 2]}, 422, "validation_failed"),
            ({"account_status": "Paused"}, 422, "validation_failed")):
        err(client.patch(path, json=bad, headers=h), status, code)
    assert ok(client.get(path, headers=h), AccountSchema)["account_status"] == "Active"
    err(client.post("/v1/accounts", json={"name": "sso", "auth_configs": [{"oauth": {}}]}, headers=h), 422,
        "auth_method_unsupported")
    err(client.patch(f"/v1/accounts/{tenant.account_id}", json={"enabled": True},
                     headers=tenant.headers("WRITER")), 403, "forbidden")


def test_accounts_list_scope_sort_and_pages(client, tenant):
    h = tenant.headers()
    made = [ok(client.post("/v1/accounts", json={"name": name}, headers=h), AccountSchema)["acct_id"]
            for name in ("m-b", "m-c", "m-a")]
    everything = ok(client.get("/v1/accounts?sort_by=name:ASC", headers=h), AccountListSchema)["items"]
    names = [a["name"] for a in everything]
    assert names == sorted(names, key=str.casefold) and set(made) <= {a["acct_id"] for a in everything}
    pages, previous = [], None
    while True:
        query = "sort_by=name:DESC&limit=2" + (f"&previous_id={previous}" if previous else "")
        page = ok(client.get(f"/v1/accounts?{query}", headers=h), AccountListSchema)["items"]
        if not page:
            break
        assert len(page) <= 2
        pages += [a["name"] for a in page]
        previous = page[-1]["acct_id"]
    assert pages == list(reversed(names))
    assert ok(client.get("/v1/accounts?scope=USER&limit=1", headers=h), AccountListSchema)["items"][0][
        "acct_id"] == str(tenant.account_id)  # created_at:ASC by default: the tenant's own comes first
    err(client.get("/v1/accounts?scope=SYSTEM", headers=h), 403, "system_scope_forbidden")
    err(client.get("/v1/accounts?scope=GALAXY", headers=h), 422, "validation_failed")
    err(client.get(f"/v1/accounts?previous_id={uuid.uuid4()}", headers=h), 422, "validation_failed")
    err(client.get("/v1/accounts?sort_by=password:ASC", headers=h), 422, "validation_failed")


def test_user_names_email_status_and_roles(client, tenant, make_tenant):
    reader = ok(client.get("/v1/user", headers=tenant.headers("READER")), UserSchema)
    writer = ok(client.get("/v1/user", headers=tenant.headers("WRITER")), UserSchema)
    path = f"/v1/users/{reader['user_id']}"
    # The user's own names and e-mail, whatever the role.
    mine = ok(client.patch(path, json={"first_name": "Ada", "last_name": "Lovelace", "user_account_status": "ACTIVE"},
                           headers=tenant.headers("READER")), UserSchema)
    assert (mine["first_name"], mine["last_name"], mine["roles"]) == ("Ada", "Lovelace", ["READER"])
    err(client.patch(path, json={"roles": ["MANAGER"]}, headers=tenant.headers("READER")), 403, "forbidden")
    err(client.patch(f"/v1/users/{writer['user_id']}", json={"first_name": "X"}, headers=tenant.headers("READER")),
        403, "forbidden")
    err(client.patch(f"/v1/users/{writer['user_id']}", json={"user_email": "w@example.test"},
                     headers=tenant.headers()), 403, "not_own_user")
    err(client.patch(path, json={"user_email": tenant.emails["WRITER"]}, headers=tenant.headers("READER")),
        409, "email_taken")
    err(client.patch(path, json={"user_account_status": "DISABLED"}, headers=tenant.headers("WRITER")), 403,
        "forbidden")
    # A MANAGER changes names and roles at once; nothing is written when one part is refused.
    err(client.patch(path, json={"last_name": "B", "user_account_status": "PENDING"}, headers=tenant.headers()),
        422, "user_account_status_unsupported")
    both = ok(client.patch(path, json={"last_name": "Byron", "roles": ["WRITER"]}, headers=tenant.headers()),
              UserSchema)
    assert (both["first_name"], both["last_name"], both["roles"]) == ("Ada", "Byron", ["WRITER"])
    new_email = f"ada-{uuid.uuid4().hex[:6]}@example.test"
    moved = ok(client.patch(path, json={"user_email": new_email.upper()}, headers=tenant.headers("READER")),
               UserSchema)
    assert moved["user_email"] == new_email
    ok(client.post("/v1/sys/auth", headers=basic(new_email, PASSWORD)), None)
    err(client.post("/v1/sys/auth", headers=basic(tenant.emails["READER"], PASSWORD)), 401, "unauthenticated")
    # Another account's member is a 404.
    other = make_tenant()
    err(client.patch(path, json={"first_name": "Z"}, headers=other.headers()), 404, "not_found")
    # Names given at sign-up and invitation are kept.
    invited = ok(client.post("/v1/users/invite", json={"user_email": f"i-{uuid.uuid4().hex[:6]}@example.test",
                                                      "roles": ["READER"], "first_name": "Inv", "last_name": "Ited"},
                             headers=tenant.headers()), UserSchema, 201)
    assert (invited["first_name"], invited["last_name"]) == ("Inv", "Ited")
    added = ok(client.post("/v1/users", json={"user_email": f"s-{uuid.uuid4().hex[:6]}@example.test",
                                              "user_password": "long-enough-pw", "first_name": "Sig",
                                              "last_name": "Nup", "recaptcha_response": "x"},
                           headers=tenant.headers()), UserSchema, 201)
    assert (added["first_name"], added["last_name"]) == ("Sig", "Nup")


def test_users_list_search_sort_and_pages(client, tenant):
    h = tenant.headers()
    for first, last in (("Zed", "Alpha"), ("Amy", "Omega")):
        ok(client.post("/v1/users", json={"user_email": f"{first.lower()}-{uuid.uuid4().hex[:6]}@example.test",
                                          "user_password": "long-enough-pw", "first_name": first,
                                          "last_name": last}, headers=h), UserSchema, 201)
    everyone = ok(client.get("/v1/users", headers=h), UserListSchema)
    assert everyone["metadata"]["total_count"] == everyone["metadata"]["filtered_count"] == 5
    found = ok(client.get("/v1/users?all_search=OMEG", headers=h), UserListSchema)
    assert [u["first_name"] for u in found["items"]] == ["Amy"] and found["metadata"]["filtered_count"] == 1
    assert [u["first_name"] for u in ok(client.get("/v1/users?all_search=zed-", headers=h),
                                        UserListSchema)["items"]] == ["Zed"]  # the e-mail
    named = ok(client.get("/v1/users?sort_by=last_name:ASC", headers=h), UserListSchema)["items"]
    assert [u["last_name"] for u in named][:2] == ["Alpha", "Omega"]  # unnamed members last
    by_first = ok(client.get("/v1/users?sort_by=first_name:DESC,user_email:ASC", headers=h), UserListSchema)["items"]
    assert [u["first_name"] for u in by_first][:2] == ["Zed", "Amy"]
    page = ok(client.get("/v1/users?sort_by=user_email:ASC&limit=2&offset=2", headers=h), UserListSchema)
    emails = sorted(u["user_email"] for u in everyone["items"])
    assert [u["user_email"] for u in page["items"]] == emails[2:4] and page["metadata"]["page"] == 2
    assert ok(client.get("/v1/users?all_search=100%25", headers=h), UserListSchema)["items"] == []
    err(client.get("/v1/users?sort_by=password_hash:ASC", headers=h), 422, "validation_failed")


def test_build_configs_attach_detach_and_find(client, tenant):
    h = tenant.headers("WRITER")
    app_id = tenant.create_app()
    first, second = (ok(client.post(SUBMIT, json=body(app_id), headers=h), BuildSchema)["build_id"] for _ in "ab")
    path = f"/v1/builds/{first}"
    config = {"app_config": {"/opt/app.conf": {"contents": "eA=="}}, "labels": {"k": "v"}, "zone_ca": []}
    one = ok(client.patch(path, json={"configs": {"cfg-1": config, "cfg-2": {}}}, headers=h), BuildSchema)
    assert one["configs"] == {"cfg-1": config, "cfg-2": {}}
    two = ok(client.patch(path, json={"configs": {"cfg-2": None, "cfg-3": {"x": 1}}}, headers=h), BuildSchema)
    assert two["configs"] == {"cfg-1": config, "cfg-3": {"x": 1}}
    assert ok(client.patch(path, json={}, headers=h), BuildSchema)["configs"] == two["configs"]
    assert ok(client.get(path, headers=h), BuildSchema)["configs"] == two["configs"]
    found = ok(client.get("/v1/builds?config_id=cfg-1", headers=h), BuildListSchema)
    assert [b["build_id"] for b in found["items"]] == [first] and found["metadata"]["filtered_count"] == 1
    assert ok(client.get("/v1/builds?config_id=cfg-2", headers=h), BuildListSchema)["items"] == []
    assert ok(client.get(f"/v1/builds/{second}", headers=h), BuildSchema)["configs"] == {}
    err(client.patch(path, json={"configs": {"big": {"x": "y" * 70000}}}, headers=h), 422, "configs_too_large")
    err(client.patch(path, json={"configs": {"k": "not an object"}}, headers=h), 422, "validation_failed")
    err(client.patch(path, json={"configs": {"": {}}}, headers=h), 422, "validation_failed")
    err(client.patch(path, json={"configs": {"cfg-9": {}}}, headers=tenant.headers("READER")), 403, "forbidden")
    err(client.patch(f"/v1/builds/{uuid.uuid4()}", json={"configs": {"cfg-9": {}}}, headers=h), 404, "not_found")
    assert ok(client.get(path, headers=h), BuildSchema)["configs"] == two["configs"]


def test_apps_and_builds_filter_by_group(client, tenant):
    h = tenant.headers("WRITER")
    group, other = str(uuid.uuid4()), str(uuid.uuid4())
    grouped = ok(client.post("/v1/apps", json={"name": f"g-{uuid.uuid4().hex[:6]}", "group_id": group}, headers=h),
                 AppSchema)["app_id"]
    loose = tenant.create_app()
    build = ok(client.post(SUBMIT, json=body(grouped), headers=h), BuildSchema)["build_id"]
    ok(client.post(SUBMIT, json=body(loose), headers=h), BuildSchema)
    one = json.dumps({"groups": [group]})
    assert [a["app_id"] for a in ok(client.get("/v1/apps", query_string={"filter": one}, headers=h),
                                    AppListSchema)["items"]] == [grouped]
    assert [b["build_id"] for b in ok(client.get("/v1/builds", query_string={"filter": one}, headers=h),
                                      BuildListSchema)["items"]] == [build]
    both = json.dumps({"groups": [group, other]})
    assert ok(client.get("/v1/apps", query_string={"filter": both}, headers=h), AppListSchema)["metadata"][
        "filtered_count"] == 1
    assert ok(client.get("/v1/apps", query_string={"filter": json.dumps({"groups": [other]})}, headers=h),
              AppListSchema)["items"] == []
    for bad in ("groups", "{}", '{"groups": "x"}', '{"groups": ["not-a-uuid"]}', '{"groups": [], "labels": {}}'):
        for path in ("/v1/apps", "/v1/builds"):
            err(client.get(path, query_string={"filter": bad}, headers=h), 422, "validation_failed")


def test_tasks_sort_by(client, tenant, service_settings):
    h = tenant.headers("WRITER")
    app_id = tenant.create_app()
    builds = [ok(client.post(SUBMIT, json=body(app_id), headers=h), BuildSchema)["build_id"] for _ in "ab"]
    for build in builds:
        drive_to_success(service_settings, build)
    newest_first = [t["build_id"] for t in ok(client.get("/v1/tasks", headers=h), TaskListSchema)["items"]]
    assert newest_first == builds[::-1]
    assert [t["build_id"] for t in ok(client.get("/v1/tasks?sort_by=created_at:ASC", headers=h),
                                      TaskListSchema)["items"]] == builds
    err(client.get("/v1/tasks?sort_by=requester_password:ASC", headers=h), 422, "validation_failed")


def test_builds_by_docker_image_name_of_the_build_or_its_app(client, tenant):
    h = tenant.headers("WRITER")
    named = ok(client.post("/v1/apps", json={"name": f"n-{uuid.uuid4().hex[:6]}",
                                             "output_image_name": "127.0.0.1:5000/app-out:1"}, headers=h),
               AppSchema)["app_id"]
    by_app = ok(client.post(SUBMIT, json=body(named), headers=h), BuildSchema)["build_id"]
    by_build = ok(client.post(SUBMIT, json=body(tenant.create_app(), output_image={
        "name": "127.0.0.1:5000/app-out:1"}), headers=h), BuildSchema)["build_id"]
    ok(client.post(SUBMIT, json=body(tenant.create_app()), headers=h), BuildSchema)
    found = ok(client.get("/v1/builds", query_string={"docker_image_name": "127.0.0.1:5000/app-out:1"}, headers=h),
               BuildListSchema)
    assert sorted(b["build_id"] for b in found["items"]) == sorted([by_app, by_build])
