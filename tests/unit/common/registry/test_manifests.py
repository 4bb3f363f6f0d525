"""Strict manifest/index/config parsing and platform selection."""
from __future__ import annotations

import hashlib
import json

import pytest

from common.errors import InvalidManifest, NoMatchingPlatform, UnsupportedMediaType
from common.registry.digest import Digest
from common.registry.manifests import (
    DOCKER_LAYER_FOREIGN,
    DOCKER_MANIFEST,
    DOCKER_MANIFEST_LIST,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER_GZIP,
    OCI_LAYER_ZSTD,
    OCI_MANIFEST,
    Index,
    Manifest,
    Platform,
    check_config_platform,
    layer_compression,
    load_json_object,
    nested_indexes,
    no_matching_platform,
    parse_descriptor,
    parse_image_config,
    parse_manifest_document,
    select_manifest,
)
from common.util.compression import Compression


def dg(seed: str) -> str:
    return "sha256:" + hashlib.sha256(seed.encode()).hexdigest()


def desc(media: str = OCI_LAYER_GZIP, seed: str = "x", size: int = 10, **extra) -> dict:
    return {"mediaType": media, "digest": dg(seed), "size": size, **extra}


def manifest(media: str | None = OCI_MANIFEST, layers=None, config_media: str = OCI_CONFIG, **extra) -> dict:
    doc = {"schemaVersion": 2, "config": desc(config_media, "cfg"),
           "layers": layers if layers is not None else [desc(seed="l1"), desc(OCI_LAYER_ZSTD, "l2")], **extra}
    if media is not None:
        doc["mediaType"] = media
    return doc


def entry(os_: str, arch: str, seed: str, media: str = OCI_MANIFEST, variant: str = "", **extra) -> dict:
    platform = {"os": os_, "architecture": arch}
    if variant:
        platform["variant"] = variant
    return desc(media, seed, platform=platform, **extra)


def index(*entries: dict, media: str | None = OCI_INDEX) -> dict:
    doc = {"schemaVersion": 2, "manifests": list(entries)}
    if media is not None:
        doc["mediaType"] = media
    return doc


def raw(doc: dict) -> bytes:
    return json.dumps(doc).encode()


def test_parse_oci_and_docker_manifests():
    m = parse_manifest_document(raw(manifest()), OCI_MANIFEST)
    assert isinstance(m, Manifest) and m.media_type == OCI_MANIFEST
    assert [layer_compression(layer) for layer in m.layers] == [Compression.GZIP, Compression.ZSTD]
    d = parse_manifest_document(raw(manifest(DOCKER_MANIFEST, [desc("application/vnd.docker.image.rootfs.diff.tar.gzip")],
                                             "application/vnd.docker.container.image.v1+json")), DOCKER_MANIFEST)
    assert isinstance(d, Manifest) and d.media_type == DOCKER_MANIFEST


def test_parse_manifest_without_media_type_uses_content_type_or_shape():
    assert parse_manifest_document(raw(manifest(None)), OCI_MANIFEST).media_type == OCI_MANIFEST
    assert parse_manifest_document(raw(manifest(None)), "application/json").media_type == OCI_MANIFEST
    assert isinstance(parse_manifest_document(raw(index(entry("linux", "amd64", "a"), media=None)), None), Index)


def test_parse_manifest_content_type_parameters_are_ignored():
    assert parse_manifest_document(raw(manifest()), OCI_MANIFEST + "; charset=utf-8").media_type == OCI_MANIFEST


def test_parse_manifest_rejects_content_type_mismatch():
    with pytest.raises(InvalidManifest, match="does not match"):
        parse_manifest_document(raw(manifest()), DOCKER_MANIFEST)
    with pytest.raises(InvalidManifest):
        parse_manifest_document(raw(index(entry("linux", "amd64", "a"))), OCI_MANIFEST)


def test_parse_manifest_rejects_ambiguous_documents():
    doc = manifest()
    doc["manifests"] = [entry("linux", "amd64", "a")]
    with pytest.raises(InvalidManifest, match="ambiguous"):
        parse_manifest_document(raw(doc), OCI_MANIFEST)
    idx = index(entry("linux", "amd64", "a"))
    idx["layers"] = []
    with pytest.raises(InvalidManifest, match="ambiguous"):
        parse_manifest_document(raw(idx), OCI_INDEX)


def test_parse_manifest_rejects_shape_that_contradicts_type():
    with pytest.raises(InvalidManifest):
        parse_manifest_document(raw(index(entry("linux", "amd64", "a"), media=None)), OCI_MANIFEST)
    with pytest.raises(InvalidManifest):
        parse_manifest_document(raw(manifest(None)), DOCKER_MANIFEST_LIST)


