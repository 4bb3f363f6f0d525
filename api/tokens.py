"""Session tokens: HS256 JWTs with exp, iat, iss and aud, the algorithm fixed here and never read from a token."""
from __future__ import annotations

import functools
import time
import uuid
from dataclasses import dataclass, field

import jwt

from common.errors import Unauthenticated
from common.sealing import derive_key

ALGORITHM = "HS256"


@dataclass(frozen=True)
class TokenClaims:
    user_id: uuid.UUID
    account_id: uuid.UUID | None
    expires_at: int


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

    def issue(self, user_id: uuid.UUID, account_id: uuid.UUID | None, now: float | None = None) -> tuple[str, int]:
        """A signed token and its expiry (epoch seconds)."""
        iat = int(time.time() if now is None else now)
        exp = iat + self.ttl_seconds
        claims: dict[str, object] = {"sub": str(user_id), "iat": iat, "exp": exp, "iss": self.issuer,
                                     "aud": self.audience, "jti": uuid.uuid4().hex}
        if account_id is not None:
            claims["acct"] = str(account_id)
        return jwt.encode(claims, self._key, algorithm=ALGORITHM), exp

    def verify(self, token: str) -> TokenClaims:
        """Claims of a valid token; Unauthenticated for anything else (alg, signature, exp, aud, iss)."""
        cached = self._verified.get(token)
        if cached is not None and cached.expires_at > time.time():
            return cached
        try:
            claims = jwt.decode(token, self._key, algorithms=[ALGORITHM], audience=self.audience,
                                issuer=self.issuer, options={"require": ["exp", "iat", "iss", "aud", "sub"]})
            account = claims.get("acct")
            verified = TokenClaims(user_id=uuid.UUID(str(claims["sub"])),
                                   account_id=uuid.UUID(str(account)) if account else None,
                                   expires_at=int(claims["exp"]))
        except (jwt.PyJWTError, ValueError, TypeError):
            raise Unauthenticated("invalid or expired token") from None
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()  # bounded; a miss only costs one HMAC verification
        self._verified[token] = verified
        return verified
