"""Who is calling: bearer-token parsing, the caller's session, account and role, and role checks."""
from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass

from flask import g, request

from api import sessions
from api.context import db, settings
from api.limits import check_rate
from api.tokens import TokenIssuer
from common.errors import Forbidden, Unauthenticated
from common.store.accounts import RANK, Role


@dataclass(frozen=True)
class Principal:
    user_id: uuid.UUID
    account_id: uuid.UUID | None
    role: Role | None
    session_id: uuid.UUID | None = None
    refused: str | None = None  # the session's account is deactivated, or the caller disabled there

    def require_account(self) -> uuid.UUID:
        if self.refused == "account_deactivated":
            raise Forbidden("the session's account is deactivated; a MANAGER of it can enable it again "
                            "(PATCH /v1/accounts/{id})", code="account_deactivated")
        if self.refused == "user_disabled":
            raise Forbidden("you are disabled in the session's account; a MANAGER of it can enable you again",
                            code="user_disabled")
        if self.account_id is None or self.role is None:
            raise Forbidden("select an account first (POST /v1/accounts or /v1/sys/session/select_account)")
        return self.account_id

    def require(self, role: Role) -> uuid.UUID:
        """The account id, if the caller's role there is at least `role`."""
        account = self.require_account()
        assert self.role is not None
        if RANK[self.role] < RANK[role]:
            raise Forbidden(f"this needs the {role.value} role")
        return account


@dataclass(frozen=True)
class Caller:
    """The caller's session as this process last saw it (api/sessions.py): good for the rate limit and as the
    view the submission's statement checks; everything else asks `principal()`."""

    session_id: uuid.UUID
    user_id: uuid.UUID
    account_id: uuid.UUID | None


def issuer() -> TokenIssuer:
    s = settings()
    return _issuer(s.secret_key, s.token_issuer, s.token_audience, s.token_ttl_seconds)


@functools.cache
def _issuer(secret: bytes, iss: str, audience: str, ttl_seconds: int) -> TokenIssuer:
    # One per configuration: its key is derived once and its cache of verified tokens is shared.
    return TokenIssuer(secret=secret, issuer=iss, audience=audience, ttl_seconds=ttl_seconds)


def bearer_token() -> str:
    # CCM documents `Authentication: Bearer`; everything else sends `Authorization`.
    for header in ("Authorization", "Authentication"):
        value = request.headers.get(header, "")
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    raise Unauthenticated("a bearer token is required")


def _ended() -> Unauthenticated:
    return Unauthenticated("the session has ended or expired; sign in again")


def caller() -> Caller:
    """The verified token's session, the request counted against the caller's rate limit (once per request)."""
    cached = g.get("caller")
    if isinstance(cached, Caller):
        return cached
    claims = issuer().verify(bearer_token())
    known = sessions.hint(claims.session_id)
    if known is None:
        found = _load(claims.session_id)  # this process has not seen the session: its one query, done now
        known = sessions.Hint(found.user_id, found.account_id)
    s = settings()
    check_rate(s.redis_url, f"{known.user_id}:{known.account_id}", s.rate_limit_per_minute)
    g.caller = Caller(claims.session_id, known.user_id, known.account_id)
    return g.caller


def _load(session_id: uuid.UUID) -> Principal:
    state = sessions.current(db(), session_id)
    if state is None:
        raise _ended()
    found = Principal(user_id=state.user_id, account_id=state.account_id, role=state.role, session_id=session_id,
                      refused=state.refused)
    g.principal = found
    return found


def principal() -> Principal:
    """The verified caller as its session is now (one indexed query per request): a selected account, a revoked
    membership or an ended session takes effect at once."""
    cached = g.get("principal")
    if isinstance(cached, Principal):
        return cached
    return _load(caller().session_id)
