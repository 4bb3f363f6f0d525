"""`nitroconv convert-local` reuses an identical earlier conversion from its state dir; `--no-reuse` converts afresh."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.fixtures.devblobs import blobs_target, build_dev_blobs, build_shim, runtime_target
from tests.fixtures.images import make_tar, push_test_image
from tests.fixtures.repo import REPO

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


def _spec(input_ref: str, output_ref: str):  # noqa: ANN202
    from worker.pipeline.spec import ConverterOptions, ConvertSpec

    return ConvertSpec(input_ref=input_ref, output_ref=output_ref, input_credentials=None, output_credentials=None,
                       options=ConverterOptions(entrypoint=("/bin/true",)), cpu_count=2, mem_size_mib=None)


def _host(tmp_path: Path, *insecure: str):  # noqa: ANN202
    from worker.pipeline.host import ConversionHost

    return ConversionHost(blobs_dir=build_dev_blobs(blobs_target()).dir, runtime_dir=build_shim(runtime_target()).parent,
                          cache_dir=tmp_path / "cache", insecure_registries=frozenset(insecure))


def test_a_tag_that_moves_during_the_conversion_does_not_change_what_is_converted(registry, tmp_path: Path) -> None:  # noqa: ANN001
    """The key is the digest the tag named when the conversion began, and the pull converts that very manifest:
    a tag moved before the pull neither changes the result nor gets recorded under the wrong key."""
    from worker.pipeline.reuse import convert_reusing
    from worker.pipeline.spec import Progress, Workspace

    repo = f"clireuse/moving-{uuid.uuid4().hex[:6]}"
    first = push_test_image(registry, repo, "latest")
    spec = _spec(first.ref, f"{registry.host}/clireuse/moved:1")
    moved: list[str] = []

    def on_stage(stage: object, _: float) -> None:
        if str(getattr(stage, "name", stage)) == "PULLING" and not moved:  # after the key, before the pull
            moved.append(push_test_image(registry, repo, "latest", [make_tar({"moved": b"another\n"})]).manifest_digest)

    host = _host(tmp_path, registry.host)
    result = convert_reusing(spec, host, Progress(on_stage), Workspace(tmp_path / "s1"))
    assert moved and moved[0] != first.manifest_digest
    assert result.input_digest == first.manifest_digest and result.reused_from is None
    assert len(list((tmp_path / "cache" / "conversions").glob("*.json"))) == 1
    # The tag now names the second image: converted afresh (the first's record is not served for it).
    again = convert_reusing(spec, host, Progress(), Workspace(tmp_path / "s2"))
    assert again.reused_from is None and again.input_digest == moved[0]
    assert again.measurements.pcr2 != result.measurements.pcr2
    third = convert_reusing(spec, host, Progress(), Workspace(tmp_path / "s3"))
    assert third.reused_from is not None and third.input_digest == moved[0]
    assert third.measurements == again.measurements


def test_a_conversion_asks_the_input_registry_for_the_manifest_once(registry, hostile_front, tmp_path: Path) -> None:  # noqa: ANN001
    """The reuse cache's key needs the input's digest before anything else; the pull converts that answer
    instead of asking again (one round trip fewer per conversion, one token fewer on a registry with auth)."""
    from worker.pipeline.reuse import convert_reusing
    from worker.pipeline.spec import Progress, Workspace

    front = hostile_front(registry.host)
    repo = f"clireuse/once-{uuid.uuid4().hex[:6]}"
    image = push_test_image(registry, repo, "latest")
    spec = _spec(f"{front.host}/{repo}:latest", f"{registry.host}/clireuse/once:1")
    result = convert_reusing(spec, _host(tmp_path, registry.host, front.host), Progress(), Workspace(tmp_path / "s1"))
    assert result.input_digest == image.manifest_digest
    assert front.count("GET", f"/v2/{repo}/manifests/") == 1
    assert front.count("HEAD", f"/v2/{repo}/manifests/") == 0
