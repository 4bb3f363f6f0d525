"""CCM's account status and a member's status in an account, against the running stack: a deactivated account
keeps its data and refuses its members until a MANAGER enables it; a DISABLED member cannot sign in to, select or
act in the account until a MANAGER enables them; refused requests write nothing. And a Build's `group_id`."""
from __future__ import annotations

import uuid

import pytest
from sqlalchemy import func, select

from api.schemas.builds import BuildListSchema, BuildSchema
from api.schemas.sys import AccountListSchema, AccountSchema, UserSchema
from api.submission import roles_at_least, submit_build
from common.store import builds as buildstore
from common.store.accounts import Role
from common.store.engine import engine_for, session_scope
from common.store.models import Account, Build, Membership, User
from tests.fixtures.service import PASSWORD, basic

from .helpers import body, err, new_account, new_build, ok

pytestmark = pytest.mark.integration
SUBMIT = "/v1/builds/convert-app/nitro-enclaves"


def _builds(url: str, account_id: uuid.UUID) -> int:
    with session_scope(url) as session:
        return session.execute(select(func.count()).select_from(Build).where(Build.account_id == account_id)
                               ).scalar_one()


def _sign_in(client, email: str):  # noqa: ANN001, ANN202
    return client.post("/v1/sys/auth", headers=basic(email, PASSWORD))


def test_a_deactivated_account_keeps_its_data_and_refuses_its_members(client, tenant, service_settings):
    url = service_settings.database_url
    app_id = tenant.create_app()
    writer, reader, manager = tenant.headers("WRITER"), tenant.headers("READER"), tenant.headers()
    build_id = ok(client.post(SUBMIT, json=body(app_id), headers=writer), BuildSchema)["build_id"]
    path = f"/v1/accounts/{tenant.account_id}"
    err(client.patch(path, json={"enabled": False}, headers=writer), 403, "forbidden")
    off = ok(client.patch(path, json={"enabled": False}, headers=manager), AccountSchema)
    assert off["account_status"] == "Deactivated"

    # Its members' live sessions are refused at once, with the code; a submission writes nothing.
    for headers, method, where in ((writer, "POST", SUBMIT), (reader, "GET", f"/v1/builds/{build_id}"),
                                   (reader, "GET", "/v1/apps"), (manager, "GET", "/v1/users")):
        err(client.open(where, method=method, json=body(app_id) if method == "POST" else None, headers=headers),
            403, "account_deactivated")
    assert _builds(url, tenant.account_id) == 1
    # A new sign-in lands on no account, and the account cannot be selected.
    signed = _sign_in(client, tenant.emails["WRITER"])
    assert signed.status_code == 200 and signed.json["session_info"]["selected_account_id"] is None
    fresh = {"Authorization": f"Bearer {signed.json['access_token']}"}
    err(client.post(f"/v1/sys/session/select_account/{tenant.account_id}", headers=fresh), 403,
        "account_deactivated")
    # It is listed as deactivated; its MANAGER can only enable it again (nothing else is changed meanwhile).
    listed = ok(client.get("/v1/accounts", headers=manager), AccountListSchema)["items"]
    assert [a["account_status"] for a in listed if a["acct_id"] == str(tenant.account_id)] == ["Deactivated"]
    err(client.patch(path, json={"name": "renamed"}, headers=manager), 403, "account_deactivated")
    err(client.patch(path, json={"enabled": True}, headers=tenant.headers("WRITER")), 403, "forbidden")
    err(client.patch(path, json={"enabled": True, "account_status": "Deactivated"}, headers=manager), 422,
        "account_status_conflict")
    with session_scope(url) as session:
        account = session.get(Account, tenant.account_id)
        assert account is not None and not account.enabled and account.name.startswith("acct-")

    on = ok(client.patch(path, json={"account_status": "Active", "name": "back"}, headers=manager), AccountSchema)
    assert (on["account_status"], on["name"]) == ("Active", "back")
    # The same tokens act again, on the data kept.
    assert ok(client.get(f"/v1/builds/{build_id}", headers=reader), BuildSchema)["build_id"] == build_id
    ok(client.post(SUBMIT, json=body(app_id), headers=writer), BuildSchema)
    assert _builds(url, tenant.account_id) == 2
    ok(client.post(f"/v1/sys/session/select_account/{tenant.account_id}", headers=fresh), None)


