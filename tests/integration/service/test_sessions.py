"""Sessions as CCM has them (migration 0007, api/sessions.py): the token names a server-side session;
select_account moves the calling session and the same token then acts there; refresh and terminate; an ended
or expired session's token is refused, also on the submission's one-statement path."""
from __future__ import annotations

import time
import uuid

import jwt
import pytest
from sqlalchemy import text, update

from api.schemas.apps import AppListSchema, AppSchema
from api.schemas.builds import BuildListSchema, BuildSchema
from api.schemas.sys import AccountSchema, SessionResponseSchema, TokenSchema, UserListSchema, UserSchema
from common.store.engine import session_scope
from common.store.models import Build
from common.store.models import Session as SessionRow
from tests.fixtures.service import PASSWORD, basic

from .helpers import body, err, ok

pytestmark = pytest.mark.integration
SUBMIT = "/v1/builds/convert-app/nitro-enclaves"


def _sign_in(client, email: str) -> tuple[str, dict]:  # noqa: ANN001
    data = ok(client.post("/v1/sys/auth", headers=basic(email, PASSWORD)), TokenSchema)
    return data["access_token"], data["session_info"]


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def tenant_db(client) -> str:  # noqa: ANN001
    return client.application.extensions["nitroconv.settings"].database_url


def _session_id(token: str) -> uuid.UUID:
    return uuid.UUID(jwt.decode(token, options={"verify_signature": False})["sub"])


def test_session_token_carries_only_the_session_and_ccm_session_info(client, tenant):
    token, info = _sign_in(client, tenant.emails["WRITER"])
    claims = jwt.decode(token, options={"verify_signature": False})
    assert set(claims) == {"sub", "iat", "exp", "iss", "aud"}
    assert info["subject_id"] == info["user_id"] and info["selected_account_id"] == str(tenant.account_id)
    assert info["session_token_expires_at"] <= info["session_expires_at"] == claims["exp"]
    assert info["session_token_expires_at"] - time.time() > 3000


def test_select_account_moves_the_calling_session_and_keeps_its_token(client, tenant):
    token, _ = _sign_in(client, tenant.emails["MANAGER"])
    other_token, _ = _sign_in(client, tenant.emails["MANAGER"])  # a second session of the same user
    h = _bearer(token)
    first_app = tenant.create_app()
    second = ok(client.post("/v1/accounts", json={"name": "second"}, headers=h), AccountSchema)
    moved = ok(client.post(f"/v1/sys/session/select_account/{second['acct_id']}", headers=h), SessionResponseSchema)
    assert moved["session_info"]["selected_account_id"] == second["acct_id"]
    # The same token now acts in the new account: the first account's app is another account's object.
    assert ok(client.get("/v1/apps", headers=h), AppListSchema)["items"] == []
    err(client.get(f"/v1/apps/{first_app}", headers=h), 404, "not_found")
    app = ok(client.post("/v1/apps", json={"name": "in-second"}, headers=h), AppSchema)["app_id"]
    build = ok(client.post(SUBMIT, json=body(app), headers=h), BuildSchema)
    with session_scope(tenant_db(client)) as session:
        assert session.get(Build, uuid.UUID(build["build_id"])).account_id == uuid.UUID(second["acct_id"])
    # The other session stays where it was.
    assert [a["app_id"] for a in ok(client.get("/v1/apps", headers=_bearer(other_token)), AppListSchema)["items"]] \
        == [first_app]
    err(client.get(f"/v1/apps/{app}", headers=_bearer(other_token)), 404, "not_found")
    # Not a member: 404, and the session is unchanged.
    err(client.post(f"/v1/sys/session/select_account/{uuid.uuid4()}", headers=h), 404, "not_found")
    assert ok(client.get(f"/v1/apps/{app}", headers=h), AppSchema)["app_id"] == app


