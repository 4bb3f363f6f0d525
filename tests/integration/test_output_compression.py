"""NITROCONV_OUTPUT_COMPRESSION end to end: `convert-local` pushes a gzip or zstd output layer to a real registry,
the command-line tools accept the blob, and our own `fetch-eif` reads the EIF back byte for byte."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.devblobs import blobs_target, build_dev_blobs, build_shim, runtime_target
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import OCI_MANIFEST, PushSession, image_config, make_layer, push_test_image
from tests.fixtures.registries import RunningRegistry
from tests.fixtures.repo import REPO

pytestmark = pytest.mark.integration

NITROCONV = REPO / ".venv" / "bin" / "nitroconv"


@pytest.fixture(scope="module")
def input_ref(registry: RunningRegistry) -> str:
    layer = make_layer(busybox_base_tar())
    return push_test_image(registry, "compression/app", "v1", [layer],
                           config=image_config([layer.diff_id], cmd=["/bin/echo", "hi"])).ref


def run(argv: list[str], work: Path, compression: str | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}
    env["NITROCONV_STATE_DIR"] = str(work / "state")
    if compression is not None:
        env["NITROCONV_OUTPUT_COMPRESSION"] = compression
    return subprocess.run([str(NITROCONV), *argv], cwd=work, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(("compression", "tool", "media_type"), [
    ("zstd", "zstd", "application/vnd.oci.image.layer.v1.tar+zstd"),
    (None, "gzip", "application/vnd.oci.image.layer.v1.tar+gzip"),
])
def test_output_compression_pushes_a_layer_fetch_eif_reads(registry: RunningRegistry, input_ref: str, tmp_path: Path,
                                                           compression: str | None, tool: str, media_type: str) -> None:
    tag = compression or "default"
    output = f"{registry.host}/compression/out:{tag}"
    converted = run(["convert-local", "--input", input_ref, "--output", output, "--insecure-registry", registry.host,
                     "--blobs", str(build_dev_blobs(blobs_target()).dir),
                     "--runtime", str(build_shim(runtime_target()).parent), "--eif-out", str(tmp_path / "made.eif"),
                     "--no-reuse"], tmp_path, compression)
    assert converted.returncode == 0, converted.stderr
    session = PushSession(registry)
    manifest = session.request("GET", f"/v2/compression/out/manifests/{tag}", "compression/out",
                               headers={"Accept": OCI_MANIFEST})
    assert manifest.status_code == 200
    layer = json.loads(manifest.content)["layers"][-1]
    assert layer["mediaType"] == media_type
    blob = session.request("GET", f"/v2/compression/out/blobs/{layer['digest']}", "compression/out").content
    assert f"sha256:{hashlib.sha256(blob).hexdigest()}" == layer["digest"]
    (tmp_path / "layer.blob").write_bytes(blob)
    subprocess.run([tool, "-t", str(tmp_path / "layer.blob")], check=True, capture_output=True)

    fetched = run(["fetch-eif", output, "--out", str(tmp_path / "fetched.eif"), "--insecure-registry",
                   registry.host], tmp_path, None)
    assert fetched.returncode == 0, fetched.stderr
    made = (tmp_path / "made.eif").read_bytes()
    assert (tmp_path / "fetched.eif").read_bytes() == made
    assert f"sha256:{hashlib.sha256(made).hexdigest()}" in fetched.stdout


def test_output_compression_unknown_value_fails_before_work(registry: RunningRegistry, input_ref: str,
                                                            tmp_path: Path) -> None:
    done = run(["convert-local", "--input", input_ref, "--output", f"{registry.host}/compression/out:bad",
                "--insecure-registry", registry.host, "--blobs", str(build_dev_blobs(blobs_target()).dir),
                "--runtime", str(build_shim(runtime_target()).parent), "--no-reuse"], tmp_path, "brotli")
    assert done.returncode != 0
    assert "invalid_options" in done.stderr and "brotli" in done.stderr
