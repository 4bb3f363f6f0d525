"""Pulling from a real docker-registry: media types, compressions, indexes, verification of every layer."""
from __future__ import annotations

import json
import tarfile

import pytest

from common.errors import (
    DigestMismatch,
    InvalidManifest,
    ManifestUnknown,
    NoMatchingPlatform,
    SizeMismatch,
    UnsupportedMediaType,
)
from common.registry.blobcache import BlobStore, open_layer
from common.registry.manifests import DOCKER_MANIFEST, OCI_MANIFEST
from tests.fixtures.images import (
    PushSession,
    image_config,
    make_layer,
    make_tar,
    push_index,
    push_test_image,
    sha256,
)
from tests.fixtures.registries import client_for

pytestmark = pytest.mark.integration

FILES = [{"etc/motd": b"layer one\n"}, {"usr/bin/tool": b"#!/bin/sh\necho two\n"}, {"srv/data.bin": bytes(range(256)) * 40}]


def pull_and_list(client, resolved, tmp_path) -> list[list[str]]:
    """Fetch every layer into a blob store and read it back through open_layer (DiffID verified)."""
    store = BlobStore(tmp_path / "blobs")
    names = []
    for layer, diff_id in zip(resolved.layers, resolved.diff_ids, strict=True):
        path = client.fetch_blob(resolved.repository, layer, store.path(layer.digest))
        assert store.get(layer) == path
        with open_layer(path, layer.media_type, diff_id) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
            names.append([m.name for m in tar])
    return names


@pytest.mark.parametrize("media,compression", [
    ("oci", "gzip"), ("oci", "zstd"), ("oci", None), ("docker", "gzip"), ("docker", None),
])
def test_registry_pull_multi_layer_image(registry, repo_name, tmp_path, media, compression):
    image = push_test_image(registry, repo_name, "v1", [make_tar(f) for f in FILES], media=media,
                            compression=compression)
    with client_for(registry) as client:
        resolved = client.resolve(f"{registry.host}/{repo_name}:v1")
        assert str(resolved.digest) == image.manifest_digest == str(resolved.manifest_digest)
        assert resolved.manifest_media_type == (OCI_MANIFEST if media == "oci" else DOCKER_MANIFEST)
        assert resolved.manifest_bytes == image.manifest_bytes
        assert resolved.config_bytes == image.config_bytes
        assert [str(d) for d in resolved.diff_ids] == [b.diff_id for b in image.layers]
        assert resolved.config.cmd == ("/bin/sh",)
        assert pull_and_list(client, resolved, tmp_path) == [list(f) for f in FILES]


def test_registry_pull_by_digest(registry, repo_name, tmp_path):
    image = push_test_image(registry, repo_name, "v1")
    with client_for(registry) as client:
        resolved = client.resolve(f"{registry.host}/{repo_name}@{image.manifest_digest}")
        assert str(resolved.manifest_digest) == image.manifest_digest


def test_registry_resolve_uses_a_manifest_fetched_before(registry, repo_name):
    """`top` is what the caller fetched for the tag: resolved as is, even after the tag moved; a digest
    reference must match it."""
    first = push_test_image(registry, repo_name, "v1")
    with client_for(registry) as client:
        top = client.fetch_manifest(repo_name, "v1")
        second = push_test_image(registry, repo_name, "v1", [make_tar({"moved": b"x\n"})])
        assert second.manifest_digest != first.manifest_digest
        resolved = client.resolve(f"{registry.host}/{repo_name}:v1", top=top)
        assert str(resolved.digest) == first.manifest_digest
        assert str(client.resolve(f"{registry.host}/{repo_name}:v1").digest) == second.manifest_digest
        with pytest.raises(InvalidManifest):
            client.resolve(f"{registry.host}/{repo_name}@{second.manifest_digest}", top=top)


def test_registry_pull_unknown_tag_is_manifest_unknown(registry, repo_name):
    with client_for(registry) as client, pytest.raises(ManifestUnknown) as exc:
        client.resolve(f"{registry.host}/{repo_name}:missing")
    assert exc.value.code == "manifest_unknown"


