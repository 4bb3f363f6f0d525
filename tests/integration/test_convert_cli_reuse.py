"""`nitroconv convert-local` reuses an identical earlier conversion from its state dir; `--no-reuse` converts afresh."""
from __future__ import annotations

import json
import os
import subprocess
import uuid
from pathlib import Path

import pytest

from tests.e2e.conftest import REPO, blobs_target, build_dev_blobs, build_shim, runtime_target
from tests.fixtures.images import make_tar, push_test_image

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


def test_reuse_cache_does_not_record_a_tag_that_moved_during_the_conversion(registry, tmp_path: Path) -> None:  # noqa: ANN001
    """The key is the digest the tag named when the conversion began; if the tag moves before the pull, what was
    converted is another image, and recording it under that key would serve it for the first one later."""
    from worker.pipeline.convert import ConverterOptions, ConvertSpec
    from worker.pipeline.reuse import convert_reusing

    repo = f"clireuse/moving-{uuid.uuid4().hex[:6]}"
    first = push_test_image(registry, repo, "latest")
    spec = ConvertSpec(input_ref=first.ref, output_ref=f"{registry.host}/clireuse/moved:1", input_credentials=None,
                       output_credentials=None, options=ConverterOptions(entrypoint=["/bin/true"]), cpu_count=2,
                       mem_size_mib=None, insecure_registries=frozenset({registry.host}))
    moved: list[str] = []

    def on_stage(stage: object, _: float) -> None:
        if str(getattr(stage, "name", stage)) == "PULLING" and not moved:  # after the key, before the pull
            moved.append(push_test_image(registry, repo, "latest", [make_tar({"moved": b"another\n"})]).manifest_digest)

    kwargs = {"blobs_dir": build_dev_blobs(blobs_target()).dir, "cache_dir": tmp_path / "cache",
              "runtime_dir": build_shim(runtime_target()).parent}
    result = convert_reusing(spec, scratch=tmp_path / "s1", on_stage=on_stage, **kwargs)
    assert moved and result.input_digest == moved[0] != first.manifest_digest
    assert not list((tmp_path / "cache" / "conversions").glob("*.json"))
    # The tag now names the second image for good: its conversion is recorded, and the next one reuses it.
    again = convert_reusing(spec, scratch=tmp_path / "s2", on_stage=lambda *_: None, **kwargs)
    assert again.reused_from is None and len(list((tmp_path / "cache" / "conversions").glob("*.json"))) == 1
    third = convert_reusing(spec, scratch=tmp_path / "s3", on_stage=lambda *_: None, **kwargs)
    assert third.reused_from is not None and third.input_digest == moved[0]