def test_parse_manifest_rejects_descriptor_type_mismatch():
    with pytest.raises(InvalidManifest, match="descriptor says"):
        parse_manifest_document(raw(manifest()), OCI_MANIFEST, expected_media_type=DOCKER_MANIFEST)


def test_parse_manifest_rejects_duplicate_keys():
    body = raw(manifest())[:-1] + b', "layers": []}'
    with pytest.raises(InvalidManifest, match="duplicate"):
        parse_manifest_document(body, OCI_MANIFEST)
    nested = json.dumps(manifest()).replace('"size": 10', '"size": 10, "size": 11', 1).encode()
    with pytest.raises(InvalidManifest, match="duplicate"):
        parse_manifest_document(nested, OCI_MANIFEST)


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b"[]", b"{", b'{"schemaVersion": NaN}', b"[" * 100000 + b"]" * 100000])
def test_load_json_object_rejects_non_objects_and_garbage(body):
    with pytest.raises(InvalidManifest):
        load_json_object(body, what="manifest")


@pytest.mark.parametrize("content_type,doc", [
    ("application/vnd.docker.distribution.manifest.v1+prettyjws", {"schemaVersion": 1}),
    ("application/vnd.docker.distribution.manifest.v1+json", {"schemaVersion": 1}),
    ("application/json", {"schemaVersion": 1, "name": "x", "tag": "y", "fsLayers": []}),
])
def test_parse_manifest_refuses_schema1_clearly(content_type, doc):
    with pytest.raises(UnsupportedMediaType, match="schema 1 is deprecated") as exc:
        parse_manifest_document(raw(doc), content_type)
    assert exc.value.code == "unsupported_media_type"


def test_parse_manifest_rejects_bad_schema_version():
    with pytest.raises(InvalidManifest):
        parse_manifest_document(raw(manifest(schemaVersion=True)), OCI_MANIFEST)
    doc = manifest()
    doc["schemaVersion"] = 3
    with pytest.raises(InvalidManifest):
        parse_manifest_document(raw(doc), OCI_MANIFEST)


@pytest.mark.parametrize("bad", [
    {"digest": "sha256:../../x"},
    {"digest": dg("a").upper()},
    {"digest": "sha256:abc"},
    {"digest": "md5:" + "0" * 32},
    {"size": -1},
    {"size": 1.5},
    {"size": True},
    {"size": "10"},
    {"mediaType": "not a media type"},
    {"mediaType": None},
    {"urls": "http://x"},
    {"annotations": {"a": 1}},
])
def test_parse_descriptor_rejects_malformed_fields(bad):
    with pytest.raises(InvalidManifest):
        parse_descriptor({**desc(), **bad})


def test_parse_manifest_rejects_unknown_layer_types():
    with pytest.raises(UnsupportedMediaType) as exc:
        parse_manifest_document(raw(manifest(layers=[desc("application/vnd.example.layer.v1+lz4")])), OCI_MANIFEST)
    assert exc.value.details["media_type"] == "application/vnd.example.layer.v1+lz4"