def test_registry_pull_index_picks_amd64_after_arm64_and_attestations(registry, repo_name, tmp_path):
    arm = push_test_image(registry, repo_name, None, [make_tar({"arch": b"arm64"})], architecture="arm64")
    amd = push_test_image(registry, repo_name, None, [make_tar({"arch": b"amd64"})])
    amd2 = push_test_image(registry, repo_name, None, [make_tar({"arch": b"amd64 second"})])
    with_att = push_test_image(registry, repo_name, None, [make_tar({"x": b"y"})], index=True)
    att = {"vnd.docker.reference.type": "attestation-manifest"}
    digest, _ = push_index(registry, repo_name, "multi", [
        (with_att, {"os": "unknown", "architecture": "unknown"}, att),
        (arm, {"os": "linux", "architecture": "arm64", "variant": "v8"}, {}),
        (amd, {"os": "linux", "architecture": "amd64"}, {}),
        (amd2, {"os": "linux", "architecture": "amd64"}, {}),
    ])
    with client_for(registry) as client:
        resolved = client.resolve(f"{registry.host}/{repo_name}:multi")
        assert str(resolved.digest) == digest
        assert str(resolved.manifest_digest) == amd.manifest_digest
        assert pull_and_list(client, resolved, tmp_path) == [["arch"]]


def test_registry_pull_docker_manifest_list(registry, repo_name):
    image = push_test_image(registry, repo_name, "listed", media="docker", index=True)
    with client_for(registry) as client:
        resolved = client.resolve(f"{registry.host}/{repo_name}:listed")
        assert str(resolved.digest) == image.index_digest
        assert str(resolved.manifest_digest) == image.manifest_digest != image.index_digest
        assert resolved.manifest_media_type == DOCKER_MANIFEST


def test_registry_pull_index_without_amd64_is_no_matching_platform(registry, repo_name):
    arm = push_test_image(registry, repo_name, None, architecture="arm64")
    push_index(registry, repo_name, "armonly", [(arm, {"os": "linux", "architecture": "arm64"}, {})])
    with client_for(registry) as client, pytest.raises(NoMatchingPlatform) as exc:
        client.resolve(f"{registry.host}/{repo_name}:armonly")
    assert exc.value.code == "no_matching_platform" and exc.value.details["offered"] == ["linux/arm64"]


def test_registry_pull_single_arm64_manifest_is_no_matching_platform(registry, repo_name):
    push_test_image(registry, repo_name, "arm", architecture="arm64")
    with client_for(registry) as client, pytest.raises(NoMatchingPlatform):
        client.resolve(f"{registry.host}/{repo_name}:arm")


def test_registry_pull_nested_index(registry, repo_name):
    amd = push_test_image(registry, repo_name, None)
    arm = push_test_image(registry, repo_name, None, architecture="arm64")
    inner_digest, inner = push_index(registry, repo_name, "inner", [(arm, {"os": "linux", "architecture": "arm64"}, {}),
                                                                    (amd, {"os": "linux", "architecture": "amd64"}, {})])
    inner_image = type(amd)(amd.registry_host, repo_name, "inner", amd.manifest_digest, amd.manifest_bytes,
                            amd.media_type, amd.config_bytes, amd.layers, inner_digest, inner)
    push_index(registry, repo_name, "outer", [(inner_image, None, {})])
    with client_for(registry) as client:
        resolved = client.resolve(f"{registry.host}/{repo_name}:outer")
        assert str(resolved.manifest_digest) == amd.manifest_digest


def test_registry_pull_index_nested_too_deep_is_refused(registry, repo_name):
    from common.errors import LimitExceeded
    from common.registry.manifests import MAX_INDEX_DEPTH

    image = push_test_image(registry, repo_name, None)
    current = image
    for level in range(MAX_INDEX_DEPTH + 1):
        platform = {"os": "linux", "architecture": "amd64"} if level == 0 else None
        digest, body = push_index(registry, repo_name, f"level{level}", [(current, platform, {})])
        current = type(image)(image.registry_host, repo_name, f"level{level}", image.manifest_digest,
                              image.manifest_bytes, image.media_type, image.config_bytes, image.layers, digest, body)
    with client_for(registry) as client:
        client.resolve(f"{registry.host}/{repo_name}:level{MAX_INDEX_DEPTH - 2}")
        with pytest.raises(LimitExceeded):
            client.resolve(f"{registry.host}/{repo_name}:level{MAX_INDEX_DEPTH}")


