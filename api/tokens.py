"""Session tokens: HS256 JWTs naming a server-side session (api/sessions.py), with exp, iat, iss and aud; the
algorithm is fixed here and never read from a token. The token carries nothing else: the user, the selected
account and the token's current expiry live in the session row, so they change (select_account, refresh,
terminate) without a new token."""
from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field

import jwt

from common.errors import Unauthenticated
from common.store.sealing import derive_key

ALGORITHM = "HS256"


@dataclass(frozen=True)
class TokenClaims:
    session_id: uuid.UUID
    expires_at: int  # the session's end: no refresh moves a session past it


VERIFIED_CACHE_SIZE = 4096


@dataclass(frozen=True)
class TokenIssuer:
    secret: bytes
    issuer: str
    audience: str
    ttl_seconds: int
    # Tokens already verified, by their exact text: a client sends the same token on every request, and
    # the claims of a token cannot change. Expiry is still checked on each use.
    _verified: dict[str, TokenClaims] = field(default_factory=dict, init=False, compare=False, repr=False)

    @functools.cached_property
    def _key(self) -> bytes:
        return derive_key(self.secret, b"nitroconv jwt hs256 v1")

    def issue(self, session_id: uuid.UUID, expires_at: int, now: float | None = None) -> str:
        """A signed token for the session, valid (as a token) until the session's end."""
        iat = int(time.time() if now is None else now)
        claims: dict[str, object] = {"sub": str(session_id), "iat": iat, "exp": expires_at, "iss": self.issuer,
                                     "aud": self.audience}
        return jwt.encode(claims, self._key, algorithm=ALGORITHM)

    def verify(self, token: str) -> TokenClaims:
        """Claims of a valid token; Unauthenticated for anything else (alg, signature, exp, aud, iss)."""
        cached = self._verified.get(token)
        if cached is not None and cached.expires_at > time.time():
            return cached
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=self.audience,
                                issuer=self.issuer, options={"require": ["exp", "iat", "iss", "aud", "sub"]})
            verified = TokenClaims(session_id=uuid.UUID(str(claims["sub"])), expires_at=int(claims["exp"]))
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthenticated("invalid or expired token") from None
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()  # bounded; a miss only costs one HMAC verification
        self._verified[token] = verified
        return verified
