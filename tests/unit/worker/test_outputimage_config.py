"""The output image's config and manifest documents, with and without an output base image."""
from __future__ import annotations

import json
from pathlib import Path

from common.registry.digest import Digest
from common.registry.manifests import Descriptor
from common.registry.reference import parse_reference
from worker.pipeline.outputbase import BaseImage, BaseLayer
from worker.pipeline.outputimage import (
    ENTRYPOINT,
    FIXED_CREATED,
    LABEL_PREFIX,
    LAYER_MEDIA_TYPE,
    Blob,
    OutputLayer,
    blob_of,
    config_json,
    manifest_json,
)

OURS = OutputLayer(Path("/nonexistent"), Blob("sha256:" + "a" * 64, 10, LAYER_MEDIA_TYPE), "sha256:" + "b" * 64, "c" * 64)
BASE_DIFF = "sha256:" + "d" * 64
BASE_BLOB = "sha256:" + "e" * 64
LABELS = {LABEL_PREFIX + "pcr0": "00" * 48}


def base(config: dict[str, object]) -> BaseImage:
    descriptor = Descriptor("application/vnd.docker.image.rootfs.diff.tar.gzip", Digest.parse(BASE_BLOB), 7)
    return BaseImage(
        reference=parse_reference("registry.example/ops/nitro-cli:1"),
        digest="sha256:" + "f" * 64,
        layers=(BaseLayer(BASE_BLOB, 7, LAYER_MEDIA_TYPE, descriptor),),
        diff_ids=(BASE_DIFF,),
        config_json=json.dumps(config),
    )


def test_config_json_without_base_has_only_our_layer_and_the_launcher() -> None:
    doc = json.loads(config_json(OURS, LABELS, ENTRYPOINT))
    assert doc == {"architecture": "amd64", "os": "linux", "created": FIXED_CREATED,
                   "config": {"Entrypoint": ["/enclave/run"], "Labels": LABELS},
                   "rootfs": {"type": "layers", "diff_ids": [OURS.diff_id]}}


def test_config_json_on_base_keeps_its_runtime_settings_and_drops_its_command() -> None:
    b = base({"architecture": "amd64", "os": "linux", "created": "2024-01-02T03:04:05Z",
              "config": {"Env": ["PATH=/usr/bin"], "User": "0", "WorkingDir": "/srv", "Cmd": ["/bin/sh"],
                         "Entrypoint": ["/docker-entrypoint.sh"],
                         "Labels": {"vendor": "ops", LABEL_PREFIX + "pcr8": "stale", LABEL_PREFIX + "pcr0": "old"}},
              "rootfs": {"type": "layers", "diff_ids": [BASE_DIFF]},
              "history": [{"created": "2024-01-02T03:04:05Z", "created_by": "ADD rootfs"},
                          {"created": "2024-01-02T03:04:06Z", "created_by": "CMD", "empty_layer": True}]})
    doc = json.loads(config_json(OURS, LABELS, ENTRYPOINT, b))
    inner = doc["config"]
    assert inner["Entrypoint"] == ["/enclave/run"] and "Cmd" not in inner
    assert (inner["Env"], inner["User"], inner["WorkingDir"]) == (["PATH=/usr/bin"], "0", "/srv")
    assert inner["Labels"] == {"vendor": "ops", LABEL_PREFIX + "pcr0": "00" * 48,
                               LABEL_PREFIX + "base": f"registry.example/ops/nitro-cli@{'sha256:' + 'f' * 64}"}
    assert doc["created"] == FIXED_CREATED
    assert doc["rootfs"]["diff_ids"] == [BASE_DIFF, OURS.diff_id]
    assert len(doc["history"]) == 3 and doc["history"][-1]["created"] == FIXED_CREATED
    assert "empty_layer" not in doc["history"][-1]


def test_config_json_on_base_without_history_adds_none() -> None:
    doc = json.loads(config_json(OURS, LABELS, ENTRYPOINT, base({"architecture": "amd64", "os": "linux"})))
    assert "history" not in doc


def test_config_json_is_byte_stable() -> None:
    b = base({"os": "linux", "architecture": "amd64", "config": {"Labels": {"z": "1", "a": "2"}}})
    assert config_json(OURS, LABELS, ENTRYPOINT, b) == config_json(OURS, dict(reversed(LABELS.items())), ENTRYPOINT, b)


def test_manifest_json_lists_base_layers_before_ours() -> None:
    config = blob_of(b"{}", "application/vnd.oci.image.config.v1+json")
    doc = json.loads(manifest_json(config, OURS.blob, {}, [Blob(BASE_BLOB, 7, LAYER_MEDIA_TYPE)]))
    assert [layer["digest"] for layer in doc["layers"]] == [BASE_BLOB, OURS.blob.digest]
    assert "annotations" not in doc


def test_config_exposes_the_published_ports_only() -> None:
    doc = json.loads(config_json(OURS, {}, ["/enclave/run"], exposed_ports=[8443, 8080]))
    assert doc["config"]["ExposedPorts"] == {"8080/tcp": {}, "8443/tcp": {}}
    assert "ExposedPorts" not in json.loads(config_json(OURS, {}, ["/enclave/run"]))["config"]
