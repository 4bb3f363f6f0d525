"""Whole-system fixtures: the dev blobs built by deploy/blobs, busybox image trees, and ramdisk staging."""
from __future__ import annotations

import os
import shutil
import stat
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.filetree import BytesContent, Tree

REPO = Path(__file__).resolve().parents[2]
BLOBS_RECIPE = REPO / "deploy" / "blobs"
# The mount points the init needs inside the new root (nitro-cli's customer yaml, EIF.md §5.1).
ROOTFS_DIRS = ("dev", "proc", "run", "sys", "tmp", "var")


@dataclass(frozen=True)
class DevBlobs:
    """A blobs dir in the layout of /usr/share/nitro_enclaves/blobs (DESIGN.md §6)."""

    dir: Path

    @property
    def kernel(self) -> Path:
        return self.dir / "bzImage"

    @property
    def init(self) -> Path:
        return self.dir / "init"

    @property
    def nsm_ko(self) -> Path:
        return self.dir / "nsm.ko"

    @property
    def cmdline(self) -> str:
        # nitro-cli trims the file; so does the EIF's cmdline section.
        return (self.dir / "cmdline").read_text().strip()


def blobs_target() -> Path:
    """Where `make blobs` puts the dev blobs: $NITROCONV_BLOBS_DIR, else <state dir>/blobs."""
    if os.environ.get("NITROCONV_BLOBS_DIR"):
        return Path(os.environ["NITROCONV_BLOBS_DIR"])
    state = os.environ.get("NITROCONV_STATE_DIR")
    return (Path(state) if state else REPO / ".state") / "blobs"


def build_dev_blobs(target: Path, *targets: str) -> DevBlobs:
    """Run the recipe (a no-op when the blobs are current); it refuses a dir of blobs it did not build."""
    subprocess.run(["make", "-s", "-C", str(BLOBS_RECIPE), f"BLOBS={target}", *targets], check=True)
    return DevBlobs(target)


@pytest.fixture(scope="session")
def dev_blobs() -> DevBlobs:
    return build_dev_blobs(blobs_target())


def make_busybox_rootfs(dest: Path, busybox: Path = Path("/bin/busybox")) -> Path:
    """An image tree at `dest`: Debian's static busybox as /bin/busybox and a symlink per applet.

    Applets sit where busybox puts them (`--list-full`: bin/sh, usr/bin/env, sbin/…), each a symlink
    to /bin/busybox, so the tree works as a root filesystem with the usual PATH.
    """
    dest.mkdir(parents=True)
    (dest / "bin").mkdir()
    shutil.copyfile(busybox, dest / "bin" / "busybox")
    (dest / "bin" / "busybox").chmod(0o755)
    applets = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True, check=True).stdout
    for rel in applets.split():
        link = dest / rel
        if link.is_symlink() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    for name in ("etc", "root"):
        (dest / name).mkdir(exist_ok=True)
    return dest


@pytest.fixture(scope="session")
def busybox_rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One busybox image tree per session; copy it before changing it."""
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


def _lines(items: Sequence[str]) -> bytes:
    return "".join(f"{item}\n" for item in items).encode()


def stage_app_ramdisk(dest: Path, rootfs: Path, *, cmd: Sequence[str] | None,
                      env: Sequence[str] | None) -> Path:
    """The app ramdisk tree of EIF.md §5.1: `rootfs/…` (a copy of `rootfs` plus the init's mount points),
    and `cmd`/`env` at the top, one item per line; None leaves the file out."""
    shutil.copytree(rootfs, dest / "rootfs", symlinks=True)
    for name in ROOTFS_DIRS:
        (dest / "rootfs" / name).mkdir(exist_ok=True)
    if cmd is not None:
        (dest / "cmd").write_bytes(_lines(cmd))
    if env is not None:
        (dest / "env").write_bytes(_lines(env))
    return dest


def stage_bootstrap_ramdisk(dest: Path, blobs: DevBlobs) -> Path:
    """The bootstrap ramdisk tree of EIF.md §5.1: `dev/`, `init`, `nsm.ko`."""
    (dest / "dev").mkdir(parents=True)
    for blob in (blobs.init, blobs.nsm_ko):
        shutil.copyfile(blob, dest / blob.name)
        (dest / blob.name).chmod(0o755)
    return dest


def gnu_cpio(tree: Path) -> bytes:
    """A newc archive of `tree` written by GNU cpio (independent of ours), names sorted, owned by root."""
    names = sorted(str(p.relative_to(tree)) for p in tree.rglob("*"))
    done = subprocess.run(["cpio", "-o", "-H", "newc", "-R", "0:0", "--quiet"], cwd=tree, check=True,
                          input="".join(f"{n}\n" for n in names).encode(), capture_output=True)
    return done.stdout


def tree_from_dir(root: Path) -> Tree:
    """An image tree (common.filetree) holding what `root` holds, owned by root, as the build step takes it."""
    tree = Tree()
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        name = str(path.relative_to(root)).encode()
        perm = stat.S_IMODE(st.st_mode)
        if stat.S_ISLNK(st.st_mode):
            tree.add_symlink(name, os.readlink(path).encode())
        elif stat.S_ISDIR(st.st_mode):
            tree.add_dir(name, mode=perm)
        else:
            tree.add_file(name, BytesContent(path.read_bytes()), mode=perm)
    return tree


RUNTIME_RECIPE = REPO / "deploy" / "runtime"


def runtime_target() -> Path:
    """Where `make runtime` puts the shim and launcher: $NITROCONV_RUNTIME_DIR, else <state dir>/runtime."""
    if os.environ.get("NITROCONV_RUNTIME_DIR"):
        return Path(os.environ["NITROCONV_RUNTIME_DIR"])
    state = os.environ.get("NITROCONV_STATE_DIR")
    return (Path(state) if state else REPO / ".state") / "runtime"


def build_shim(target: Path, *, extra_cflags: str = "", name: str = "shim") -> Path:
    """The exec shim in `target`, built by deploy/runtime with everything else a conversion needs from
    there (the launcher too; a no-op when current). `extra_cflags` builds a variant of the shim alone
    (e.g. the test build) under another name."""
    if not extra_cflags:
        subprocess.run(["make", "-s", "-C", str(RUNTIME_RECIPE), f"RUNTIME={target}"], check=True)
        return target / "shim"
    target.mkdir(parents=True, exist_ok=True)
    src = REPO / "worker" / "runtime"
    subprocess.run(["cc", "-std=gnu11", "-Os", "-Wall", "-Wextra", "-Werror", "-static", *extra_cflags.split(),
                    "-o", str(target / name), str(src / "shim.c")], check=True)
    return target / name


@pytest.fixture(scope="session")
def runtime_dir() -> Path:
    target = runtime_target()
    build_shim(target)
    # The launcher too: convert() puts it into every output image as /enclave/run.
    subprocess.run(["make", "-s", "-C", str(RUNTIME_RECIPE), f"RUNTIME={target}", f"{target}/run"], check=True)
    return target
