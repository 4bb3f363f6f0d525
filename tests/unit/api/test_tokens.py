"""JWT issuing and verification: only HS256 with our key, exp/iat/iss/aud required (RELIABILITY §E 74-77)."""
from __future__ import annotations

import time
import uuid

import jwt
import pytest

from api.tokens import TokenIssuer
from common.errors import Unauthenticated
from common.store.sealing import derive_key

ISSUER = TokenIssuer(secret=b"unit-secret", issuer="nitroconv", audience="nitroconv-api", ttl_seconds=60)
KEY = derive_key(b"unit-secret", b"nitroconv jwt hs256 v1")


def _claims(**over):
    now = int(time.time())
    claims = {"sub": str(uuid.uuid4()), "iat": now, "exp": now + 60, "iss": "nitroconv", "aud": "nitroconv-api"}
    claims.update(over)
    return {k: v for k, v in claims.items() if v is not None}


def test_tokens_round_trip_the_session():
    session, exp = uuid.uuid4(), int(time.time()) + 600
    claims = ISSUER.verify(ISSUER.issue(session, exp))
    assert (claims.session_id, claims.expires_at) == (session, exp)


@pytest.mark.parametrize("override", [
    {"exp": None}, {"iat": None}, {"iss": None}, {"aud": None},
    {"aud": "another-service"}, {"iss": "someone-else"}, {"exp": int(time.time()) - 10},
    {"nbf": int(time.time()) + 3600},
])
def test_tokens_reject_missing_or_wrong_claims(override):
    token = jwt.encode(_claims(**override), KEY, algorithm="HS256")
    with pytest.raises(Unauthenticated):
        ISSUER.verify(token)


def test_tokens_reject_alg_none():
    token = jwt.encode(_claims(), None, algorithm="none")
    with pytest.raises(Unauthenticated):
        ISSUER.verify(token)


def test_tokens_reject_other_hmac_algorithms_and_keys():
    with pytest.raises(Unauthenticated):
        ISSUER.verify(jwt.encode(_claims(), KEY, algorithm="HS512"))
    with pytest.raises(Unauthenticated):
        ISSUER.verify(jwt.encode(_claims(), derive_key(b"other", b"nitroconv jwt hs256 v1"), algorithm="HS256"))


def test_tokens_ignore_header_key_hints():
    token = jwt.encode(_claims(), b"attacker-key-attacker-key-attacker", algorithm="HS256",
                       headers={"jku": "http://169.254.169.254/keys", "kid": "../../etc/passwd"})
    with pytest.raises(Unauthenticated):
        ISSUER.verify(token)


def test_tokens_reject_garbage():
    with pytest.raises(Unauthenticated):
        ISSUER.verify("not.a.token")