def test_registry_pull_diff_id_mismatch_fails(registry, repo_name, tmp_path):
    tar = make_tar({"a": b"a"})
    push_test_image(registry, repo_name, "lie", [tar], diff_ids=[sha256(b"another tar")])
    with client_for(registry) as client:
        resolved = client.resolve(f"{registry.host}/{repo_name}:lie")
        with pytest.raises(DigestMismatch) as exc:
            pull_and_list(client, resolved, tmp_path)
    assert exc.value.code == "digest_mismatch"


@pytest.mark.parametrize("compression", ["gzip", "zstd", None])
def test_registry_pull_trailing_junk_after_tar_fails(registry, repo_name, tmp_path, compression):
    tar = make_tar({"a": b"a"})
    # The blob is what the registry stores and its digest is right; only the DiffID check can tell.
    junk_layer = make_layer(tar + b"\0" * 512 + b"JUNK", compression)
    honest_diff_id = sha256(tar)
    push_test_image(registry, repo_name, "junk", [junk_layer], diff_ids=[honest_diff_id])
    with client_for(registry) as client:
        resolved = client.resolve(f"{registry.host}/{repo_name}:junk")
        with pytest.raises(DigestMismatch):
            pull_and_list(client, resolved, tmp_path)


def test_registry_pull_layer_count_must_match_diff_ids(registry, repo_name):
    push_test_image(registry, repo_name, "short", [make_tar({"a": b"1"}), make_tar({"b": b"2"})],
                    diff_ids=[sha256(b"only one")])
    with client_for(registry) as client, pytest.raises(InvalidManifest, match="diff_ids"):
        client.resolve(f"{registry.host}/{repo_name}:short")


def test_registry_pull_foreign_layer_refused(registry, repo_name):
    session = PushSession(registry)
    tar = make_tar({"a": b"a"})
    layer = make_layer(tar)
    config = json.dumps(image_config([layer.diff_id])).encode()
    session.push_blob(repo_name, config)
    session.push_blob(repo_name, layer.blob)
    manifest = {
        "schemaVersion": 2, "mediaType": DOCKER_MANIFEST,
        "config": {"mediaType": "application/vnd.docker.container.image.v1+json", "digest": sha256(config),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip", "digest": layer.digest,
                    "size": len(layer.blob), "urls": ["https://foreign.example.com/layer"]}],
    }
    session.push_manifest(repo_name, "foreign", DOCKER_MANIFEST, json.dumps(manifest).encode())
    with client_for(registry) as client, pytest.raises(UnsupportedMediaType, match="foreign") as exc:
        client.resolve(f"{registry.host}/{repo_name}:foreign")
    assert exc.value.code == "unsupported_media_type"


def test_registry_fetch_blob_failure_leaves_nothing_behind(registry, repo_name, tmp_path):
    push_test_image(registry, repo_name, "v1")
    with client_for(registry) as client:
        layer = client.resolve(f"{registry.host}/{repo_name}:v1").layers[0]
        wrong = type(layer)(layer.media_type, layer.digest, layer.size + 1)
        dest = tmp_path / "cache" / "blob"
        with pytest.raises(SizeMismatch):
            client.fetch_blob(repo_name, wrong, dest)
    assert list((tmp_path / "cache").iterdir()) == []


def test_registry_pull_index_entries_without_platform_are_checked_by_config(registry, repo_name):
    arm = push_test_image(registry, repo_name, None, [make_tar({"a": b"arm"})], architecture="arm64")
    amd = push_test_image(registry, repo_name, None, [make_tar({"a": b"amd"})])
    push_index(registry, repo_name, "bare", [(arm, None, {}), (amd, None, {})])
    with client_for(registry) as client:
        assert str(client.resolve(f"{registry.host}/{repo_name}:bare").manifest_digest) == amd.manifest_digest