def test_submission_follows_a_session_moved_by_another_process(client, tenant):
    """This process's view of the session is a hint: the submission's statement answers `moved` and the build
    goes to the account the session has now."""
    token, _ = _sign_in(client, tenant.emails["MANAGER"])
    h = _bearer(token)
    ok(client.get("/v1/apps", headers=h), AppListSchema)  # the hint: the tenant's account
    second = ok(client.post("/v1/accounts", json={"name": "moved"}, headers=h), AccountSchema)
    with session_scope(tenant_db(client)) as session:  # as select_account served by another API process
        session.execute(update(SessionRow).where(SessionRow.id == _session_id(token))
                        .values(account_id=uuid.UUID(second["acct_id"])))
    app_in_first = tenant.create_app()
    e = err(client.post(SUBMIT, json=body(app_in_first), headers=h), 422, "validation_failed")
    assert "app_id" in e["details"]["fields"]  # the first account's app is not in the session's account
    app = ok(client.post("/v1/apps", json={"name": "there"}, headers=h), AppSchema)["app_id"]
    build = ok(client.post(SUBMIT, json=body(app), headers=h), BuildSchema)
    with session_scope(tenant_db(client)) as session:
        assert session.get(Build, uuid.UUID(build["build_id"])).account_id == uuid.UUID(second["acct_id"])


def test_refresh_extends_the_token_and_terminate_ends_the_session(client, tenant):
    token, info = _sign_in(client, tenant.emails["WRITER"])
    h = _bearer(token)
    app = tenant.create_app()
    with session_scope(tenant_db(client)) as session:
        session.execute(update(SessionRow).where(SessionRow.id == _session_id(token))
                        .values(token_expires_at=text("now() + interval '10 seconds'")))
    refreshed = ok(client.post("/v1/sys/session/refresh", headers=h), SessionResponseSchema)["session_info"]
    assert refreshed["session_token_expires_at"] - time.time() > 3000
    assert refreshed["session_expires_at"] == info["session_expires_at"]
    ok(client.post(SUBMIT, json=body(app), headers=h), BuildSchema)
    ok(client.post("/v1/sys/session/terminate", headers=h), None, 204)
    err(client.get("/v1/builds", headers=h), 401, "unauthenticated")
    # The submission path (which works from this process's hint) refuses it too.
    err(client.post(SUBMIT, json=body(app), headers=h), 401, "unauthenticated")
    err(client.post("/v1/sys/session/refresh", headers=h), 401, "unauthenticated")
    # Other sessions of the user are untouched.
    ok(client.get("/v1/builds", headers=tenant.headers("WRITER")), BuildListSchema)


@pytest.mark.parametrize("column", ["token_expires_at", "expires_at"])
def test_an_expired_session_is_refused_everywhere(client, tenant, column):
    token, _ = _sign_in(client, tenant.emails["WRITER"])
    h = _bearer(token)
    app = tenant.create_app()
    ok(client.post(SUBMIT, json=body(app), headers=h), BuildSchema)  # the process now holds a hint
    with session_scope(tenant_db(client)) as session:
        session.execute(update(SessionRow).where(SessionRow.id == _session_id(token))
                        .values({column: text("now() - interval '1 second'")}))
    err(client.post(SUBMIT, json=body(app), headers=h), 401, "unauthenticated")
    err(client.get("/v1/apps", headers=h), 401, "unauthenticated")
    err(client.post("/v1/sys/session/refresh", headers=h), 401, "unauthenticated")


def test_a_revoked_membership_takes_effect_on_the_same_session(client, tenant):
    token, _ = _sign_in(client, tenant.emails["WRITER"])
    h = _bearer(token)
    app = tenant.create_app()
    ok(client.post(SUBMIT, json=body(app), headers=h), BuildSchema)
    users = ok(client.get("/v1/users", headers=tenant.headers()), UserListSchema)["items"]
    writer = next(u for u in users if u["user_email"] == tenant.emails["WRITER"])
    ok(client.patch(f"/v1/users/{writer['user_id']}", json={"role": "READER"}, headers=tenant.headers()), UserSchema)
    err(client.post(SUBMIT, json=body(app), headers=h), 403, "forbidden")
