"""`/v1/sys`: sign-in (HTTP Basic -> JWT), account switch, version."""
from __future__ import annotations

import base64
import binascii
import uuid
from importlib import metadata

from flask import request
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import issuer, principal
from api.context import db
from api.schemas.sys import TokenSchema, VersionSchema
from api.services import accounts
from common.errors import Unauthenticated

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


def token_response(user_id: uuid.UUID, account_id: uuid.UUID | None) -> dict[str, object]:
    session = db()
    token, expires_at = issuer().issue(user_id, account_id)
    members = accounts.memberships(session, user_id)
    role = next((r for a, r in members if a.id == account_id), None)
    return {
        "access_token": token, "token_type": "Bearer", "expires_in": issuer().ttl_seconds,
        "session_info": {
            "user_id": user_id, "user_email": accounts.user_email(session, user_id), "acct_id": account_id,
            "role": role, "expires_at": expires_at,
            "accounts": [{"acct_id": a.id, "name": a.name, "role": r} for a, r in members],
        },
    }


@blp.route("/auth")
class Auth(MethodView):
    @blp.response(200, TokenSchema)
    @blp.doc(security=[{"basicAuth": []}])
    def post(self) -> dict[str, object]:
        """Sign in with HTTP Basic `email:password`; returns a bearer token."""
        email, password = _basic_credentials()
        user, account_id = accounts.sign_in(db(), email, password)
        return token_response(user.id, account_id)


@blp.route("/session/select_account/<uuid:acct_id>")
class SelectAccount(MethodView):
    @blp.response(200, TokenSchema)
    def post(self, acct_id: uuid.UUID) -> dict[str, object]:
        """A token for another account of the caller."""
        me = principal()
        accounts.require_member(db(), me.user_id, acct_id)
        return token_response(me.user_id, acct_id)


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
