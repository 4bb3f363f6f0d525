"""Issue 16's figures: the emulator boot check of the sample and the realistic image, and what it adds to a conversion.

    .venv/bin/python bench/emulator_boot.py [--registry HOST:PORT] [--skip-realistic] [--json FILE]

For each image, one round (boots are software-emulated and slow; this bench stays cheap): `convert-local
--no-reuse` without the boot check (keeping the EIF), the emulator boot check of that EIF alone
(`run_boot_check` in this process, mode `emulator`), then `convert-local --no-reuse --boot-check
--boot-check-mode emulator`, each conversion with a cold blob cache of its own. "Adds" is the second
conversion's time minus the first's. Prints a skip line
and exits 0 when the emulator is not installed (hosts that cannot build it), 1 when a figure failed.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import _image  # noqa: E402
from _small import push_small_images  # noqa: E402

from common.enclave.reader import read_eif  # noqa: E402
from common.settings import Settings  # noqa: E402
from worker.pipeline.emulatorboot import (  # noqa: E402
    BootCheckPlan,
    emulator_missing,
    expected_registers,
    run_boot_check,
)


@dataclass
class ImageBoot:
    image: str
    eif_mib: float = 0.0
    convert_seconds: float = float("nan")  # convert-local, no boot check
    boot_seconds: float = float("nan")  # the emulator boot check alone
    boot_cpu_seconds: float = float("nan")  # its children's CPU (user + sys): QEMU and the vsock back-end
    exec_seconds: float | None = None  # QEMU's start to the entrypoint's exec
    convert_checked_seconds: float = float("nan")  # convert-local with the emulator boot check
    ok: bool = False
    error: str = ""

    @property
    def adds_seconds(self) -> float:
        return self.convert_checked_seconds - self.convert_seconds


def _log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _state_root() -> Path:
    return Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state")


def _children_cpu() -> float:
    """CPU seconds of this process's children waited for so far (the boot check's QEMU and back-end are)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _convert(ref: str, registry: str, state: Path, *extra: str) -> tuple[float, str]:
    """One `nitroconv convert-local` child: (wall seconds, stderr tail); raises on failure."""
    root = _state_root()
    env = {**os.environ, "NITROCONV_STATE_DIR": str(state),
           "NITROCONV_BLOBS_DIR": os.environ.get("NITROCONV_BLOBS_DIR") or str(root / "blobs"),
           "NITROCONV_RUNTIME_DIR": os.environ.get("NITROCONV_RUNTIME_DIR") or str(root / "runtime"),
           "NITROCONV_EMULATOR_QEMU": str(Settings.from_env(os.environ).emulator_qemu)}
    scratch = state / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    out = f"{registry}/bench/emulator-out:{secrets.token_hex(4)}"
    argv = [str(Path(sys.executable).parent / "nitroconv"), "convert-local", "--input", ref, "--output", out,
            "--insecure-registry", registry, "--scratch", str(scratch), "--no-reuse", *extra]
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(f"convert-local exited {done.returncode}: {done.stderr.strip()[-1500:]}")
    return seconds, done.stderr


def measure_image(label: str, ref: str, registry: str, plan: BootCheckPlan, parent: Path) -> ImageBoot:
    figure = ImageBoot(label)
    state = Path(tempfile.mkdtemp(prefix="emu-", dir=parent))
    try:
        eif = state / "app.eif"
        figure.convert_seconds, _ = _convert(ref, registry, state, "--eif-out", str(eif))
        figure.eif_mib = eif.stat().st_size / (1 << 20)
        expected = expected_registers(read_eif(eif).measurements.registers())
        _log(f"{label}: converted in {figure.convert_seconds:.1f}s, booting its {figure.eif_mib:.0f} MiB EIF")
        cpu_before = _children_cpu()
        start = time.perf_counter()
        result = run_boot_check(eif, plan=plan, expected=expected, scratch=state)
        figure.boot_seconds = time.perf_counter() - start
        figure.boot_cpu_seconds = _children_cpu() - cpu_before
        figure.exec_seconds = result.exec_seconds
        if not result.ok:
            raise RuntimeError(f"boot check failed ({result.error_code}): {result.reason}")
        # A state dir of its own: with the first one's blob cache warm, the pull would hide the check's cost.
        figure.convert_checked_seconds, _ = _convert(ref, registry, state / "checked", "--boot-check",
                                                     "--boot-check-mode", "emulator",
                                                     "--boot-check-timeout", str(plan.timeout))
        figure.ok = True
    except RuntimeError as exc:
        figure.error = str(exc)
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return figure


def report(figures: list[ImageBoot]) -> str:
    lines = [f"  {'image':34} {'EIF':>8} {'boot check':>11} {'its CPU':>8} {'to exec':>8} {'convert':>8} "
             f"{'+ check':>8} {'adds':>8}"]
    for f in figures:
        if not f.ok:
            lines.append(f"  {f.image:34} FAILED: {f.error}")
            continue
        exec_s = "-" if f.exec_seconds is None else f"{f.exec_seconds:.2f}s"
        lines.append(f"  {f.image:34} {f.eif_mib:6.0f}Mi {f.boot_seconds:10.2f}s {f.boot_cpu_seconds:7.2f}s {exec_s:>8} "
                     f"{f.convert_seconds:7.2f}s {f.convert_checked_seconds:7.2f}s {f.adds_seconds:+7.2f}s")
    lines.append("  boot check: the emulator (QEMU nitro-enclave machine, TCG, 1 vCPU) from start to verdict "
                 "(PCRs, heartbeat, entrypoint); its CPU: QEMU's and the vsock back-end's user+sys (on a loaded "
                 "host the wall time is this plus waiting for a core); adds: convert-local with the check minus without")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", default=os.environ.get("NITROCONV_REGISTRY_ADDR", "127.0.0.1:5000"))
    parser.add_argument("--skip-realistic", action="store_true", help="only the sample image")
    parser.add_argument("--timeout", type=float, default=600.0, help="boot check timeout (seconds)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    settings = Settings.from_env(os.environ)
    plan = BootCheckPlan(timeout=args.timeout, mode="emulator", emulator_qemu=settings.emulator_qemu)
    missing = emulator_missing(plan)
    if missing is not None:
        print(f"emulator boot check: skipped, {missing}")
        return 0
    state = _state_root()
    cache = state / "bench"
    cache.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(REPO / "deploy/registry.sh"), "start"], check=True,
                   env={**os.environ, "NITROCONV_STATE_DIR": str(state), "NITROCONV_REGISTRY_ADDR": args.registry})
    salt = secrets.token_hex(4)
    images = [("sample (busybox + sh script)",
               push_small_images(args.registry, "bench/emulator-sample", [f"s{salt}"], salt)[0])]
    if not args.skip_realistic:
        python = _image.python_image(cache, _log)
        _image.push(python, args.registry)
        images.append((f"realistic ({python.content_bytes / 1e6:.0f} MB, python)",
                       f"{args.registry}/{python.repository}:{python.tag}"))
    figures = [measure_image(label, ref, args.registry, plan, cache) for label, ref in images]
    print("emulator boot check, one round per image:")
    print(report(figures), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps([{**asdict(f), "adds_seconds": f.adds_seconds} for f in figures], indent=2))
    return 0 if all(f.ok for f in figures) else 1


if __name__ == "__main__":
    raise SystemExit(main())
