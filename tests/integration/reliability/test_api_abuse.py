"""API abuse against the real app, Postgres and Redis: forged tokens, oversized bodies, SSRF registry hosts,
the per-account quota and the per-caller rate limit (issue 6, RELIABILITY.md §E)."""
from __future__ import annotations

import base64
import json
import time
import uuid
from dataclasses import replace

import jwt
import pytest
from sqlalchemy import func, select

from api.app import create_app
from api.tokens import TokenIssuer
from common.settings import Settings
from common.store.engine import session_scope
from common.store.models import Build
from tests.integration.service.helpers import err

from .conftest import Api, api_for

pytestmark = pytest.mark.integration
SUBMIT = "/v1/builds/convert-app/nitro-enclaves"


def _body(app_id: str, src: str = "127.0.0.1:5000/in:1", dst: str = "127.0.0.1:5000/out:1") -> dict:
    return {"request": {"app_id": app_id, "input_image": {"name": src}, "output_image": {"name": dst}},
            "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 512}}


def _count(s: Settings, account_id: uuid.UUID) -> int:
    with session_scope(s.database_url) as session:
        return session.execute(select(func.count()).select_from(Build)
                               .where(Build.account_id == account_id)).scalar_one()


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


# --- forged tokens --------------------------------------------------------------------------------
def _forged(kind: str, s: Settings, session_id: str) -> str:
    issuer = TokenIssuer(secret=s.secret_key, issuer=s.token_issuer, audience=s.token_audience, ttl_seconds=60)
    now = int(time.time())
    claims = {"sub": session_id, "iat": now, "exp": now + 60, "iss": s.token_issuer, "aud": s.token_audience}
    key = issuer._key  # noqa: SLF001 - the real signing key, so only the one forged property differs
    if kind == "alg_none":
        return f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64(claims)}."
    if kind == "wrong_signature":
        return jwt.encode(claims, b"k" * 32, algorithm="HS256")
    if kind == "expired":
        return jwt.encode({**claims, "iat": now - 7200, "exp": now - 3600}, key, algorithm="HS256")
    if kind == "missing_exp":
        return jwt.encode({k: v for k, v in claims.items() if k != "exp"}, key, algorithm="HS256")
    if kind == "missing_sub":
        return jwt.encode({k: v for k, v in claims.items() if k != "sub"}, key, algorithm="HS256")
    if kind == "other_audience":
        return jwt.encode({**claims, "aud": "another-service"}, key, algorithm="HS256")
    if kind == "other_issuer":
        return jwt.encode({**claims, "iss": "someone-else"}, key, algorithm="HS256")
    if kind == "hs512":
        return jwt.encode(claims, key, algorithm="HS512")
    if kind == "unknown_session":  # signed with the real key, naming a session that does not exist
        return jwt.encode({**claims, "sub": str(uuid.uuid4())}, key, algorithm="HS256")
    raise AssertionError(kind)


@pytest.mark.filterwarnings("ignore::jwt.warnings.InsecureKeyLengthWarning")
@pytest.mark.parametrize("kind", ["alg_none", "wrong_signature", "expired", "missing_exp", "missing_sub",
                                  "other_audience", "other_issuer", "hs512", "unknown_session"])
def test_abuse_forged_tokens_are_401(rel_settings, kind):
    api = api_for(rel_settings)
    token = api.tenant.token("WRITER")
    real = jwt.decode(token, options={"verify_signature": False})
    forged = _forged(kind, rel_settings, real["sub"])
    headers = {"Authorization": f"Bearer {forged}"}
    err(api.client.get("/v1/builds", headers=headers), 401, "unauthenticated")  # type: ignore[attr-defined]
    err(api.client.post(SUBMIT, json=_body(api.app_id), headers=headers), 401,  # type: ignore[attr-defined]
        "unauthenticated")
    assert _count(rel_settings, api.tenant.account_id) == 0


# --- oversized bodies -----------------------------------------------------------------------------
def test_abuse_body_over_the_limit_is_413_before_anything_is_stored(rel_settings):
    s = replace(rel_settings, max_request_bytes=4096)
    api = api_for(s)
    big = _body(api.app_id)
    big["request"]["converter_options"] = {"env_vars": [f"PAD{i}={'x' * 100}" for i in range(60)]}
    resp = api.client.post(SUBMIT, json=big, headers=api.tenant.headers("WRITER"))  # type: ignore[attr-defined]
    err(resp, 413, "request_entity_too_large")
    assert _count(s, api.tenant.account_id) == 0
    assert api.submit("127.0.0.1:5000/in:1", "127.0.0.1:5000/out:1")  # a normal request still passes


# --- SSRF: registry hosts -------------------------------------------------------------------------
INSTANCE_LOCAL = ["169.254.169.254", "169.254.170.2:80", "[fe80::1]:5000", "metadata.google.internal",
                  "[fd00:ec2::254]", "100.100.100.200"]


