"""Pushing with the client to a real registry: skip existing blobs, chunked and mounted uploads,
manifest PUT, and an independent client (skopeo) reading the result."""
from __future__ import annotations

import io
import json
import shutil
import subprocess

import pytest

from common.errors import RegistryError
from common.registry.digest import Digest
from common.registry.manifests import OCI_CONFIG, OCI_LAYER_GZIP, OCI_MANIFEST
from common.registry.retry import RetryPolicy
from tests.fixtures.hostile import Reply
from tests.fixtures.images import image_config, make_layer, make_tar
from tests.fixtures.registries import client_for
from tests.fixtures.require import skip_or_fail

pytestmark = pytest.mark.integration


def build_image(seed: bytes) -> tuple[list[bytes], bytes, bytes]:
    """Two gzip layers, a config and an OCI manifest, as bytes."""
    layers = [make_layer(make_tar({"app/a": seed + b"-a"})), make_layer(make_tar({"app/b": seed * 1000}))]
    config = json.dumps(image_config([lay.diff_id for lay in layers], cmd=["/app/a"])).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": str(Digest.of(config)), "size": len(config)},
        "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": lay.digest, "size": len(lay.blob)} for lay in layers],
    }, sort_keys=True).encode()
    return [lay.blob for lay in layers], config, manifest


def push(client, repo: str, tag: str, blobs: list[bytes], manifest: bytes, **upload_kwargs) -> tuple[list[bool], Digest]:
    uploaded = [client.upload_blob(repo, Digest.of(b), len(b), lambda b=b: io.BytesIO(b), **upload_kwargs)
                for b in blobs]
    return uploaded, client.put_manifest(repo, tag, OCI_MANIFEST, manifest)


def test_registry_push_uploads_once_then_pulls_back(registry, hostile_front, repo_name, tmp_path):
    layers, config, manifest = build_image(b"push-once")
    counting = hostile_front(registry.host)
    with client_for(registry, host=counting.host) as client:
        uploaded, digest = push(client, repo_name, "v1", [*layers, config], manifest)
        assert uploaded == [True, True, True] and digest == Digest.of(manifest)
        assert counting.count("POST", "/blobs/uploads/") == 3 and counting.count("PUT", "/blobs/uploads/") == 3

        again, digest_again = push(client, repo_name, "v1", [*layers, config], manifest)
        assert again == [False, False, False] and digest_again == digest
        assert counting.count("POST", "/blobs/uploads/") == 3 and counting.count("PUT", "/blobs/uploads/") == 3
        assert counting.count("HEAD", "/blobs/") == 6

        resolved = client.resolve(f"{counting.host}/{repo_name}:v1")
        assert resolved.manifest_digest == digest and resolved.config_bytes == config
        for layer, blob in zip(resolved.layers, layers, strict=True):
            assert client.fetch_blob(repo_name, layer, tmp_path / layer.digest.hex).read_bytes() == blob
    # The registry's own access log agrees with the proxy's count.
    assert len(registry.log_lines(rf'"POST /v2/{repo_name}/blobs/uploads/ HTTP/1.1" 202')) == 3


def test_registry_push_is_readable_by_skopeo(registry, repo_name, tmp_path):
    if shutil.which("skopeo") is None:
        skip_or_fail("skopeo is not installed")
    layers, config, manifest = build_image(b"skopeo")
    with client_for(registry) as client:
        _, digest = push(client, repo_name, "v1", [*layers, config], manifest)
    ref = f"docker://{registry.host}/{repo_name}:v1"
    inspected = json.loads(subprocess.run(["skopeo", "inspect", "--tls-verify=false", ref], check=True,
                                          capture_output=True, timeout=120).stdout)
    assert inspected["Digest"] == str(digest)
    assert inspected["Architecture"] == "amd64" and inspected["Os"] == "linux"
    assert inspected["Layers"] == [str(Digest.of(b)) for b in layers]
    # A full copy makes skopeo fetch and verify every blob we uploaded.
    subprocess.run(["skopeo", "copy", "--src-tls-verify=false", ref, f"oci:{tmp_path / 'oci'}:v1"], check=True,
                   capture_output=True, timeout=120)
    index = json.loads((tmp_path / "oci" / "index.json").read_text())
    assert index["manifests"][0]["digest"] == str(digest)


def test_registry_push_chunked_follows_each_location(registry, hostile_front, repo_name):
    blob = bytes(range(256)) * 200  # 51200 bytes in 10 chunks
    front = hostile_front(registry.host)
    with client_for(registry, host=front.host) as client:
        assert client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: io.BytesIO(blob), chunk_size=5120)
        assert client.blob_exists(repo_name, Digest.of(blob))
    patches = [s for s in front.seen if s.method == "PATCH"]
    assert len(patches) == 10
    assert patches[3].header("Content-Range") == "15360-20479"
    # distribution hands out a new upload state per chunk; every PATCH used the latest one.
    assert len({p.path for p in patches}) == 10


