"""`nitroconv run-local`'s refusals before anything boots: no emulator, no launcher, bad options."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.repo import REPO

pytestmark = pytest.mark.integration

NITROCONV = REPO / ".venv" / "bin" / "nitroconv"


def _run(tmp_path: Path, *args: str, runtime: Path | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}
    env = {**clean, "NITROCONV_STATE_DIR": str(tmp_path / "state"),
           "NITROCONV_RUNTIME_DIR": str(runtime or tmp_path / "runtime")}
    return subprocess.run([str(NITROCONV), "run-local", *args], env=env, capture_output=True, text=True, timeout=60)


def _fake_emulator(tmp_path: Path) -> None:
    qemu = tmp_path / "state" / "emulator" / "qemu-system-x86_64"
    qemu.parent.mkdir(parents=True)
    qemu.write_text("#!/bin/sh\nexit 1\n")
    qemu.chmod(0o755)


def test_without_the_emulator(tmp_path: Path) -> None:
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"not booted")
    done = _run(tmp_path, str(eif))
    assert done.returncode == 1
    assert done.stderr.startswith("nitroconv: emulator_unavailable: no emulator at ") and "make setup" in done.stderr


def test_without_the_launcher(tmp_path: Path) -> None:
    _fake_emulator(tmp_path)
    done = _run(tmp_path, str(tmp_path))
    assert done.returncode == 1 and "nitroconv: emulator_unavailable: no launcher at " in done.stderr


@pytest.mark.parametrize("option, message", [
    (("--env", "NOVALUE"), "--env expects NAME=VALUE"),
    (("--env", "=x"), "--env expects NAME=VALUE"),
    (("--cpu-count", "0"), "--cpu-count must be at least 1"),
    (("--mem-size", "8"), "--mem-size must be at least 64"),
])
def test_bad_options(tmp_path: Path, option: tuple[str, ...], message: str) -> None:
    _fake_emulator(tmp_path)
    runtime = tmp_path / "runtime"
    runtime.mkdir()
    (runtime / "run").write_text("#!/bin/sh\nexit 0\n")
    (runtime / "run").chmod(0o755)
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"x")
    done = _run(tmp_path, str(eif), *option, runtime=runtime)
    assert done.returncode != 0
    assert done.stderr.startswith("nitroconv: invalid_options: ") and message in done.stderr, done.stderr