@pytest.mark.parametrize("layer", [
    desc(DOCKER_LAYER_FOREIGN, urls=["https://mcr.microsoft.com/layer"]),
    desc("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
    desc(OCI_LAYER_GZIP, urls=["http://169.254.169.254/latest/meta-data"]),
])
def test_parse_manifest_refuses_foreign_layers(layer):
    with pytest.raises(UnsupportedMediaType, match="foreign"):
        parse_manifest_document(raw(manifest(layers=[layer])), OCI_MANIFEST)


def test_parse_manifest_refuses_non_image_artifacts():
    with pytest.raises(UnsupportedMediaType, match="not a container image"):
        parse_manifest_document(raw(manifest(config_media="application/vnd.cncf.helm.config.v1+json")), OCI_MANIFEST)
    with pytest.raises(UnsupportedMediaType):
        parse_manifest_document(raw({"schemaVersion": 2, "mediaType": "application/vnd.oci.artifact.manifest.v1+json",
                                     "blobs": []}), None)


def test_select_manifest_skips_arm64_and_attestations():
    idx = parse_manifest_document(raw(index(
        entry("unknown", "unknown", "att0"),
        entry("linux", "arm64", "arm", variant="v8"),
        entry("linux", "amd64", "amd"),
        entry("linux", "amd64", "amd-second"),
        entry("unknown", "unknown", "att1", annotations={"vnd.docker.reference.type": "attestation-manifest"}),
    )), OCI_INDEX)
    assert isinstance(idx, Index)
    assert select_manifest(idx).digest == Digest.parse(dg("amd"))


def test_select_manifest_skips_attestation_annotated_entries_even_with_a_platform():
    idx = parse_manifest_document(raw(index(
        entry("linux", "amd64", "att", annotations={"vnd.docker.reference.type": "attestation-manifest"}),
        entry("linux", "amd64", "real"),
    )), OCI_INDEX)
    assert select_manifest(idx).digest == Digest.parse(dg("real"))


def test_select_manifest_prefers_baseline_amd64_over_variants():
    idx = parse_manifest_document(raw(index(
        entry("linux", "amd64", "v3", variant="v3"),
        entry("linux", "amd64", "v2", variant="v2"),
        entry("linux", "amd64", "base"),
    )), OCI_INDEX)
    assert select_manifest(idx).digest == Digest.parse(dg("base"))
    only_variants = parse_manifest_document(raw(index(
        entry("linux", "amd64", "v3", variant="v3"), entry("linux", "amd64", "v2", variant="v2"))), OCI_INDEX)
    assert select_manifest(only_variants).digest == Digest.parse(dg("v2"))


def test_select_manifest_none_when_no_amd64():
    idx = parse_manifest_document(raw(index(
        entry("linux", "arm64", "arm"), entry("windows", "amd64", "win"), entry("unknown", "unknown", "att"))), OCI_INDEX)
    assert select_manifest(idx) is None
    err = no_matching_platform(idx)
    assert isinstance(err, NoMatchingPlatform) and err.code == "no_matching_platform"
    assert err.details["offered"] == ["linux/arm64", "windows/amd64"]


def test_nested_indexes_are_candidates_in_order():
    idx = parse_manifest_document(raw(index(
        desc(OCI_INDEX, "child-no-platform"),
        entry("linux", "arm64", "child-arm", media=OCI_INDEX),
        entry("linux", "amd64", "child-amd", media=OCI_INDEX),
    )), OCI_INDEX)
    assert [d.digest for d in nested_indexes(idx)] == [Digest.parse(dg("child-no-platform")),
                                                       Digest.parse(dg("child-amd"))]
    assert select_manifest(idx) is None


def config(**overrides) -> bytes:
    doc = {"architecture": "amd64", "os": "linux",
           "config": {"Entrypoint": ["/app"], "Cmd": ["--serve"], "Env": ["A=1"], "WorkingDir": "/srv",
                      "User": "1000:1000", "ExposedPorts": {"8080/tcp": {}, "53/udp": {}}, "Labels": {"k": "v"}},
           "rootfs": {"type": "layers", "diff_ids": [dg("d1"), dg("d2")]}}
    doc.update(overrides)
    return json.dumps(doc).encode()


def test_parse_image_config_reads_runtime_fields():
    c = parse_image_config(config())
    assert c.diff_ids == (Digest.parse(dg("d1")), Digest.parse(dg("d2")))
    assert (c.entrypoint, c.cmd, c.env, c.working_dir, c.user) == (("/app",), ("--serve",), ("A=1",), "/srv", "1000:1000")
    assert c.exposed_ports == ("53/udp", "8080/tcp") and c.labels == {"k": "v"}
    bare = parse_image_config(json.dumps({"rootfs": {"type": "layers", "diff_ids": []}, "config": None}).encode())
    assert bare.entrypoint is None and bare.cmd is None and bare.env == ()


@pytest.mark.parametrize("overrides", [
    {"rootfs": {"type": "other", "diff_ids": []}},
    {"rootfs": {"type": "layers", "diff_ids": ["sha256:nothex"]}},
    {"rootfs": {"type": "layers"}},
    {"config": {"Entrypoint": "/bin/sh -c x"}},
    {"config": {"Env": [1]}},
    {"config": []},
    {"os": 7},
])
def test_parse_image_config_rejects_malformed(overrides):
    with pytest.raises(InvalidManifest):
        parse_image_config(config(**overrides))


def test_check_config_platform_refuses_other_architectures():
    check_config_platform(parse_image_config(config()))
    check_config_platform(parse_image_config(config(architecture="", os="")))
    with pytest.raises(NoMatchingPlatform, match="linux/arm64"):
        check_config_platform(parse_image_config(config(architecture="arm64")))


def test_platform_str():
    assert str(Platform("linux", "arm64", "v8")) == "linux/arm64/v8"

