"""`nitroconv convert-local --boot-check` and the memory it sizes when `--mem-size` is omitted."""
from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import pytest

from common.enclave.reader import read_eif
from tests.fixtures.convert_cli import convert_local, manifest_status
from tests.fixtures.devblobs import blobs_target, build_dev_blobs
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import image_config, make_layer, push_test_image
from tests.fixtures.repo import REPO
from tests.fixtures.require import skip_or_fail
from worker.pipeline.bootcheck import QEMU
from worker.pipeline.memory import MEM_STEP_MIB, MIB, default_mem_mib

pytestmark = [pytest.mark.integration, pytest.mark.qemu]
GREETING = "hello from convert-local 9b2e"


def _runtime_dir() -> Path:
    runtime = Path(os.environ.get("NITROCONV_RUNTIME_DIR") or REPO / ".state" / "runtime")
    if not (runtime / "shim").is_file():
        skip_or_fail(f"no exec shim in {runtime} (make runtime)")
    return runtime


def test_cli_convert_local_boot_check_reports_the_program_and_sizes_memory(registry, tmp_path) -> None:  # noqa: ANN001
    if shutil.which(QEMU) is None:
        skip_or_fail(f"{QEMU} is not installed")
    blobs = build_dev_blobs(blobs_target()).dir
    base = make_layer(busybox_base_tar())
    config = image_config([base.diff_id], cmd=(), Entrypoint=["/bin/echo", GREETING])
    image = push_test_image(registry, f"cli/boot-{uuid.uuid4().hex[:6]}", "v1", [base], config=config)
    out_repo, out_tag = "cli/boot-enclave", uuid.uuid4().hex[:8]
    run = convert_local(tmp_path, blobs, "--input", image.ref, "--output", f"{registry.host}/{out_repo}:{out_tag}",
                        "--insecure-registry", registry.host, "--boot-check",
                        env={"NITROCONV_RUNTIME_DIR": str(_runtime_dir())})
    assert run.returncode == 0, run.stderr
    assert "boot check ok in " in run.stderr and f"  | {GREETING}" in run.stderr.splitlines()
    info = read_eif(run.eif)
    # No --mem-size: the header carries 4x the EIF rounded up to 256 MiB, computed before the EIF was written.
    assert info.default_mem == default_mem_mib(info.size) * MIB
    assert info.default_mem % (MEM_STEP_MIB * MIB) == 0 and info.default_mem >= 4 * info.size
    assert manifest_status(registry, out_repo, out_tag) == 200
