"""worker/runtime/Makefile: the pinned zig builds init, shim and run to the bytes of worker/runtime/SHA256SUMS from
any checkout path, through every recipe that builds them (`make setup`'s deploy/blobs and deploy/runtime); the
worker image's build is compared in test_deploy_images.py."""
from __future__ import annotations

import configparser
import hashlib
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.devblobs import (
    BLOBS_RECIPE,
    RUNTIME_RECIPE,
    RUNTIME_SOURCES,
    build_shim,
    make,
    recorded_sums,
    runtime_target,
)
from tests.fixtures.repo import REPO

pytestmark = pytest.mark.integration


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _clean_copy(dest: Path) -> Path:
    """The runtime folder alone, as another host's checkout at another path would have it."""
    shutil.copytree(RUNTIME_SOURCES, dest, ignore=shutil.ignore_patterns("build"))
    return dest


def test_runtime_toolchain_pin_is_the_recipes_and_the_installed_one() -> None:
    extras = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=("#",))
    extras.read(REPO / "setup.cfg")
    pinned = re.fullmatch(r"ziglang==(\S+)", extras["options.extras_require"]["runtime"].strip())
    assert pinned, "the runtime extra pins ziglang exactly"
    recipe = re.search(r"^ZIG_VERSION := (\S+)$", (RUNTIME_SOURCES / "Makefile").read_text(), re.M)
    assert recipe and recipe[1] == pinned[1]
    installed = subprocess.run([sys.executable, "-m", "ziglang", "version"], capture_output=True, text=True,
                               check=True).stdout.strip()
    assert installed == pinned[1]
    # The sources ship as a folder with its recipe, not as Python package data (other data, such as
    # common/enclave's pinned attestation root, may be).
    package_data = extras["options.package_data"] if extras.has_section("options.package_data") else {}
    assert not any("runtime" in str(package_data[name]) or name == "worker" for name in package_data)


def test_runtime_clean_build_elsewhere_gives_the_recorded_bytes(tmp_path: Path) -> None:
    recorded = recorded_sums()
    assert set(recorded) == {"init", "shim", "attestd", "run", "netd", "egressd", "egress"}
    src = _clean_copy(tmp_path / "another" / "checkout" / "runtime")
    out = tmp_path / "out"
    make(src, f"OUT={out}", "check")
    assert {name: _sha256(out / name) for name in recorded} == recorded
    for name in recorded:
        headers = subprocess.run(["readelf", "-lW", str(out / name)], capture_output=True, text=True,
                                 check=True).stdout
        assert "INTERP" not in headers and "DYNAMIC" not in headers, name
        assert (out / name).stat().st_mode & 0o777 == 0o755


def test_runtime_setup_recipes_give_the_recorded_bytes(tmp_path: Path) -> None:
    recorded = recorded_sums()
    make(RUNTIME_RECIPE, f"RUNTIME={tmp_path / 'runtime'}")
    make(BLOBS_RECIPE, f"BLOBS={tmp_path / 'blobs'}", str(tmp_path / "blobs" / "init"))
    assert _sha256(tmp_path / "runtime" / "shim") == recorded["shim"]
    assert _sha256(tmp_path / "runtime" / "run") == recorded["run"]
    for name in ("attestd", "netd", "egressd", "egress", "init"):
        assert _sha256((tmp_path / "blobs" if name == "init" else tmp_path / "runtime") / name) == recorded[name]
    # And what `make setup` left for this checkout's conversions (rebuilt if a source is newer).
    state = build_shim(runtime_target()).parent
    shipped = ("shim", "attestd", "run", "netd", "egressd", "egress")
    assert {name: _sha256(state / name) for name in shipped} == {k: recorded[k] for k in shipped}


def test_runtime_check_refuses_bytes_that_are_not_recorded(tmp_path: Path) -> None:
    src = _clean_copy(tmp_path / "runtime")
    shim = src / "shim.c"
    shim.write_text(shim.read_text().replace('#define SHIM_PREFIX "nitroconv-shim: "', '#define SHIM_PREFIX "nitroconv-shim! "', 1))
    done = subprocess.run(["make", "-s", "-C", str(src), f"PYTHON={sys.executable}", f"OUT={tmp_path / 'out'}",
                           "check"], capture_output=True, text=True)
    assert done.returncode != 0
    assert "differs from worker/runtime/SHA256SUMS" in done.stderr


def test_runtime_recipe_refuses_another_zig(tmp_path: Path) -> None:
    other = tmp_path / "zig"
    other.write_text("#!/bin/sh\necho 0.0.1\n")
    other.chmod(0o755)
    done = subprocess.run(["make", "-s", "-C", str(RUNTIME_SOURCES), f"ZIG={other}", f"OUT={tmp_path / 'out'}"],
                          capture_output=True, text=True)
    assert done.returncode != 0
    assert "zig 0.0.1, not" in done.stderr
    assert not (tmp_path / "out").exists()
