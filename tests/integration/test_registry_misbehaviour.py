"""A hostile front on a real registry: lying digests and sizes, oversized manifests, 429/5xx, resets,
trickling servers, and redirects to other hosts."""
from __future__ import annotations

import hashlib
import itertools
import json

import pytest

from common.errors import (
    DigestMismatch,
    HostNotAllowed,
    InvalidManifest,
    LimitExceeded,
    RegistryTimeout,
    RegistryUnavailable,
    SizeMismatch,
    UnsupportedMediaType,
)
from common.registry.client import MAX_MANIFEST_BYTES
from common.registry.retry import RetryPolicy
from tests.fixtures.hostile import Reply
from tests.fixtures.images import make_tar, push_test_image
from tests.fixtures.registries import client_for

pytestmark = pytest.mark.integration


class Sleeps(list):
    """Records the waits the client asks for instead of sleeping (nothing here asserts on wall time)."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


def fronted(registry, hostile_front, repo_name, **image_kwargs):
    image = push_test_image(registry, repo_name, "v1", **image_kwargs)
    return image, hostile_front(registry.host)


def alter(fn):
    """A rule that forwards to the registry and then rewrites its reply."""
    def respond(seen, forward):
        reply = forward()
        fn(reply)
        return reply
    return respond


def ref(front, repo_name, tag="v1") -> str:
    return f"{front.host}/{repo_name}:{tag}"


# --- blobs -------------------------------------------------------------------------------------------
def test_blob_with_wrong_content_same_size_is_digest_mismatch(registry, hostile_front, repo_name, tmp_path):
    image, front = fronted(registry, hostile_front, repo_name)
    layer_digest = image.layers[0].digest
    front.on("GET", f"/blobs/{layer_digest}", alter(lambda r: setattr(r, "body", bytes(len(r.body)))))
    with client_for(registry, host=front.host) as client:
        resolved = client.resolve(ref(front, repo_name))
        with pytest.raises(DigestMismatch):
            client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
def test_blob_one_byte_longer_is_size_mismatch(registry, hostile_front, repo_name, tmp_path, announce):
    image, front = fronted(registry, hostile_front, repo_name)
    served = []

    def longer(reply):
        reply.body = reply.body + b"\0" + b"A" * 100000
        if not announce:
            reply.body = iter([reply.body[i:i + 1000] for i in range(0, len(reply.body), 1000)])
        served.append(True)

    front.on("GET", f"/blobs/{image.layers[0].digest}", alter(longer))
    with client_for(registry, host=front.host) as client:
        resolved = client.resolve(ref(front, repo_name))
        with pytest.raises(SizeMismatch) as exc:
            client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")
    assert exc.value.code == "size_mismatch" and served
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("announce", [True, False], ids=["content-length", "chunked"])
def test_blob_shorter_is_size_mismatch(registry, hostile_front, repo_name, tmp_path, announce):
    image, front = fronted(registry, hostile_front, repo_name)

    def shorter(reply):
        reply.body = reply.body[:-1]
        if not announce:
            reply.body = iter([reply.body])

    front.on("GET", f"/blobs/{image.layers[0].digest}", alter(shorter))
    with client_for(registry, host=front.host) as client:
        resolved = client.resolve(ref(front, repo_name))
        with pytest.raises(SizeMismatch):
            client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")


def test_blob_connection_broken_mid_body_resumes_with_range(registry, hostile_front, repo_name, tmp_path):
    big = bytes(itertools.islice(itertools.cycle(range(251)), 300_000))
    image, front = fronted(registry, hostile_front, repo_name, layers=[make_tar({"big": big})], compression=None)
    digest = image.layers[0].digest
    front.on("GET", f"/blobs/{digest}", alter(lambda r: setattr(r, "cut_after", 100_000)), times=1)
    sleeps = Sleeps()
    with client_for(registry, host=front.host, sleep=sleeps) as client:
        resolved = client.resolve(ref(front, repo_name))
        path = client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")
    assert "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest
    gets = [s for s in front.seen if s.method == "GET" and digest in s.path]
    assert len(gets) == 2 and gets[0].header("Range") is None
    assert gets[1].header("Range") == "bytes=100000-"
    assert len(sleeps) == 1


# --- manifests ---------------------------------------------------------------------------------------
def test_manifest_by_digest_with_other_bytes_is_digest_mismatch(registry, hostile_front, repo_name):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", f"/manifests/{image.manifest_digest}",
             alter(lambda r: setattr(r, "body", r.body.replace(b'"schemaVersion": 2', b'"schemaVersion":2 '))))
    with client_for(registry, host=front.host) as client, pytest.raises(DigestMismatch):
        client.resolve(f"{front.host}/{repo_name}@{image.manifest_digest}")


def test_manifest_lying_docker_content_digest_header(registry, hostile_front, repo_name):
    image, front = fronted(registry, hostile_front, repo_name)
    fake = "sha256:" + hashlib.sha256(b"something else").hexdigest()
    front.on("GET", "/manifests/v1", alter(lambda r: r.headers.update({"Docker-Content-Digest": fake})))
    with client_for(registry, host=front.host) as client, pytest.raises(DigestMismatch, match="Docker-Content-Digest"):
        client.resolve(ref(front, repo_name))


def test_manifest_content_type_mismatch_is_refused(registry, hostile_front, repo_name):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", "/manifests/v1", alter(lambda r: r.headers.update(
        {"Content-Type": "application/vnd.oci.image.index.v1+json"})))
    with client_for(registry, host=front.host) as client, pytest.raises(InvalidManifest):
        client.resolve(ref(front, repo_name))


def test_manifest_with_duplicate_keys_is_refused(registry, hostile_front, repo_name):
    image, front = fronted(registry, hostile_front, repo_name)

    def duplicate_layers_key(reply):
        reply.body = reply.body[:-1] + b', "layers": []}'
        reply.headers.pop("Docker-Content-Digest")

    front.on("GET", "/manifests/v1", alter(duplicate_layers_key))
    with client_for(registry, host=front.host) as client, pytest.raises(InvalidManifest, match="duplicate"):
        client.resolve(ref(front, repo_name))


def test_schema1_manifest_is_refused_with_a_clear_message(registry, hostile_front, repo_name):
    front = hostile_front(registry.host)
    schema1 = json.dumps({"schemaVersion": 1, "name": repo_name, "tag": "old", "architecture": "amd64",
                          "fsLayers": [], "history": [], "signatures": []}).encode()
    front.on("GET", "/manifests/old", lambda seen, fwd: Reply(
        200, {"Content-Type": "application/vnd.docker.distribution.manifest.v1+prettyjws"}, schema1))
    with client_for(registry, host=front.host) as client, pytest.raises(UnsupportedMediaType) as exc:
        client.resolve(ref(front, repo_name, "old"))
    assert "schema 1" in exc.value.message and "not supported" in exc.value.message


def test_manifest_announced_oversized_is_refused(registry, hostile_front, repo_name):
    front = hostile_front(registry.host)
    front.on("GET", "/manifests/big", lambda seen, fwd: Reply(
        200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, b"{}", length=MAX_MANIFEST_BYTES + 1))
    with client_for(registry, host=front.host) as client, pytest.raises(LimitExceeded):
        client.resolve(ref(front, repo_name, "big"))


def test_manifest_endless_chunked_body_is_capped(registry, hostile_front, repo_name):
    front = hostile_front(registry.host)
    sent = []

    def endless():
        yield b'{"schemaVersion": 2, "layers": ['
        for _ in range(100_000):  # 6.4 GB if nobody stops reading
            sent.append(1)
            yield b' ' * 65536

    front.on("GET", "/manifests/endless", lambda seen, fwd: Reply(
        200, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"}, endless()))
    with client_for(registry, host=front.host) as client, pytest.raises(LimitExceeded):
        client.resolve(ref(front, repo_name, "endless"))
    assert len(sent) < 1000


# --- retries and deadlines ---------------------------------------------------------------------------
def test_429_retry_after_is_honoured(registry, hostile_front, repo_name):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", "/manifests/v1", lambda seen, fwd: Reply(429, {"Retry-After": "3"}, b"slow down"), times=2)
    sleeps = Sleeps()
    with client_for(registry, host=front.host, sleep=sleeps) as client:
        assert str(client.resolve(ref(front, repo_name)).manifest_digest) == image.manifest_digest
    assert sleeps == [3.0, 3.0]
    assert front.count("GET", "/manifests/v1") == 3


def test_retry_after_beyond_the_budget_fails_without_waiting(registry, hostile_front, repo_name):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", "/manifests/v1", lambda seen, fwd: Reply(429, {"Retry-After": "3600"}, b""))
    sleeps = Sleeps()
    with client_for(registry, host=front.host, sleep=sleeps) as client, pytest.raises(RegistryUnavailable) as exc:
        client.resolve(ref(front, repo_name))
    assert exc.value.retryable and exc.value.code == "registry_unavailable"
    assert exc.value.details["retry_after"] == 3600 and sleeps == []


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_5xx_retries_are_bounded(registry, hostile_front, repo_name, status):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", "/manifests/v1", lambda seen, fwd: Reply(status, {}, b"oops"))
    sleeps = Sleeps()
    with client_for(registry, host=front.host, sleep=sleeps, retry=RetryPolicy(attempts=4)) as client:
        with pytest.raises(RegistryUnavailable):
            client.resolve(ref(front, repo_name))
    assert front.count("GET", "/manifests/v1") == 4 and len(sleeps) == 3
    assert sleeps == sorted(sleeps)  # backoff does not shrink (jitter stays within each doubling)


def test_transient_503_then_success(registry, hostile_front, repo_name, tmp_path):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", "/blobs/", lambda seen, fwd: Reply(503, {}, b""), times=2)
    sleeps = Sleeps()
    with client_for(registry, host=front.host, sleep=sleeps) as client:
        resolved = client.resolve(ref(front, repo_name))
        client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")
    # Both 503s were retried, each after a backoff, and each blob was then fetched once more, whole.
    blob_gets = [s.path for s in front.seen if s.method == "GET" and "/blobs/" in s.path]
    assert len(sleeps) == 2 and len(blob_gets) == len(set(blob_gets)) + 2
    assert (tmp_path / "layer").read_bytes() == image.layers[0].blob


def test_connection_refused_is_retried_then_unavailable(registry, repo_name):
    from tests.fixtures.registries import free_port

    host = f"127.0.0.1:{free_port()}"
    sleeps = Sleeps()
    with client_for(registry, host=host, sleep=sleeps, retry=RetryPolicy(attempts=3)) as client:
        with pytest.raises(RegistryUnavailable):
            client.resolve(f"{host}/{repo_name}:v1")
    assert len(sleeps) == 2


def test_deadline_cuts_a_trickling_body(registry, hostile_front, repo_name, tmp_path):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", f"/blobs/{image.layers[0].digest}", alter(lambda r: setattr(r, "trickle", 0.05)))
    with client_for(registry, host=front.host, deadline=2.0) as client:
        resolved = client.resolve(ref(front, repo_name))
        with pytest.raises(RegistryTimeout) as exc:
            client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")
    assert exc.value.code == "registry_timeout" and exc.value.retryable
    assert list(tmp_path.iterdir()) == []


def test_deadline_cuts_trickling_headers(registry, hostile_front, repo_name):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", "/manifests/", alter(lambda r: setattr(r, "trickle_headers", 0.05)))
    with client_for(registry, host=front.host, deadline=1.5) as client, pytest.raises(RegistryTimeout):
        client.resolve(ref(front, repo_name))


# --- redirects ---------------------------------------------------------------------------------------
def test_redirect_to_another_host_does_not_carry_authorization(token_registry, hostile_front, blob_host, repo_name,
                                                               tmp_path):
    image = push_test_image(token_registry, repo_name, "v1")
    layer = image.layers[0]
    front = hostile_front(token_registry.host)
    cdn = blob_host(layer.blob)
    front.on("GET", f"/blobs/{layer.digest}", lambda seen, fwd: Reply(
        307, {"Location": f"{cdn.url}/storage/{layer.digest[7:]}?X-Signature=abc"}, b""))
    with client_for(token_registry, host=front.host, allow=(cdn.host,)) as client:
        resolved = client.resolve(ref(front, repo_name))
        path = client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")
    assert path.read_bytes() == layer.blob
    (to_registry,) = [s for s in front.seen if s.method == "GET" and layer.digest in s.path]
    assert (to_registry.header("Authorization") or "").startswith("Bearer ")
    assert len(cdn.seen) == 1 and cdn.seen[0].header("Authorization") is None
    assert cdn.seen[0].path.endswith("?X-Signature=abc")


@pytest.mark.parametrize("target", ["unlisted-loopback", "http://169.254.169.254/latest/meta-data/",
                                    "https://10.0.0.1/blob", "file:///etc/passwd"])
def test_redirect_outside_the_policy_is_blocked(registry, hostile_front, blob_host, repo_name, tmp_path, target):
    image, front = fronted(registry, hostile_front, repo_name)
    cdn = blob_host(image.layers[0].blob)
    location = f"{cdn.url}/blob" if target == "unlisted-loopback" else target
    front.on("GET", f"/blobs/{image.layers[0].digest}", lambda seen, fwd: Reply(302, {"Location": location}, b""))
    with client_for(registry, host=front.host) as client:
        resolved = client.resolve(ref(front, repo_name))
        with pytest.raises(HostNotAllowed):
            client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")
    assert cdn.seen == []


def test_redirect_loop_is_bounded(registry, hostile_front, repo_name, tmp_path):
    image, front = fronted(registry, hostile_front, repo_name)
    front.on("GET", "/loop", lambda seen, fwd: Reply(302, {"Location": "/loop"}, b""))
    front.on("GET", f"/blobs/{image.layers[0].digest}", lambda seen, fwd: Reply(302, {"Location": "/loop"}, b""))
    with client_for(registry, host=front.host) as client:
        resolved = client.resolve(ref(front, repo_name))
        with pytest.raises(Exception, match="redirects"):
            client.fetch_blob(repo_name, resolved.layers[0], tmp_path / "layer")


def test_dns_name_resolving_to_loopback_is_refused_at_connect(registry, repo_name):
    from common.registry.client import RegistryClient

    port = registry.host.rsplit(":", 1)[1]
    before = len(registry.log_lines(r'"GET /v2/'))
    # "localhost" passes the URL check (it is a name, not an address); the resolved 127.0.0.1 does not.
    with RegistryClient(f"localhost:{port}", sleep=Sleeps()) as client, pytest.raises(HostNotAllowed) as exc:
        client.resolve(f"localhost:{port}/{repo_name}:v1")
    assert exc.value.details["address"] in ("127.0.0.1", "::1")
    assert len(registry.log_lines(r'"GET /v2/')) == before
