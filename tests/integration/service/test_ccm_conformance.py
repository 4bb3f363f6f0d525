"""Every operation of CCM's API document under /v1/sys, /v1/accounts, /v1/user(s), /v1/apps, /v1/builds and
/v1/tasks (tests/data/ccm/contract.json), called as a client generated from that document calls it: each request
is checked against CCM's request schema (documented fields only), each answer must carry the documented success
code and read as CCM's response schema (required fields, types, formats, enums); the operations for other
platforms or nodes must answer our error envelope with a code saying so. Our OpenAPI document must declare the
same operations, codes and required fields."""
from __future__ import annotations

import json
import re
import time
import uuid
from collections import defaultdict

import pytest
from werkzeug.exceptions import HTTPException

from tests.fixtures.images import push_test_image
from tests.fixtures.service import PASSWORD, basic

from .ccm_contract import OPERATIONS, our_path, problems, request_problems, resolve
from .helpers import err

pytestmark = pytest.mark.integration

# CCM operations whose subject this service does not have: (status, error code).
UNSUPPORTED = {
    ("POST", "/v1/builds"): (422, "platform_not_supported"),
    ("POST", "/v1/builds/convert-app/aci"): (422, "platform_not_supported"),
    ("GET", "/v1/builds/deployments/{build-id}"): (404, "nodes_not_supported"),
    ("GET", "/v1/apps/{app-id}/node/{node-id}/certificate"): (404, "nodes_not_supported"),
    ("GET", "/v1/apps/{app-id}/node/{node-id}/certificate-details"): (404, "nodes_not_supported"),
}


class CcmClient:
    """Calls operations by CCM's method and path template, checking each against the contract."""

    def __init__(self, client, token: str | None = None) -> None:  # noqa: ANN001
        self.client = client
        self.token = token
        self.called: set[tuple[str, str]] = set()
        # What the calls sent of each operation's documented request: top-level body fields, query parameters.
        self.fields: dict[tuple[str, str], set[str]] = defaultdict(set)
        self.queries: dict[tuple[str, str], set[str]] = defaultdict(set)

    def adopt(self, other: CcmClient) -> None:
        self.called |= other.called
        for key, names in other.fields.items():
            self.fields[key] |= names
        for key, names in other.queries.items():
            self.queries[key] |= names

    def headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        # CCM documents `Authentication: Bearer`, as its generated client sends it.
        return {**({"Authentication": f"Bearer {self.token}"} if self.token else {}), **(extra or {})}

    def call(self, method: str, template: str, *, params: dict[str, object] | None = None, body: object = None,
             query: dict[str, str] | None = None, headers: dict[str, str] | None = None,
             refused: tuple[int, str] | None = None) -> object:
        """The operation's answer, checked; with `refused`, the documented request must get that error."""
        op = OPERATIONS[(method, template)]
        if body is not None:
            assert request_problems(body, op["body"]) == [], (template, request_problems(body, op["body"]))
        assert set(query or {}) <= set(op["query"]), (template, set(query or {}) - set(op["query"]))
        path = template
        for name, value in (params or {}).items():
            path = path.replace("{" + name + "}", str(value))
        resp = self.client.open(path, method=method, json=body, query_string=query,
                                headers=self.headers(headers))
        self.called.add((method, template))
        if isinstance(body, dict):
            self.fields[(method, template)] |= set(body)
        self.queries[(method, template)] |= set(query or {})
        if refused is not None:
            err(resp, *refused)
            return None
        if (method, template) in UNSUPPORTED:
            status, code = UNSUPPORTED[(method, template)]
            err(resp, status, code)
            return None
        assert resp.status_code == op["success"], (method, template, resp.status_code, resp.json)
        if op["success"] == 204:
            assert resp.get_data() == b""
            return None
        found = problems(resp.json, op["response"])
        assert found == [], (method, template, found)
        return resp.json