def test_registry_push_chunked_resyncs_after_416(registry, hostile_front, repo_name):
    blob = b"x" * 3000 + b"y" * 3000
    front = hostile_front(registry.host)
    patches = []

    def second_chunk_refused(seen, forward):
        patches.append(seen)
        return Reply(416, {}, b"") if len(patches) == 2 else forward()

    front.on("PATCH", "/blobs/uploads/", second_chunk_refused)
    with client_for(registry, host=front.host) as client:
        assert client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: io.BytesIO(blob), chunk_size=2000)
        assert client.blob_exists(repo_name, Digest.of(blob))
    assert front.count("GET", "/blobs/uploads/") == 1
    assert [p.header("Content-Range") for p in patches] == ["0-1999", "2000-3999", "2000-3999", "4000-5999"]


def test_registry_push_restarts_the_session_after_a_failed_put(registry, hostile_front, repo_name):
    blob = b"retry me"
    front = hostile_front(registry.host)
    front.on("PUT", "/blobs/uploads/", lambda seen, fwd: Reply(500, {}, b""), times=1)
    with client_for(registry, host=front.host, sleep=lambda s: None) as client:
        assert client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: io.BytesIO(blob))
        assert client.blob_exists(repo_name, Digest.of(blob))
    assert front.count("POST", "/blobs/uploads/") == 2


def test_registry_push_cross_repo_mount(registry, hostile_front, repo_name):
    blob = b"shared base layer"
    front = hostile_front(registry.host)
    with client_for(registry, host=front.host) as client:
        client.upload_blob(f"{repo_name}-base", Digest.of(blob), len(blob), lambda: io.BytesIO(blob))
        assert client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: (_ for _ in ()).throw(
            AssertionError("a mounted blob is not re-read")), mount_from=f"{repo_name}-base")
        assert client.blob_exists(repo_name, Digest.of(blob))
    assert front.count("PUT", "/blobs/uploads/") == 1  # only the original upload


def test_registry_push_mount_answered_202_continues_as_upload(registry, hostile_front, repo_name):
    blob = b"not mountable here"
    front = hostile_front(registry.host)

    def refuse_mount(seen, forward):
        reply = forward()  # the registry opened a session because the source does not have the blob
        assert reply.status == 202
        return reply

    front.on("POST", "mount=", refuse_mount)
    with client_for(registry, host=front.host) as client:
        assert client.upload_blob(repo_name, Digest.of(blob), len(blob), lambda: io.BytesIO(blob),
                                  mount_from=f"{repo_name}-elsewhere")
        assert client.blob_exists(repo_name, Digest.of(blob))
    assert front.count("POST", "mount=") == 1 and front.count("PUT", "/blobs/uploads/") == 1


def test_registry_push_content_not_matching_digest_is_rejected(registry, repo_name):
    with client_for(registry) as client, pytest.raises(RegistryError) as exc:
        client.upload_blob(repo_name, Digest.of(b"promised"), 8, lambda: io.BytesIO(b"imposter"))
    assert exc.value.details["status"] == 400


def test_registry_push_manifest_referencing_missing_blob_is_rejected(registry, repo_name):
    _, _, manifest = build_image(b"never uploaded")
    with client_for(registry) as client, pytest.raises(RegistryError) as exc:
        client.put_manifest(repo_name, "v1", OCI_MANIFEST, manifest)
    assert "MANIFEST_BLOB_UNKNOWN" in exc.value.details["registry_codes"]


def test_registry_push_manifest_media_type_must_match_body(registry, repo_name):
    from common.errors import InvalidManifest

    _, _, manifest = build_image(b"typed")
    with client_for(registry) as client, pytest.raises(InvalidManifest):
        client.put_manifest(repo_name, "v1", "application/vnd.docker.distribution.manifest.v2+json", manifest)


def test_registry_push_with_retry_policy_exhausted(registry, hostile_front, repo_name):
    front = hostile_front(registry.host)
    front.on("POST", "/blobs/uploads/", lambda seen, fwd: Reply(503, {}, b""))
    from common.errors import RegistryUnavailable

    with client_for(registry, host=front.host, sleep=lambda s: None, retry=RetryPolicy(attempts=2)) as client:
        with pytest.raises(RegistryUnavailable):
            client.upload_blob(repo_name, Digest.of(b"z"), 1, lambda: io.BytesIO(b"z"))
