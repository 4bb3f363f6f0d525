"""WWW-Authenticate parsing, credentials that never print, and the token cache."""
from __future__ import annotations

import base64

import pytest

from common.errors import InvalidOptions
from common.registry.auth import Challenge, Credentials, TokenCache, is_valid_bearer_token, parse_challenges


def test_parse_challenges_bearer_with_comma_in_scope():
    (c,) = parse_challenges('Bearer realm="https://auth.example.com/token",service="registry.example.com",'
                            'scope="repository:team/app:pull,push"')
    assert c.scheme == "bearer"
    assert c.params == {"realm": "https://auth.example.com/token", "service": "registry.example.com",
                        "scope": "repository:team/app:pull,push"}
    assert c.scopes == ("repository:team/app:pull,push",)


def test_parse_challenges_several_and_odd_spacing():
    got = parse_challenges('Basic realm="Registry Realm" , Bearer  realm = "https://a/t" ,error="insufficient_scope"')
    assert [c.scheme for c in got] == ["basic", "bearer"]
    assert got[0].params == {"realm": "Registry Realm"}
    assert got[1].params == {"realm": "https://a/t", "error": "insufficient_scope"}


def test_parse_challenges_escapes_and_unquoted_values():
    (c,) = parse_challenges(r'Bearer realm="https://a/t?x=\"y\"",service=reg,Scope="a b"')
    assert c.params["realm"] == 'https://a/t?x="y"' and c.params["service"] == "reg"
    assert c.scopes == ("a", "b")


@pytest.mark.parametrize("header", ["", "   ", ",", '"'])
def test_parse_challenges_tolerates_garbage(header):
    assert all(isinstance(c, Challenge) for c in parse_challenges(header))


def test_credentials_never_show_the_password():
    creds = Credentials("bob", "hunter2-canary")
    assert "hunter2-canary" not in repr(creds) and "hunter2-canary" not in str(creds)
    assert "hunter2-canary" not in repr([creds, {"c": creds}])
    assert base64.b64decode(creds.basic_header().split()[1]) == b"bob:hunter2-canary"


@pytest.mark.parametrize("user,password", [("a:b", "p"), ("a", "p\r\nX-Injected: 1"), ("a\n", "p")])
def test_credentials_refuse_header_breaking_values(user, password):
    with pytest.raises(InvalidOptions):
        Credentials(user, password).check()


def test_token_cache_expires_early_and_keys_by_scope_set():
    now = [1000.0]
    cache = TokenCache(clock=lambda: now[0])
    cache.put(["repository:a:pull", "repository:b:pull"], "tok", expires_in=60)
    assert cache.get(["repository:b:pull", "repository:a:pull"]) == "tok"
    assert cache.get(["repository:a:pull"]) is None
    now[0] += 49
    assert cache.get(["repository:a:pull", "repository:b:pull"]) == "tok"
    now[0] += 2  # within the 10 s safety margin of the 60 s lifetime
    assert cache.get(["repository:a:pull", "repository:b:pull"]) is None


def test_token_cache_drop():
    cache = TokenCache()
    cache.put(["s"], "tok", 300)
    cache.drop(["s"])
    assert cache.get(["s"]) is None


@pytest.mark.parametrize("token,ok", [
    ("eyJhbGciOi.eyJzdWIiOi.c2ln", True), ("abc+/=", True), ("", False), ("a b", False), ("a\r\nb", False),
    (None, False), (123, False),
])
def test_is_valid_bearer_token(token, ok):
    assert is_valid_bearer_token(token) is ok
