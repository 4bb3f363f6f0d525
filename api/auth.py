"""Who is calling: bearer-token parsing, the caller's account and role, and role checks."""
from __future__ import annotations

import functools
import uuid
from dataclasses import dataclass

from flask import g, request

from api.context import db, settings
from api.limits import check_rate
from api.tokens import TokenClaims, TokenIssuer
from common.accounts import RANK, Role, role_in
from common.errors import Forbidden, Unauthenticated


@dataclass(frozen=True)
class Principal:
    user_id: uuid.UUID
    account_id: uuid.UUID | None
    role: Role | None

    def require_account(self) -> uuid.UUID:
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


def caller() -> TokenClaims:
    """The verified token's claims, the request counted against the caller's rate limit (once per request)."""
    cached = g.get("claims")
    if isinstance(cached, TokenClaims):
        return cached
    claims = issuer().verify(bearer_token())
    s = settings()
    check_rate(s.redis_url, f"{claims.user_id}:{claims.account_id}", s.rate_limit_per_minute)
    g.claims = claims
    return claims


def principal() -> Principal:
    """The verified caller; the role is read from the database so a revoked membership takes effect at once."""
    cached = g.get("principal")
    if isinstance(cached, Principal):
        return cached
    claims = caller()
    role = role_in(db(), claims.user_id, claims.account_id) if claims.account_id else None
    found = Principal(user_id=claims.user_id, account_id=claims.account_id if role else None, role=role)
    g.principal = found
    return found
