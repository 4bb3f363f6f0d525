"""`nitroconv convert-local` reuses an identical earlier conversion from its state dir; `--no-reuse` converts afresh."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, blobs_target, build_dev_blobs, build_shim, runtime_target
from tests.fixtures.images import push_test_image

pytestmark = pytest.mark.integration

NITROCONV = REPO / ".venv" / "bin" / "nitroconv"


def test_convert_local_reuses_and_no_reuse_converts_again(registry, tmp_path: Path) -> None:  # noqa: ANN001
    blobs = build_dev_blobs(blobs_target()).dir
    runtime = build_shim(runtime_target()).parent
    image = push_test_image(registry, f"clireuse/app-{uuid.uuid4().hex[:6]}", "1")
    state = tmp_path / "state"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}

    def run(output: str, *extra: str) -> tuple[subprocess.CompletedProcess[str], bytes]:
        eif = tmp_path / f"{output}.eif"
        done = subprocess.run(
            [str(NITROCONV), "convert-local", "--input", image.ref, "--output", f"{registry.host}/clireuse/{output}:1",
             "--insecure-registry", registry.host, "--blobs", str(blobs), "--runtime", str(runtime),
             "--entrypoint", "/bin/true", "--eif-out", str(eif), *extra],
            env={**clean, "NITROCONV_STATE_DIR": str(state)}, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr
        return done, eif.read_bytes()

    fresh, eif1 = run("a")
    hit, eif2 = run("b")
    again, eif3 = run("c", "--no-reuse")
    assert "reused the conversion" not in fresh.stderr and "reused the conversion" not in again.stderr
    assert f"reused the conversion of {registry.host}/clireuse/a:1@sha256:" in hit.stderr
    # Same measurements on stdout, and the EIF written from the cached layer is the converted one, byte for byte.
    assert json.loads(fresh.stdout) == json.loads(hit.stdout) == json.loads(again.stdout)
    assert eif1 == eif2 == eif3
    assert list((state / "cache" / "conversions").glob("*.json"))
