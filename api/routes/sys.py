"""`/v1/sys`: sign-in (HTTP Basic -> JWT), account switch, version."""
from __future__ import annotations

import base64
import binascii
import uuid
from importlib import metadata

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint

from api import sessions
from api.auth import issuer, principal
from api.context import db, settings
from api.schemas.sys import (
    AuthDiscoverQuerySchema,
    AuthDiscoverResponseSchema,
    AuthDiscoverSchema,
    SessionResponseSchema,
    TokenSchema,
    VersionSchema,
)
from api.services import accounts
from common.errors import Unauthenticated, ValidationFailed

blp = Blueprint("sys", __name__, url_prefix="/v1/sys", description="Sessions and service information")
API_VERSION = "v1"


def _basic_credentials() -> tuple[str, str]:
    scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "basic":
        raise Unauthenticated("HTTP Basic credentials (email:password) are required")
    try:
        email, sep, password = base64.b64decode(encoded.strip(), validate=True).decode("utf-8").partition(":")
    except (binascii.Error, UnicodeDecodeError):
        raise Unauthenticated("malformed Basic credentials") from None
    if not sep or not email:
        raise Unauthenticated("malformed Basic credentials")
    return email, password


def session_info(user_id: uuid.UUID, session_id: uuid.UUID, account_id: uuid.UUID | None) -> dict[str, object]:
    """CCM's SessionInfo (subject_id, the two expiries, selected_account_id) and ours (e-mail, role, accounts)."""
    session = db()
    ends = sessions.expiries(session, session_id)
    members = accounts.memberships(session, user_id)
    role = next((r for a, r in members if a.id == account_id), None)
    token_expires_at = int(ends.token_expires_at.timestamp())
    return {
        "subject_id": user_id, "session_expires_at": int(ends.expires_at.timestamp()),
        "session_token_expires_at": token_expires_at, "selected_account_id": account_id if role else None,
        "user_id": user_id, "user_email": accounts.user_email(session, user_id), "acct_id": account_id if role else None,
        "role": role, "expires_at": token_expires_at,
        "accounts": [{"acct_id": a.id, "name": a.name, "role": r} for a, r in members],
    }


@blp.route("/auth")
class Auth(MethodView):
    @blp.response(200, TokenSchema)
    @blp.doc(security=[{"basicAuth": []}], requestBody={"required": False, "content": {"application/json": {
        "schema": {"type": "object", "properties": {"oauth_auth_code": {
            "type": "object", "description": "CCM's OAuth code: refused (`auth_method_unsupported`), no SSO here"}}}}}})
    def post(self) -> dict[str, object]:
        """Sign in with HTTP Basic `email:password`: a new session (in the user's first account) and its token.
        CCM's OAuth body (`oauth_auth_code`) is refused with `auth_method_unsupported`: there is no SSO here."""
        body = request.get_json(silent=True)
        if isinstance(body, dict) and "oauth_auth_code" in body and not request.authorization:
            raise ValidationFailed("The request is invalid.", code="auth_method_unsupported", details={"fields": {
                "oauth_auth_code": ["no SSO here: sign in with HTTP Basic e-mail and password"]}})
        email, password = _basic_credentials()
        user, account_id = accounts.sign_in(db(), email, password)
        s = settings()
        session_id, ends = sessions.open_session(db(), user.id, account_id, token_ttl=s.token_ttl_seconds,
                                                 max_seconds=s.session_max_seconds)
        token = issuer().issue(session_id, int(ends.expires_at.timestamp()))
        return {"access_token": token, "token_type": "Bearer", "expires_in": s.token_ttl_seconds,
                "session_info": session_info(user.id, session_id, account_id)}


@blp.route("/auth/discover")
class AuthDiscover(MethodView):
    @blp.arguments(AuthDiscoverQuerySchema, location="query")
    @blp.arguments(AuthDiscoverSchema)
    @blp.response(200, AuthDiscoverResponseSchema)
    @blp.doc(security=[])
    def post(self, _: dict[str, object], __: dict[str, object]) -> dict[str, object]:
        """How to sign in (CCM's discovery): e-mail and password here, for every user (no SSO)."""
        return {"auth_methods": [{"password": {}}]}


def _session() -> tuple[uuid.UUID, uuid.UUID]:
    me = principal()
    assert me.session_id is not None
    return me.user_id, me.session_id


@blp.route("/session/select_account/<uuid:acct_id>")
class SelectAccount(MethodView):
    @blp.response(200, SessionResponseSchema)
    def post(self, acct_id: uuid.UUID) -> dict[str, object]:
        """Make another of the caller's accounts the calling session's: the same token then acts there. A
        deactivated account (`account_deactivated`) or one the caller is disabled in (`user_disabled`) is refused."""
        user_id, session_id = _session()
        accounts.require_member(db(), user_id, acct_id)
        sessions.select_account(db(), session_id, user_id, acct_id)
        return {"session_info": session_info(user_id, session_id, acct_id)}


@blp.route("/session/refresh")
class Refresh(MethodView):
    @blp.response(200, SessionResponseSchema)
    def post(self) -> dict[str, object]:
        """Extend the calling session's token (by the token lifetime, never past the session's end)."""
        me = principal()
        assert me.session_id is not None
        if sessions.refresh(db(), me.session_id, settings().token_ttl_seconds) is None:
            raise Unauthenticated("the session has ended or expired; sign in again")
        return {"session_info": session_info(me.user_id, me.session_id, me.account_id)}


@blp.route("/session/terminate")
class Terminate(MethodView):
    @blp.response(204)
    def post(self) -> None:
        """End the calling session: its token is refused from now on."""
        _, session_id = _session()
        sessions.terminate(db(), session_id)


@blp.route("/version")
class Version(MethodView):
    @blp.response(200, VersionSchema)
    @blp.doc(security=[])
    def get(self) -> dict[str, object]:
        """Service version (no auth)."""
        try:
            version = metadata.version("nitroconv")
        except metadata.PackageNotFoundError:
            version = "0+unknown"
        return {"version": version, "api_version": API_VERSION}