def test_a_deactivated_account_can_be_deleted_by_its_manager(client, tenant, service_settings):
    path = f"/v1/accounts/{tenant.account_id}"
    ok(client.patch(path, json={"account_status": "Deactivated"}, headers=tenant.headers()), AccountSchema)
    ok(client.delete(path, headers=tenant.headers()), None, 204)
    with session_scope(service_settings.database_url) as session:
        assert session.get(Account, tenant.account_id) is None


def _user_id(client, headers: dict[str, str]) -> str:  # noqa: ANN001
    return str(ok(client.get("/v1/user", headers=headers), UserSchema)["user_id"])


def test_a_disabled_member_cannot_sign_in_select_or_act_until_enabled(client, tenant, make_tenant, service_settings):
    url = service_settings.database_url
    app_id = tenant.create_app()
    writer, manager = tenant.headers("WRITER"), tenant.headers()
    writer_id = _user_id(client, writer)
    path = f"/v1/users/{writer_id}"
    # Tenancy and roles: another account's MANAGER does not see the member; a WRITER cannot disable.
    err(client.patch(path, json={"user_account_status": "DISABLED"}, headers=make_tenant().headers()), 404)
    err(client.patch(path, json={"user_account_status": "DISABLED"}, headers=tenant.headers("READER")), 403,
        "forbidden")
    err(client.patch(f"/v1/users/{_user_id(client, manager)}", json={"user_account_status": "DISABLED"},
                     headers=manager), 403, "cannot_disable_self")
    # Refused as a whole: a name change with a status that cannot be set writes nothing.
    err(client.patch(path, json={"first_name": "Nope", "user_account_status": "PENDING"}, headers=manager), 422,
        "user_account_status_unsupported")
    with session_scope(url) as session:
        assert session.get(User, uuid.UUID(writer_id)).first_name is None  # type: ignore[union-attr]

    off = ok(client.patch(path, json={"user_account_status": "DISABLED"}, headers=manager), UserSchema)
    assert (off["user_account_status"], off["status"]) == ("DISABLED", "ACTIVE")
    err(client.get("/v1/apps", headers=writer), 403, "user_disabled")
    err(client.post(SUBMIT, json=body(app_id), headers=writer), 403, "user_disabled")
    assert _builds(url, tenant.account_id) == 0
    # Disabled in the only account they belong to: no sign-in.
    err(_sign_in(client, tenant.emails["WRITER"]), 403, "user_disabled")
    assert ok(client.get(path, headers=manager), UserSchema)["user_account_status"] == "DISABLED"

    # Another account of theirs is not affected: they sign in there, and cannot select this one.
    with session_scope(url) as session:
        other = Account(id=uuid.uuid4(), name="elsewhere")
        session.add(other)
        session.flush()
        session.add(Membership(user_id=uuid.UUID(writer_id), account_id=other.id, role=Role.MANAGER.value))
    signed = _sign_in(client, tenant.emails["WRITER"])
    assert signed.status_code == 200 and signed.json["session_info"]["selected_account_id"] == str(other.id)
    elsewhere = {"Authorization": f"Bearer {signed.json['access_token']}"}
    err(client.post(f"/v1/sys/session/select_account/{tenant.account_id}", headers=elsewhere), 403, "user_disabled")
    statuses = client.get(f"/v1/users/{writer_id}/accounts", headers=elsewhere).json
    assert (statuses[str(tenant.account_id)]["status"], statuses[str(other.id)]["status"]) == ("DISABLED", "ACTIVE")
    mine = ok(client.get("/v1/accounts", headers=elsewhere), AccountListSchema)["items"]
    assert {a["acct_id"]: a["status"] for a in mine} == {str(tenant.account_id): "DISABLED", str(other.id): "ACTIVE"}

    on = ok(client.patch(path, json={"user_account_status": "ACTIVE"}, headers=manager), UserSchema)
    assert on["user_account_status"] == "ACTIVE"
    ok(client.post(SUBMIT, json=body(app_id), headers=writer), BuildSchema)
    ok(client.post(f"/v1/sys/session/select_account/{tenant.account_id}", headers=elsewhere), None)