@pytest.mark.parametrize("env", ["development", "production"])
@pytest.mark.parametrize("side", ["input", "output"])
def test_abuse_metadata_and_link_local_registries_are_always_422(rel_settings, env, side):
    # Even allow-listed: an operator's typo must not open the metadata service.
    s = replace(rel_settings, env=env, insecure_registries=frozenset({*INSTANCE_LOCAL, "127.0.0.1:5000"}))
    api = api_for(s)
    for host in INSTANCE_LOCAL:
        ref = f"{host}/library/app:1"
        src, dst = (ref, "127.0.0.1:5000/out:1") if side == "input" else ("127.0.0.1:5000/in:1", ref)
        resp = api.client.post(SUBMIT, json=_body(api.app_id, src, dst),  # type: ignore[attr-defined]
                               headers=api.tenant.headers("WRITER"))
        e = err(resp, 422, "host_not_allowed")
        assert "metadata" in e["message"] or "link-local" in e["message"], (host, e)
    assert _count(s, api.tenant.account_id) == 0


@pytest.mark.parametrize(("env", "host", "allowed", "expect"), [
    ("production", "10.1.2.3:5000", (), 422),
    ("production", "192.168.0.7", (), 422),
    ("production", "127.0.0.1:5000", (), 422),
    ("production", "localhost:5000", (), 422),
    ("production", "[::1]:5000", (), 422),
    ("production", "10.1.2.3:5000", ("10.1.2.3:5000",), 200),
    ("development", "10.1.2.3:5000", (), 200),
    ("production", "registry.example.com", (), 200),
])
def test_abuse_private_registries_need_the_allow_list_in_production(rel_settings, env, host, allowed, expect):
    s = replace(rel_settings, env=env, insecure_registries=frozenset(allowed))
    api = api_for(s)
    resp = api.client.post(SUBMIT, json=_body(api.app_id, f"{host}/app:1", "registry.example.com/out:1"),  # type: ignore[attr-defined]
                           headers=api.tenant.headers("WRITER"))
    if expect == 422:
        err(resp, 422, "host_not_allowed")
    else:
        assert resp.status_code == 200, resp.json


# --- quota and rate limit -------------------------------------------------------------------------
def test_abuse_quota_of_unfinished_conversions_is_429(rel_settings):
    s = replace(rel_settings, max_queued_per_account=2)
    api = api_for(s)
    headers = api.tenant.headers("WRITER")
    first = api.submit("127.0.0.1:5000/in:1", "127.0.0.1:5000/out:1")
    keyed = {**headers, "Idempotency-Key": "quota-retry"}
    second = api.client.post(SUBMIT, json=_body(api.app_id), headers=keyed)  # type: ignore[attr-defined]
    assert second.status_code == 200
    resp = api.client.post(SUBMIT, json=_body(api.app_id), headers=headers)  # type: ignore[attr-defined]
    e = err(resp, 429, "quota_exceeded")
    assert e["details"] == {"limit": 2, "unfinished": 2, "retry_after": 30} and resp.headers["Retry-After"] == "30"
    # A retry of an accepted submission is not a new conversion: it gets its build back.
    again = api.client.post(SUBMIT, json=_body(api.app_id), headers=keyed)  # type: ignore[attr-defined]
    assert again.status_code == 200 and again.json["build_id"] == second.json["build_id"]
    assert _count(s, api.tenant.account_id) == 2
    # Another account is not affected; an ended conversion frees a slot.
    assert api_for(s).submit("127.0.0.1:5000/in:1", "127.0.0.1:5000/out:1")
    cancel = api.client.post(f"/v1/builds/{first}/cancel", headers=api.tenant.headers())  # type: ignore[attr-defined]
    assert cancel.status_code in (200, 202), cancel.json
    assert api.submit("127.0.0.1:5000/in:1", "127.0.0.1:5000/out:1")


def _fresh_window() -> None:
    # Start at the beginning of a fixed window so the burst below cannot straddle two windows.
    left = 60 - time.time() % 60
    if left < 10:
        time.sleep(left + 0.1)


def test_abuse_rate_limit_per_caller_is_429(rel_settings, own_redis):
    s = replace(rel_settings, rate_limit_per_minute=5)
    client = create_app(s).test_client()
    api = api_for(s)
    other = Api(s, client, api_for(s).tenant, "")
    mine, theirs = api.tenant.headers("READER"), other.tenant.headers("READER")
    _fresh_window()
    for _ in range(5):
        assert client.get("/v1/builds", headers=mine).status_code == 200
    resp = client.get("/v1/builds", headers=mine)
    e = err(resp, 429, "rate_limited")
    assert 1 <= int(resp.headers["Retry-After"]) <= 60 and e["details"]["limit"] == 5
    assert client.get("/v1/builds", headers=theirs).status_code == 200  # per caller, not global
    assert any(k.startswith(b"nitroconv:ratelimit:") for k in own_redis.client().keys("*"))
    # Redis away: the limiter fails open rather than taking the API down with the broker.
    own_redis.kill()
    assert client.get("/v1/builds", headers=theirs).status_code == 200
