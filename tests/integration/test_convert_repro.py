"""Reproducibility: the same image converted by separate processes gives byte-identical EIFs and output images."""
from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.devblobs import build_shim, runtime_target
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import PushSession, image_config, make_layer, push_test_image
from tests.fixtures.registries import RunningRegistry
from tests.fixtures.repo import REPO
from tests.layertar import LayerTar

pytestmark = pytest.mark.integration

NITROCONV = REPO / ".venv" / "bin" / "nitroconv"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


@dataclass(frozen=True)
class Conversion:
    measurements: dict[str, str]
    eif: bytes
    output_digest: str
    scratch: Path


def push_image(registry: RunningRegistry, repo: str) -> str:
    """Three layers with what a conversion must order and number deterministically: many files, hard links,
    symlinks, whiteouts (plain and opaque), owners, a setuid file, a device node and a FIFO."""
    app = (LayerTar().dir("srv", mtime=1_700_000_001).dir("srv/app", uid=1000, gid=1000)
           .file("srv/app/run.sh", b"#!/bin/sh\necho run\n", mode=0o755, uid=1000, gid=1000)
           .link("srv/app/run-again.sh", "srv/app/run.sh")
           .file("srv/app/doomed", b"gone soon\n").dir("srv/app/cache").file("srv/app/cache/old", b"old\n")
           .symlink("srv/app/current", "/srv/app/run.sh").bytes())
    top = (LayerTar().dir("srv/app", uid=1000, gid=1000).whiteout("srv/app", "doomed").opaque("srv/app/cache")
           .file("srv/app/cache/new", b"new\n").file("usr/bin/suid", b"#!/bin/sh\n", mode=0o4755)
           .char("srv/app/null", 1, 3, mode=0o666).fifo("srv/app/pipe", mode=0o600)
           .file("srv/app/big.bin", bytes(range(256)) * 4096).bytes())
    layers = [make_layer(busybox_base_tar()), make_layer(app), make_layer(top, compression="zstd")]
    config = image_config([lay.diff_id for lay in layers], cmd=["/srv/app/run.sh"], Env=[
        "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "APP=repro"], WorkingDir="/srv/app")
    return push_test_image(registry, repo, "v1", layers, config=config).ref


@pytest.fixture(scope="module")
def input_ref(registry: RunningRegistry) -> str:
    return push_image(registry, "repro/app")


def start(work: Path, registry: RunningRegistry, blobs: Path, input_ref: str, output_tag: str, seed: str,
          extra: Sequence[str] = (), prefix: Sequence[str] = ()) -> subprocess.Popen[str]:
    """One `convert-local` process with its own cwd, scratch parent, state dir (so its own blob cache) and
    hash seed (so no set or dict order can leak into the bytes)."""
    (work / "scratch").mkdir(parents=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}
    env.update(NITROCONV_STATE_DIR=str(work / "state"), PYTHONHASHSEED=seed)
    return subprocess.Popen(
        [*prefix, str(NITROCONV), "convert-local", "--input", input_ref,
         "--output", f"{registry.host}/repro/app-enclave:{output_tag}", "--insecure-registry", registry.host,
         "--blobs", str(blobs), "--scratch", str(work / "scratch"), "--eif-out", str(work / "app.eif"),
         "--runtime", str(build_shim(runtime_target()).parent), *extra],
        cwd=work, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def finish(proc: subprocess.Popen[str], work: Path, registry: RunningRegistry, output_tag: str) -> Conversion:
    stdout, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr
    head = PushSession(registry).request("HEAD", f"/v2/repro/app-enclave/manifests/{output_tag}", "repro/app-enclave",
                                         headers={"Accept": OCI_MANIFEST})
    assert head.status_code == 200
    return Conversion(json.loads(stdout)["Measurements"], (work / "app.eif").read_bytes(),
                      head.headers["Docker-Content-Digest"], work / "scratch")


@pytest.fixture(scope="module")
def twins(registry, blobs_dir, input_ref, tmp_path_factory) -> tuple[Conversion, Conversion]:
    """The same conversion by two processes side by side: nothing shared but the registry and the blobs dir."""
    root = tmp_path_factory.mktemp("twins")
    procs = [(start(root / name, registry, blobs_dir, input_ref, name, seed), name)
             for name, seed in (("first", "1"), ("second", "2"))]
    first, second = (finish(proc, root / name, registry, name) for proc, name in procs)
    for name in ("first", "second"):
        state = root / name / "state"
        written = [p for p in state.rglob("*") if p.is_file()]
        assert written, "each process filled a blob cache of its own"
        assert all(p.is_relative_to(state / "cache") for p in written), written
    return first, second


def test_convert_repro_two_processes_give_identical_eifs(twins) -> None:
    first, second = twins
    assert first.eif == second.eif
    assert first.measurements == second.measurements
    assert first.output_digest == second.output_digest, "the pushed output image is reproducible too"
    for conversion in twins:
        assert list(conversion.scratch.iterdir()) == []


def test_convert_repro_env_option_changes_pcr0_and_pcr2_only(twins, registry, blobs_dir, input_ref, tmp_path) -> None:
    base, _ = twins
    with_env = finish(start(tmp_path / "env", registry, blobs_dir, input_ref, "env", "3", ["--env", "X=1"]),
                      tmp_path / "env", registry, "env")
    assert with_env.measurements["PCR1"] == base.measurements["PCR1"]
    assert with_env.measurements["PCR0"] != base.measurements["PCR0"]
    assert with_env.measurements["PCR2"] != base.measurements["PCR2"]
    assert with_env.eif != base.eif and with_env.output_digest != base.output_digest


def test_convert_repro_one_core_gives_the_same_output_digest(twins, registry, blobs_dir, input_ref, tmp_path) -> None:
    """Pinned to one CPU, the compressor and hashers run with one thread each: the output image is the same."""
    base, _ = twins
    pinned = finish(start(tmp_path / "pinned", registry, blobs_dir, input_ref, "pinned", "4", ["--no-reuse"],
                          prefix=["taskset", "-c", "0"]), tmp_path / "pinned", registry, "pinned")
    assert pinned.eif == base.eif
    assert pinned.output_digest == base.output_digest


def test_convert_repro_warm_worker_process_gives_the_same_output(twins, registry, blobs_dir, input_ref,
                                                                 tmp_path) -> None:
    """A worker process keeps the measured kernel/cmdline/ramdisk 0 and the kernel's deflated blocks between
    conversions (common.enclave.prefix, common.image.compress): its next conversion is the same as a fresh process's."""
    from common.enclave.prefix import PREFIXES
    from common.image.compress import DEFLATED
    from worker.pipeline.convert import convert
    from worker.pipeline.host import ConversionHost
    from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

    base, _ = twins
    PREFIXES.clear()
    DEFLATED.clear()

    def once(tag: str) -> tuple[str, bytes]:
        spec = ConvertSpec(input_ref=input_ref, output_ref=f"{registry.host}/repro/app-enclave:{tag}",
                           input_credentials=None, output_credentials=None, options=ConverterOptions(), cpu_count=2,
                           mem_size_mib=None)
        eif = tmp_path / f"{tag}.eif"
        host = ConversionHost(blobs_dir=blobs_dir, runtime_dir=build_shim(runtime_target()).parent,
                              cache_dir=tmp_path / "cache", insecure_registries=frozenset({registry.host}))
        result = convert(spec, host, Progress(), Workspace(tmp_path / f"scratch-{tag}", eif_out=eif))
        return result.output_digest, eif.read_bytes()

    assert once("cold") == (base.output_digest, base.eif)
    assert len(PREFIXES) == 1 and len(DEFLATED) > 0 and PREFIXES.hits == DEFLATED.hits == 0
    assert once("warm") == (base.output_digest, base.eif)
    assert PREFIXES.hits == 1 and DEFLATED.hits == len(DEFLATED)
    PREFIXES.clear()
    DEFLATED.clear()