def test_a_disabled_manager_does_not_count_as_the_accounts_manager(client, tenant):
    manager = tenant.headers()
    writer_id = _user_id(client, tenant.headers("WRITER"))
    ok(client.patch(f"/v1/users/{writer_id}", json={"roles": ["MANAGER"]}, headers=manager), UserSchema)
    ok(client.patch(f"/v1/users/{writer_id}", json={"user_account_status": "DISABLED"}, headers=manager),
       UserSchema)
    # The only MANAGER who can act keeps the role.
    err(client.patch(f"/v1/users/{_user_id(client, manager)}", json={"roles": ["READER"]}, headers=manager), 403)
    err(client.patch(f"/v1/accounts/{tenant.account_id}", json={"enabled": False}, headers=tenant.headers("WRITER")),
        403, "user_disabled")


def test_a_pending_member_is_enabled_back_to_pending(client, tenant):
    invited = ok(client.post("/v1/users/invite", json={"user_email": f"p-{uuid.uuid4().hex[:8]}@example.test",
                                                       "roles": ["READER"]}, headers=tenant.headers()), UserSchema, 201)
    path = f"/v1/users/{invited['user_id']}"
    err(client.patch(path, json={"user_account_status": "ACTIVE"}, headers=tenant.headers()), 422,
        "user_account_status_unsupported")
    ok(client.patch(path, json={"user_account_status": "DISABLED"}, headers=tenant.headers()), UserSchema)
    err(client.patch(path, json={"user_account_status": "ACTIVE"}, headers=tenant.headers()), 422,
        "user_account_status_unsupported")
    back = ok(client.patch(path, json={"user_account_status": "PENDING"}, headers=tenant.headers()), UserSchema)
    assert back["user_account_status"] == "PENDING"


WRITERS = roles_at_least(Role.WRITER)


def test_the_submit_function_refuses_a_deactivated_account_or_disabled_member(service_settings):
    url = service_settings.database_url
    account = new_account(url)
    with session_scope(url) as session:
        user = User(id=uuid.uuid4(), email=f"u-{uuid.uuid4().hex[:8]}@example.test", password_hash="x")
        session.add(user)
        session.flush()
        session.add(Membership(user_id=user.id, account_id=account[0], role="WRITER"))
        outsider = User(id=uuid.uuid4(), email=f"o-{uuid.uuid4().hex[:8]}@example.test", password_hash="x")
        session.add(outsider)
        user_id, outsider_id = user.id, outsider.id

    def submit(who: uuid.UUID) -> str:
        row = buildstore.build_row(new_build(account, created_by=who))
        return submit_build(engine_for(url, 5), row, user_id=who, account_id=account[0], roles=WRITERS,
                            app_settings="{}", quota=None).outcome

    def set_flags(enabled: bool, disabled: bool) -> None:
        with session_scope(url) as session:
            session.get(Account, account[0]).enabled = enabled  # type: ignore[union-attr]
            session.get(Membership, (user_id, account[0])).disabled = disabled  # type: ignore[union-attr]

    set_flags(False, False)
    assert (submit(user_id), submit(outsider_id)) == ("deactivated", "role")  # a non-member learns nothing
    set_flags(True, True)
    assert submit(user_id) == "disabled"
    set_flags(False, True)
    assert submit(user_id) == "deactivated"
    assert _builds(url, account[0]) == 0
    set_flags(True, False)
    assert submit(user_id) == "created"


def test_a_builds_group_is_its_apps(client, tenant):
    h = tenant.headers("WRITER")
    group = str(uuid.uuid4())
    grouped = tenant.create_app(group_id=group)
    plain = tenant.create_app()
    built = ok(client.post(SUBMIT, json=body(grouped), headers=h), BuildSchema)
    assert built["group_id"] == group
    assert ok(client.get(f"/v1/builds/{built['build_id']}", headers=h), BuildSchema)["group_id"] == group
    again = ok(client.post(SUBMIT, json=body(grouped), headers=h | {"Idempotency-Key": "k1"}), BuildSchema)
    assert ok(client.post(SUBMIT, json=body(grouped), headers=h | {"Idempotency-Key": "k1"}), BuildSchema)[
        "group_id"] == group == again["group_id"]
    assert ok(client.post(SUBMIT, json=body(plain), headers=h), BuildSchema)["group_id"] is None
    listed = ok(client.get("/v1/builds", headers=h), BuildListSchema)["items"]
    assert {b["app_id"]: b["group_id"] for b in listed} == {grouped: group, plain: None}
