"""Basic and bearer-token auth against real registries: right and wrong credentials, scopes, refresh, realms."""
from __future__ import annotations

import io

import pytest

from common.errors import Denied, HostNotAllowed, Unauthorized
from common.registry.client import Credentials
from common.registry.digest import Digest
from tests.fixtures.hostile import Reply
from tests.fixtures.images import make_tar, push_test_image
from tests.fixtures.registries import BASIC_PASSWORD, TOKEN_USERS, client_for

pytestmark = pytest.mark.integration


def test_registry_basic_auth_right_credentials_pull_and_push(basic_registry, repo_name):
    image = push_test_image(basic_registry, repo_name, "v1")
    with client_for(basic_registry) as client:
        resolved = client.resolve(f"{basic_registry.host}/{repo_name}:v1")
        assert str(resolved.manifest_digest) == image.manifest_digest
        blob = b"pushed with basic auth"
        assert client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: io.BytesIO(blob))
        assert client.blob_exists(repo_name, Digest.of(blob))


def test_registry_basic_auth_wrong_password_is_unauthorized(basic_registry, repo_name):
    push_test_image(basic_registry, repo_name, "v1")
    wrong = Credentials(basic_registry.username, "not-" + BASIC_PASSWORD)
    with client_for(basic_registry, credentials=wrong) as client, pytest.raises(Unauthorized) as exc:
        client.resolve(f"{basic_registry.host}/{repo_name}:v1")
    assert exc.value.code == "unauthorized"
    assert "not-" + BASIC_PASSWORD not in str(exc.value) + repr(exc.value.details)


def test_registry_basic_auth_without_credentials_is_unauthorized(basic_registry, repo_name):
    push_test_image(basic_registry, repo_name, "v1")
    with client_for(basic_registry, credentials=None) as client, pytest.raises(Unauthorized):
        client.resolve(f"{basic_registry.host}/{repo_name}:v1")


def test_registry_token_auth_right_credentials(token_registry, repo_name, tmp_path):
    image = push_test_image(token_registry, repo_name, "v1", [make_tar({"a": b"1"}), make_tar({"b": b"2"})])
    server = token_registry.token_server
    before = server.issued()
    with client_for(token_registry) as client:
        resolved = client.resolve(f"{token_registry.host}/{repo_name}:v1")
        for layer in resolved.layers:
            client.fetch_blob(repo_name, layer, tmp_path / layer.digest.hex)
    assert str(resolved.manifest_digest) == image.manifest_digest
    # One token for the pull scope serves the manifest, the config and every layer.
    assert server.issued() - before == 1
    last = server.requests[-1]
    assert last.account == "writer" and last.scopes == [f"repository:{repo_name}:pull"]


def test_registry_token_auth_wrong_password_is_unauthorized(token_registry, repo_name):
    push_test_image(token_registry, repo_name, "v1")
    wrong = Credentials("writer", "wrong-password-canary")
    with client_for(token_registry, credentials=wrong) as client, pytest.raises(Unauthorized) as exc:
        client.resolve(f"{token_registry.host}/{repo_name}:v1")
    assert "token service" in exc.value.message
    assert "wrong-password-canary" not in str(exc.value) + repr(exc.value.details) + repr(client)


def test_registry_token_auth_anonymous_is_unauthorized(token_registry, repo_name):
    push_test_image(token_registry, repo_name, "v1")
    with client_for(token_registry, credentials=None) as client, pytest.raises(Unauthorized):
        client.resolve(f"{token_registry.host}/{repo_name}:v1")