def test_every_ccm_operation_answers_as_documented(flow, registry):  # noqa: ANN001
    client, tenant = flow.client, flow.tenant()
    image = push_test_image(registry, f"ccm/app-{uuid.uuid4().hex[:6]}", "1")
    src, dst = f"{registry.host}/{image.repo}:1", f"{registry.host}/ccm/out-{uuid.uuid4().hex[:6]}:1"
    anonymous = CcmClient(client)
    version = anonymous.call("GET", "/v1/sys/version")
    assert version["version"]
    assert anonymous.call("POST", "/v1/sys/auth/discover", body={"user_email": tenant.emails["MANAGER"]},
                          query={"acct_id": str(tenant.account_id)})["auth_methods"] == [{"password": {}}]
    anonymous.call("POST", "/v1/sys/auth", body={"oauth_auth_code": {"idp_id": "aWRw", "code": "c"}},
                   refused=(422, "auth_method_unsupported"))
    auth = anonymous.call("POST", "/v1/sys/auth", headers=basic(tenant.emails["MANAGER"], PASSWORD))
    ccm = CcmClient(client, auth["access_token"])
    ccm.adopt(anonymous)
    session = auth["session_info"]
    me = ccm.call("GET", "/v1/user")
    assert me["user_id"] == session["subject_id"]

    # Accounts and the session's account.
    password_config = {"password": {"require_2fa": False, "administrators_only": False}}
    acct = ccm.call("POST", "/v1/accounts", body={
        "name": "conformance", "component": "DEFAULT", "custom_logo": "bG9nbw==", "auth_configs": [password_config],
        "node_enrollment": {"attestation_enforcement_disabled_insecure": False}})
    listed = ccm.call("GET", "/v1/accounts", query={"limit": "10", "scope": "USER", "sort_by": "created_at:ASC"})
    assert [a["acct_id"] for a in listed["items"]] == [str(tenant.account_id), acct["acct_id"]]
    assert [a["acct_id"] for a in ccm.call("GET", "/v1/accounts", query={
        "previous_id": str(tenant.account_id), "sort_by": "created_at:ASC"})["items"]] == [acct["acct_id"]]
    assert ccm.call("GET", "/v1/accounts/{account-id}", params={"account-id": acct["acct_id"]},
                    query={"with_totals": "true"})["totals"] == {"datasets": 0, "final_workflows": 0, "nodes": 0}
    [config_id] = acct["auth_configs"]
    ccm.call("PATCH", "/v1/accounts/{account-id}", params={"account-id": acct["acct_id"]}, body={
        "name": "conformance-renamed", "custom_logo": "bG9nbw==", "add_auth_configs": [password_config],
        "mod_auth_configs": {config_id: password_config}, "del_auth_configs": [], "enabled": True,
        "account_status": "Active", "default_group_id": str(uuid.uuid4()), "marketplace_group_id": str(uuid.uuid4()),
        "azure_cvm_pcr_priority": list(range(23))})
    assert ccm.call("PATCH", "/v1/accounts/{account-id}", params={"account-id": acct["acct_id"]},
                    body={"account_status": "Deactivated"})["account_status"] == "Deactivated"
    ccm.call("POST", "/v1/sys/session/select_account/{account-id}", params={"account-id": acct["acct_id"]},
             refused=(403, "account_deactivated"))
    assert ccm.call("PATCH", "/v1/accounts/{account-id}", params={"account-id": acct["acct_id"]},
                    body={"enabled": True})["account_status"] == "Active"
    moved = ccm.call("POST", "/v1/sys/session/select_account/{account-id}", params={"account-id": acct["acct_id"]})
    assert moved["session_info"]["selected_account_id"] == acct["acct_id"]
    ccm.call("POST", "/v1/sys/session/refresh")

    # Users of the account.
    new_email = f"ccm-{uuid.uuid4().hex[:8]}@example.test"
    created = ccm.call("POST", "/v1/users", body={"user_email": new_email, "user_password": "long-enough-pw",
                                                  "first_name": "New", "last_name": "Member", "recaptcha_response": ""})
    invited = ccm.call("POST", "/v1/users/invite", body={"user_email": f"inv-{uuid.uuid4().hex[:8]}@example.test",
                                                         "roles": ["READER"], "first_name": "In", "last_name": "Vited"})
    assert {u["user_id"] for u in ccm.call("GET", "/v1/users", query={"limit": "50", "offset": "0"})["items"]} >= {
        created["user_id"], invited["user_id"]}
    assert [u["user_id"] for u in ccm.call("GET", "/v1/users", query={
        "all_search": "vited", "sort_by": "last_name:ASC,user_email:DESC"})["items"]] == [invited["user_id"]]
    ccm.call("GET", "/v1/users/{user-id}", params={"user-id": created["user_id"]})
    changed = ccm.call("PATCH", "/v1/users/{user-id}", params={"user-id": created["user_id"]}, body={
        "roles": ["WRITER"], "first_name": "Renamed", "last_name": "Member", "user_account_status": "ACTIVE"})
    assert (changed["roles"], changed["first_name"]) == (["WRITER"], "Renamed")
    assert ccm.call("PATCH", "/v1/users/{user-id}", params={"user-id": me["user_id"]},
                    body={"user_email": tenant.emails["MANAGER"]})["user_email"] == tenant.emails["MANAGER"]
    assert ccm.call("PATCH", "/v1/users/{user-id}", params={"user-id": created["user_id"]},
                    body={"user_account_status": "DISABLED"})["user_account_status"] == "DISABLED"
    assert ccm.call("PATCH", "/v1/users/{user-id}", params={"user-id": created["user_id"]},
                    body={"user_account_status": "ACTIVE"})["user_account_status"] == "ACTIVE"
    ccm.call("PATCH", "/v1/users/{user-id}", params={"user-id": created["user_id"]},
             body={"user_account_status": "PENDING"}, refused=(422, "user_account_status_unsupported"))
    accounts = ccm.call("GET", "/v1/users/{user-id}/accounts", params={"user-id": me["user_id"]})
    assert accounts[acct["acct_id"]]["roles"] == ["MANAGER"]
    ccm.call("DELETE", "/v1/users/{user-id}/accounts", params={"user-id": invited["user_id"]})
    ccm.call("DELETE", "/v1/users/{user-id}", params={"user-id": created["user_id"]})

    # Apps.
    group = str(uuid.uuid4())
    groups = json.dumps({"groups": [group]})
    app = ccm.call("POST", "/v1/apps", body={
        "name": "conformance", "description": "d", "input_image_name": src, "output_image_name": dst, "isvprodid": 1, "isvsvn": 1, "mem_size": 2048, "threads": 2,
        "allowed_domains": ["example.com"], "labels": {"team": "ccm"}, "custom_metadata": {"k": "v"},
        "advanced_settings": {"entrypoint": ["/bin/app"]}, "group_id": group,
        "certificate_policy": {"require_known_image": True, "require_known_signer": False},
        "signers": [{"nitro_enclave": {"pcr8": "ab" * 48}}],
        "default_build_settings": {"nitro_enclaves": {"cpu_count": 2},
                                   "sgx": {"isvprodid": 1, "mem_size": 1024, "threads": 2}}})
    assert app["signers"] == [{"nitro_enclave": {"pcr8": "ab" * 48}}]
    assert [a["app_id"] for a in ccm.call("GET", "/v1/apps", query={
        "all_search": "conf", "sort_by": "name:ASC,created_at:DESC", "limit": "5", "offset": "0",
        "name": "conformance", "description": "d", "filter": groups})["items"]] == [app["app_id"]]
    ccm.call("GET", "/v1/apps/{app-id}", params={"app-id": app["app_id"]})
    patched = ccm.call("PATCH", "/v1/apps/{app-id}", params={"app-id": app["app_id"]}, body={
        "description": "d", "input_image_name": src, "output_image_name": dst, "isvsvn": 2, "isvprodid": 1,
        "mem_size": 2048, "threads": 2, "default_build_settings": {"nitro_enclaves": {"cpu_count": 2}},
        "allowed_domains": ["example.com"], "advanced_settings": {"entrypoint": ["/bin/app"]},
        "labels": [{"op": "add", "path": "/", "value": {"tier": "1"}}],
        "custom_metadata": [{"op": "add", "path": "/", "value": {"k2": "v2"}}],
        "certificate_policy": {"require_known_image": False, "require_known_signer": True},
        "signers": [], "group_id": group})
    assert patched["labels"] == {"team": "ccm", "tier": "1"} and patched["custom_metadata"] == {"k": "v", "k2": "v2"}
    ccm.call("GET", "/v1/apps/unique_labels/count")

    # A conversion by the module's real worker, its Build (every poll read as CCM's Build), its task.
    request = {"request": {"app_id": app["app_id"], "input_image": {"name": src}, "output_image": {"name": dst},
                           "converter_options": {"env_vars": ["A=1"]}},
               "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 512}}
    build = ccm.call("POST", "/v1/builds/convert-app/nitro-enclaves", body=request)
    ccm.call("GET", "/v1/builds", query={"all_search": "ccm/out", "sort_by": "status:ASC,created_at:DESC",
                                         "status": "PENDING", "limit": "10", "offset": "0", "filter": groups,
                                         "docker_image_name": dst, "deployed_status": "UNDEPLOYED"})
    deadline = time.monotonic() + 240
    while (done := ccm.call("GET", "/v1/builds/{build-id}", params={"build-id": build["build_id"]})
           )["pending_task_id"] is None:
        assert done["conversion"]["state"] not in ("FAILED", "CANCELLED") and time.monotonic() < deadline, done
        time.sleep(0.5)
    assert done["conversion"]["state"] == "SUCCEEDED"
    assert done["attributes"]["eif"]["nitro_enclave"]["hash_algorithm"] == "Sha384"
    assert done["docker_info"]["docker_image_sha"] == done["conversion"]["output_digest"]
    config = {"app_config": {}, "labels": {"k": "v"}, "zone_ca": []}
    assert ccm.call("PATCH", "/v1/builds/{build-id}", params={"build-id": build["build_id"]},
                    body={"configs": {"cfg": config}})["configs"] == {"cfg": config}
    assert [b["build_id"] for b in ccm.call("GET", "/v1/builds", query={"config_id": "cfg"})["items"]] == [
        build["build_id"]]
    task_id = done["pending_task_id"]
    assert [t["task_id"] for t in ccm.call("GET", "/v1/tasks", query={
        "status": "PENDING", "task_type": "BUILD_WHITELIST", "limit": "10", "offset": "0",
        "requester": tenant.emails["MANAGER"], "all_search": "ccm/out", "sort_by": "created_at:DESC",
        "base_filters": "created_at:ASC"})["items"]] == [task_id]
    ccm.call("GET", "/v1/tasks", query={"approver": tenant.emails["MANAGER"]})
    ccm.call("GET", "/v1/tasks/{task-id}", params={"task-id": task_id})
    ccm.call("GET", "/v1/tasks/status/{task-id}", params={"task-id": task_id})
    ccm.call("PATCH", "/v1/tasks/{task-id}", params={"task-id": task_id},
             body={"status": "APPROVED", "denial_reason": ""})
    ccm.call("DELETE", "/v1/tasks/{task-id}", params={"task-id": task_id})

    # What is not here answers so.
    ccm.call("POST", "/v1/builds", body={"app_id": app["app_id"], "mrenclave": "00" * 32})
    ccm.call("POST", "/v1/builds/convert-app/aci", body=None)
    ccm.call("GET", "/v1/builds/deployments/{build-id}", params={"build-id": build["build_id"]})
    for template in ("/v1/apps/{app-id}/node/{node-id}/certificate",
                     "/v1/apps/{app-id}/node/{node-id}/certificate-details"):
        ccm.call("GET", template, params={"app-id": app["app_id"], "node-id": uuid.uuid4()})

    # Deletions, then the session's end.
    ccm.call("DELETE", "/v1/builds/{build-id}", params={"build-id": build["build_id"]})
    ccm.call("DELETE", "/v1/apps/{app-id}", params={"app-id": app["app_id"]})
    ccm.call("DELETE", "/v1/accounts/{account-id}", params={"account-id": acct["acct_id"]})
    ccm.call("POST", "/v1/sys/session/terminate")
    err(client.get("/v1/user", headers=ccm.headers()), 401, "unauthenticated")

    assert ccm.called == set(OPERATIONS), set(OPERATIONS) - ccm.called
    # Every documented request field and query parameter of what is served was sent, and answered as above.
    for key, op in OPERATIONS.items():
        if key in UNSUPPORTED:
            continue
        documented = set(resolve(op["body"]).get("properties", {})) if op["body"] else set()
        assert documented <= ccm.fields[key], (key, "body fields never sent", documented - ccm.fields[key])
        assert set(op["query"]) <= ccm.queries[key], (key, "query never sent", set(op["query"]) - ccm.queries[key])


def test_every_ccm_operation_is_routed(flask_app):  # noqa: ANN001
    """Each operation of the groups reaches a view of ours (the router neither 404s nor 405s it), so an operation
    CCM documents that this service lacks fails here, by name, before any flow runs."""
    adapter = flask_app.url_map.bind("localhost")
    missing = []
    for method, template in OPERATIONS:
        path = re.sub(r"\{[^}]+\}", str(uuid.uuid4()), template)
        try:
            adapter.match(path, method=method)
        except HTTPException:
            missing.append((method, template))
    assert missing == []


def _our_schema(doc: dict, schema: dict) -> dict:
    while "$ref" in schema:
        schema = doc["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def _forms(doc: dict, schema: dict) -> list[dict]:
    """The shapes our document allows at one place: a $ref, allOf of one, or each of oneOf/anyOf (flask-smorest
    writes a nullable nested schema as anyOf of it and a null object)."""
    schema = _our_schema(doc, schema)
    if "allOf" in schema and len(schema["allOf"]) == 1:
        return _forms(doc, schema["allOf"][0])
    alternatives = schema.get("oneOf") or schema.get("anyOf")
    return [form for alt in alternatives for form in _forms(doc, alt)] if alternatives else [schema]


def _undeclared(doc: dict, ccm: dict, ours: dict, where: str, depth: int = 0) -> list[str]:
    """CCM request fields, at any depth, that our document does not declare where CCM has them (a free-form
    object of ours takes anything)."""
    ccm = resolve(ccm)
    forms = _forms(doc, ours)
    if depth > 8:
        return []
    if ccm.get("type") == "array" and "items" in ccm:
        arrays = [f for f in forms if "items" in f]
        if not arrays:
            return [f"{where}: not an array in ours"]
        return [p for f in arrays[:1] for p in _undeclared(doc, ccm["items"], f["items"], where + "[]", depth + 1)]
    if not ccm.get("properties"):
        return []
    declared: dict[str, dict] = {}
    for form in forms:
        declared.update(form.get("properties", {}))
    if not declared and any(f.get("type") == "object" and "properties" not in f for f in forms):
        return []  # a free-form object
    found = []
    for name, prop in ccm["properties"].items():
        if name not in declared:
            found.append(f"{where}.{name}: not declared")
        else:
            found += _undeclared(doc, prop, declared[name], f"{where}.{name}", depth + 1)
    return found


def test_our_openapi_declares_ccms_operations_codes_and_required_fields(client):
    doc = client.get("/v1/openapi.json").json
    for (method, template), op in OPERATIONS.items():
        ours = doc["paths"].get(our_path(template), {}).get(method.lower())
        assert ours is not None, (method, template)
        if (method, template) in UNSUPPORTED:
            status, _ = UNSUPPORTED[(method, template)]
            assert str(status) in ours["responses"], (method, template)
            continue
        # The request: every documented query parameter and top-level body field is declared.
        declared = {p["name"] for p in ours.get("parameters", []) if p["in"] == "query"}
        assert set(op["query"]) <= declared, (method, template, set(op["query"]) - declared)
        if op["body"] is not None:
            content = ours.get("requestBody", {}).get("content", {}).get("application/json", {})
            assert "schema" in content, (method, template, "no request body")
            assert _undeclared(doc, op["body"], content["schema"], f"{method} {template}") == []
        assert str(op["success"]) in ours["responses"], (method, template, list(ours["responses"]))
        if op["response"] is None or op["success"] == 204:
            continue
        ccm_schema = resolve(op["response"])
        content = ours["responses"][str(op["success"])].get("content", {}).get("application/json", {})
        assert "schema" in content, (method, template)
        our_schema = _our_schema(doc, content["schema"])
        if ccm_schema.get("type", "object") == "object" and "properties" in ccm_schema:
            missing = set(ccm_schema.get("required", [])) - set(our_schema.get("required", []))
            assert not missing, (method, template, missing)


def test_the_checker_refuses_what_a_ccm_client_would():
    """The shapes issue 15 found, each refused by the checker (so the test above can fail)."""
    build = {"$ref": "#/definitions/Build"}
    status = {"status": "PENDING", "status_updated_at": 1}
    pcrs = {"hash_algorithm": "Sha384", "pcr0": "00", "pcr1": "11", "pcr2": "22"}
    good = {"status": status, "docker_info": {"docker_image_name": "x", "docker_version": ""},
            "attributes": {"eif": {"nitro_enclave": pcrs}}}
    assert problems(good, build) == []
    assert problems({**good, "docker_info": {"docker_image_name": "x", "docker_version": None}}, build)
    assert problems({**good, "attributes": {"nitro_enclave": pcrs}}, build)  # the PCRs one level too high
    assert problems({**good, "status": {"status": "QUEUED", "status_updated_at": 1}}, build)
    assert problems({"session_info": {"user_id": str(uuid.uuid4())}}, {"$ref": "#/definitions/SelectAccountResponse"})
    assert problems({"task_id": str(uuid.uuid4()), "entity_id": str(uuid.uuid4()), "status": status},
                    {"$ref": "#/definitions/Task"})
    assert request_problems({"name": "a", "input_image_name": "i", "output_image_name": "o", "colour": "red"},
                            {"$ref": "#/definitions/AppRequest"})
