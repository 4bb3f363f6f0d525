"""The two EIF ramdisks of EIF.md §5.1: the bootstrap ramdisk from the blobs and the app ramdisk from an image tree."""
from __future__ import annotations

import stat
from collections.abc import Iterator, Mapping
from pathlib import Path

from common.enclave.cpio import CpioArchive, CpioEntry
from common.enclave.launch import LaunchSpec, cmd_file, env_file
from common.enclave.shim import SHIM_DIR, SHIM_NAME
from common.image.filetree import Node, NodeKind, SpoolContent, Tree

# Entries we create (not taken from the image) get linuxkit's fixed time, as nitro-cli's ramdisks do.
GENERATED_MTIME = 1492533000
# The mount points the init needs in the new root, created by nitro-cli's customer yaml (EIF.md §5.1).
ROOTFS_DIRS = (b"dev", b"proc", b"run", b"sys", b"tmp", b"var")



def _generated_dir(name: bytes) -> CpioEntry:
    return CpioEntry(name=name, mode=stat.S_IFDIR | 0o755, mtime=GENERATED_MTIME)


def _generated_file(name: bytes, data: bytes, perm: int) -> CpioEntry:
    return CpioEntry(name=name, mode=stat.S_IFREG | perm, mtime=GENERATED_MTIME, size=len(data), data=data)


def _blob_file(name: bytes, path: Path) -> CpioEntry:
    return CpioEntry(
        name=name,
        mode=stat.S_IFREG | 0o755,
        mtime=GENERATED_MTIME,
        size=path.stat().st_size,
        data=lambda: path.open("rb"),
    )


def bootstrap_archive(blobs_dir: Path) -> CpioArchive:
    """Ramdisk 0: `dev/`, `init` and `nsm.ko` from the blobs dir (PCR1 depends only on these and the kernel)."""
    return CpioArchive(
        [
            _generated_dir(b"dev"),
            _blob_file(b"init", blobs_dir / "init"),
            _blob_file(b"nsm.ko", blobs_dir / "nsm.ko"),
        ]
    )


def _node_entry(name: bytes, node: Node) -> CpioEntry:
    # One constructor call per entry (no dataclasses.replace): this runs once per file of the image.
    kind = node.kind
    if kind is NodeKind.FILE:
        content = node.content
        size = content.size if content is not None else 0
        # Identity of the Node is the inode: several paths to one Node are hard links (data stored once).
        opener = content.open if content is not None and size else None
        return CpioEntry(name=name, mode=node.st_mode, uid=node.uid, gid=node.gid, mtime=node.mtime, size=size,
                         data=opener, link_key=id(node),
                         crc=content.crc if isinstance(content, SpoolContent) else None)
    if kind is NodeKind.SYMLINK:
        return CpioEntry(name=name, mode=node.st_mode, uid=node.uid, gid=node.gid, mtime=node.mtime,
                         size=len(node.target), data=node.target)
    if kind in (NodeKind.CHAR, NodeKind.BLOCK):
        major, minor = node.rdev
        return CpioEntry(name=name, mode=node.st_mode, uid=node.uid, gid=node.gid, mtime=node.mtime,
                         rdevmajor=major, rdevminor=minor)
    return CpioEntry(name=name, mode=node.st_mode, uid=node.uid, gid=node.gid, mtime=node.mtime)


def _converters_own(path: bytes) -> bool:
    return path == SHIM_DIR.encode() or path.startswith(SHIM_DIR.encode() + b"/")


def _app_entries(tree: Tree, spec: LaunchSpec, shim: Path | None,
                 extras: Mapping[str, bytes | Path]) -> Iterator[CpioEntry]:
    root = tree.root
    yield CpioEntry(name=b"rootfs", mode=stat.S_IFDIR | (root.mode & 0o7777), uid=root.uid, gid=root.gid,
                    mtime=root.mtime)
    seen_top: set[bytes] = set()
    for path, node in tree.iter_sorted():
        # The image's own /.nitroconv (say, a symlink planted where the shim goes) must not shadow ours.
        if shim is not None and _converters_own(path):
            continue
        if b"/" not in path:
            seen_top.add(path)
        yield _node_entry(b"rootfs/" + path, node)
    for name in ROOTFS_DIRS:
        if name not in seen_top:
            yield _generated_dir(b"rootfs/" + name)
    if shim is not None:
        yield _generated_dir(b"rootfs/" + SHIM_DIR.encode())
        files: dict[str, bytes | Path] = {**extras, SHIM_NAME: shim}
        for file_name in sorted(files):
            entry = f"rootfs/{SHIM_DIR}/{file_name}".encode()
            content = files[file_name]
            # Programs (given as paths) are executable; generated configuration is read-only data.
            yield (_blob_file(entry, content) if isinstance(content, Path)
                   else _generated_file(entry, content, 0o644))
    yield _generated_file(b"cmd", cmd_file(spec), 0o644)
    yield _generated_file(b"env", env_file(spec), 0o644)


def app_archive(tree: Tree, spec: LaunchSpec, *, shim: Path | None = None,
                extras: Mapping[str, bytes | Path] | None = None) -> CpioArchive:
    """Ramdisk 1: the image tree under `rootfs/`, the init's mount points, and `cmd`/`env` at the archive root.

    With `shim`, the exec shim goes in as `rootfs/.nitroconv/shim` (0755, root) in place of anything
    the image has at `/.nitroconv`; `spec` then is expected to start it (common.enclave.shim.through_shim).
    `extras` go beside it in `/.nitroconv` (a path: a program, 0755; bytes: a 0644 file), all of it measured.
    """
    if extras and shim is None:
        raise ValueError("the converter's /.nitroconv files need the shim")
    return CpioArchive(_app_entries(tree, spec, shim, dict(extras or {})))