def test_registry_token_auth_read_only_user_can_pull_but_push_is_denied(token_registry, repo_name):
    image = push_test_image(token_registry, repo_name, "v1")
    reader = Credentials("reader", TOKEN_USERS["reader"][0])
    server = token_registry.token_server
    with client_for(token_registry, credentials=reader) as client:
        assert str(client.resolve(f"{token_registry.host}/{repo_name}:v1").manifest_digest) == image.manifest_digest
        blob = b"the reader may not push this"
        before, start = server.issued(), len(server.requests)
        with pytest.raises(Denied) as exc:
            client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: io.BytesIO(blob))
        assert exc.value.code == "denied"
        with pytest.raises(Denied):
            client.put_manifest(repo_name, "v2", image.media_type, image.manifest_bytes)
    # Asked for push, got pull only: bounded token requests, no retry loop.
    assert server.issued() - before == 3
    assert all(r.granted == [] or r.granted[0]["actions"] == ["pull"] for r in server.requests[start:])


def test_registry_token_push_asks_for_pull_and_push(token_registry, repo_name):
    blob = b"writer pushes"
    with client_for(token_registry) as client:
        assert client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: io.BytesIO(blob))
    assert token_registry.token_server.requests[-1].scopes == [f"repository:{repo_name}:pull,push"]


def test_registry_token_refreshed_after_401(token_registry, repo_name):
    image = push_test_image(token_registry, repo_name, "v1")
    server = token_registry.token_server
    server.expire_next(1)  # the next token is already expired although the response says 300 s
    before = server.issued()
    with client_for(token_registry) as client:
        assert str(client.resolve(f"{token_registry.host}/{repo_name}:v1").manifest_digest) == image.manifest_digest
    assert server.issued() - before == 2
    assert len(token_registry.log_lines(r'"GET /v2/' + repo_name + r'/manifests/v1 HTTP/1.1" 401')) >= 2


def _challenge(realm: str):
    def respond(seen, forward):
        return Reply(401, {"WWW-Authenticate": f'Bearer realm="{realm}",service="x",scope="repository:a:pull"',
                           "Content-Type": "application/json"}, b'{"errors":[{"code":"UNAUTHORIZED"}]}')
    return respond


@pytest.mark.parametrize("realm", [
    "http://169.254.169.254/latest/meta-data/iam",
    "https://169.254.169.254/latest/meta-data/iam",
    "https://[fd00:ec2::254]/token",
    "http://token.example.com/token",
    "file:///etc/passwd",
])
def test_registry_token_realm_goes_through_the_host_policy(registry, hostile_front, repo_name, realm):
    front = hostile_front(registry.host)
    front.on("GET", "/manifests/", _challenge(realm))
    with client_for(registry, host=front.host, credentials=Credentials("u", "realm-canary")) as client:
        with pytest.raises(HostNotAllowed) as exc:
            client.resolve(f"{front.host}/{repo_name}:v1")
    assert exc.value.code == "host_not_allowed"


def test_registry_token_realm_on_an_unlisted_loopback_port_is_refused(registry, hostile_front, repo_name):
    front = hostile_front(registry.host)
    elsewhere = hostile_front(None)
    front.on("GET", "/manifests/", _challenge(f"{elsewhere.url}/token"))
    client = client_for(registry, host=front.host, credentials=Credentials("u", "realm-canary"))
    with client, pytest.raises(HostNotAllowed):
        client.resolve(f"{front.host}/{repo_name}:v1")
    assert elsewhere.seen == []


def test_registry_token_shared_by_concurrent_downloads(token_registry, repo_name, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    layers = [make_tar({f"f{i}": bytes([i]) * 5000}) for i in range(6)]
    push_test_image(token_registry, repo_name, "v1", layers)
    server = token_registry.token_server
    with client_for(token_registry) as client:
        resolved = client.resolve(f"{token_registry.host}/{repo_name}:v1")
        before = server.issued()
        with ThreadPoolExecutor(4) as pool:
            paths = list(pool.map(lambda d: client.fetch_blob(repo_name, d, tmp_path / d.digest.hex), resolved.layers))
    assert len(paths) == 6 and all(p.exists() for p in paths)
    assert server.issued() == before  # the pull token from resolve() serves every thread
