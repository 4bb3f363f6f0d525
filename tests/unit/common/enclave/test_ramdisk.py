"""The two ramdisk layouts of EIF.md §5.1 (common/enclave/ramdisk.py), read back with the strict cpio reader."""
from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from common.enclave.cpio import FIRST_INODE, CpioHeader, iter_cpio
from common.enclave.launch import LaunchSpec
from common.enclave.ramdisk import GENERATED_MTIME, ROOTFS_DIRS, app_archive, bootstrap_archive
from common.image.filetree import BytesContent, Node, NodeKind, SpoolContent, Tree

SPEC = LaunchSpec(argv=("/bin/sh", "-c", "echo hi there"), env=("PATH=/usr/bin:/bin", "GREETING=a b=c"),
                  workdir="/srv", user="app")
IMAGE_MTIME = 1_700_000_000


def read(archive) -> list[tuple[CpioHeader, bytes]]:
    buf = io.BytesIO()
    assert archive.write_to(buf) == archive.size
    data = buf.getvalue()
    assert len(data) == archive.size and len(data) % 512 == 0
    return list(iter_cpio(io.BytesIO(data)))


def by_name(members: list[tuple[CpioHeader, bytes]]) -> dict[str, tuple[CpioHeader, bytes]]:
    return {h.name.decode(): (h, d) for h, d in members}


def image_tree() -> Tree:
    tree = Tree()
    tree.add_dir(b"bin", mtime=IMAGE_MTIME)
    tree.add_file(b"bin/busybox", BytesContent(b"\x7fELF pretend"), mode=0o755, mtime=IMAGE_MTIME)
    tree.add_symlink(b"bin/sh", b"/bin/busybox", mtime=IMAGE_MTIME)
    tree.add_dir(b"etc", mtime=IMAGE_MTIME)
    tree.add_file(b"etc/passwd", BytesContent(b"root:x:0:0::/root:/bin/sh\n"), mtime=IMAGE_MTIME)
    tree.add_dir(b"home/app", mode=0o750, uid=1000, gid=1001, mtime=IMAGE_MTIME + 1)
    tree.add_file(b"home/app/empty", BytesContent(b""), mode=0o600, uid=1000, gid=1001, mtime=IMAGE_MTIME + 2)
    tree.add_dir(b"tmp", mode=0o1777, mtime=IMAGE_MTIME)  # one of the six, present in the image
    return tree


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    (tmp_path / "init").write_bytes(b"\x7fELF init " * 100)
    (tmp_path / "nsm.ko").write_bytes(b"")
    (tmp_path / "bzImage").write_bytes(b"not part of a ramdisk")
    return tmp_path


def test_ramdisk_bootstrap_archive_holds_dev_init_nsm(blobs: Path) -> None:
    members = read(bootstrap_archive(blobs))
    assert [h.name for h, _ in members] == [b"dev", b"init", b"nsm.ko"]
    (dev, _), (init, init_data), (nsm, nsm_data) = members
    assert dev.mode == stat.S_IFDIR | 0o755 and dev.nlink == 2
    assert init.mode == nsm.mode == stat.S_IFREG | 0o755
    assert init_data == (blobs / "init").read_bytes() and nsm_data == b""
    for h, _ in members:
        assert (h.uid, h.gid, h.mtime) == (0, 0, GENERATED_MTIME)
    assert [h.ino for h, _ in members] == [FIRST_INODE, FIRST_INODE + 1, FIRST_INODE + 2]


def test_ramdisk_app_archive_layout(tmp_path: Path) -> None:
    members = read(app_archive(image_tree(), SPEC))
    names = [h.name.decode() for h, _ in members]
    assert names == [
        "cmd", "env", "rootfs", "rootfs/bin", "rootfs/bin/busybox", "rootfs/bin/sh", "rootfs/dev", "rootfs/etc",
        "rootfs/etc/passwd", "rootfs/home", "rootfs/home/app", "rootfs/home/app/empty", "rootfs/proc", "rootfs/run",
        "rootfs/sys", "rootfs/tmp", "rootfs/var",
    ]
    got = by_name(members)

    cmd, cmd_data = got["cmd"]
    env, env_data = got["env"]
    assert cmd_data == b"/bin/sh\n-c\necho hi there\n"
    assert env_data == b"PATH=/usr/bin:/bin\nGREETING=a b=c\n"
    for h in (cmd, env):
        assert (h.mode, h.uid, h.gid, h.mtime) == (stat.S_IFREG | 0o644, 0, 0, GENERATED_MTIME)

    # The image's entries keep their own attributes.
    busybox, data = got["rootfs/bin/busybox"]
    assert (busybox.mode, busybox.mtime, data) == (stat.S_IFREG | 0o755, IMAGE_MTIME, b"\x7fELF pretend")
    sh, target = got["rootfs/bin/sh"]
    assert (sh.mode, target, sh.filesize) == (stat.S_IFLNK | 0o777, b"/bin/busybox", len(b"/bin/busybox"))
    home, _ = got["rootfs/home/app"]
    assert (home.mode, home.uid, home.gid, home.mtime) == (stat.S_IFDIR | 0o750, 1000, 1001, IMAGE_MTIME + 1)
    empty, data = got["rootfs/home/app/empty"]
    assert (empty.mode, empty.uid, empty.gid, empty.filesize, data) == (stat.S_IFREG | 0o600, 1000, 1001, 0, b"")
    implicit, _ = got["rootfs/home"]  # a parent no layer listed: the tree's default
    assert implicit.mode == stat.S_IFDIR | 0o755
    # `tmp` came with the image: it is not replaced by the generated 0755 one.
    tmp, _ = got["rootfs/tmp"]
    assert (tmp.mode, tmp.mtime) == (stat.S_IFDIR | 0o1777, IMAGE_MTIME)
    for name in ("dev", "proc", "run", "sys", "var"):
        h, _ = got[f"rootfs/{name}"]
        assert (h.mode, h.uid, h.gid, h.mtime, h.nlink) == (stat.S_IFDIR | 0o755, 0, 0, GENERATED_MTIME, 2)


def test_ramdisk_app_archive_root_takes_the_tree_root_attributes() -> None:
    tree = image_tree()
    tree.root.mode, tree.root.mtime = 0o700, IMAGE_MTIME
    root, _ = by_name(read(app_archive(tree, SPEC)))["rootfs"]
    assert (root.mode, root.uid, root.gid, root.mtime) == (stat.S_IFDIR | 0o700, 0, 0, IMAGE_MTIME)


@pytest.mark.parametrize("name", [n.decode() for n in ROOTFS_DIRS])
def test_ramdisk_mount_dir_present_in_image_is_not_added_again(name: str) -> None:
    """Whatever the image has at one of the six names (here a symlink) stays, and there is no second entry."""
    tree = Tree()
    tree.add_symlink(name.encode(), b"/elsewhere", mtime=IMAGE_MTIME)
    members = read(app_archive(tree, SPEC))
    names = [h.name.decode() for h, _ in members]
    assert names.count(f"rootfs/{name}") == 1
    h, target = by_name(members)[f"rootfs/{name}"]
    assert (stat.S_IFMT(h.mode), target) == (stat.S_IFLNK, b"/elsewhere")
    assert sorted(n for n in names if n.count("/") == 1) == [f"rootfs/{n.decode()}" for n in ROOTFS_DIRS]


def test_ramdisk_hard_links_share_one_inode_and_store_data_once(tmp_path: Path) -> None:
    spool = tmp_path / "layer.spool"
    spool.write_bytes(b"xx" + b"shared content\n" + b"yy")
    tree = Tree()
    tree.add_file(b"data/a", SpoolContent(spool, 2, 15), mode=0o640, uid=7, gid=8, mtime=IMAGE_MTIME)
    tree.add_hardlink(b"data/b", b"data/a")
    tree.add_hardlink(b"other/c", b"data/a")
    tree.add_file(b"data/single", BytesContent(b"alone"), mtime=IMAGE_MTIME)
    got = by_name(read(app_archive(tree, SPEC)))
    links = [got[n] for n in ("rootfs/data/a", "rootfs/data/b", "rootfs/other/c")]
    assert len({h.ino for h, _ in links}) == 1
    assert all(h.nlink == 3 and h.mode == stat.S_IFREG | 0o640 and (h.uid, h.gid) == (7, 8) for h, _ in links)
    # The first name in archive order carries the bytes; the kernel links the later ones to that inode.
    assert [(h.filesize, d) for h, d in links] == [(15, b"shared content\n"), (0, b""), (0, b"")]
    single, _ = got["rootfs/data/single"]
    assert single.nlink == 1 and single.ino != links[0][0].ino


def test_ramdisk_device_nodes_and_fifos_are_kept() -> None:
    tree = Tree()
    tree.add_node(b"dev/null", Node.device(NodeKind.CHAR, (1, 3), mode=0o666, mtime=IMAGE_MTIME))
    tree.add_node(b"dev/sda", Node.device(NodeKind.BLOCK, (8, 0), mode=0o660, gid=6, mtime=IMAGE_MTIME))
    tree.add_node(b"run/app.fifo", Node.fifo(mode=0o600, uid=1000, mtime=IMAGE_MTIME))
    got = by_name(read(app_archive(tree, SPEC)))
    null, _ = got["rootfs/dev/null"]
    assert (null.mode, null.rdevmajor, null.rdevminor, null.filesize) == (stat.S_IFCHR | 0o666, 1, 3, 0)
    sda, _ = got["rootfs/dev/sda"]
    assert (sda.mode, sda.gid, sda.rdevmajor, sda.rdevminor) == (stat.S_IFBLK | 0o660, 6, 8, 0)
    fifo, _ = got["rootfs/run/app.fifo"]
    assert (fifo.mode, fifo.uid, fifo.filesize) == (stat.S_IFIFO | 0o600, 1000, 0)
    # `dev` and `run` exist in the image (as implicit parents) and are not generated a second time.
    dev, _ = got["rootfs/dev"]
    assert dev.mtime == 0


def _tree_in_order(order: list[int]) -> Tree:
    steps = [
        lambda t: t.add_file(b"b/file", BytesContent(b"bee"), mtime=IMAGE_MTIME),
        lambda t: t.add_file(b"a-b", BytesContent(b"dash"), mtime=IMAGE_MTIME),
        lambda t: t.add_dir(b"a", mode=0o711, mtime=IMAGE_MTIME),
        lambda t: t.add_file(b"a/c", BytesContent(b"sea"), uid=3, mtime=IMAGE_MTIME),
        lambda t: t.add_symlink(b"z", b"a/c", mtime=IMAGE_MTIME),
    ]
    tree = Tree()
    for i in order:
        steps[i](tree)
    tree.add_hardlink(b"a/d", b"a/c")
    return tree


def _bytes(archive) -> bytes:
    buf = io.BytesIO()
    archive.write_to(buf)
    return buf.getvalue()


def test_ramdisk_app_archive_is_deterministic() -> None:
    one = _bytes(app_archive(_tree_in_order([0, 1, 2, 3, 4]), SPEC))
    assert one == _bytes(app_archive(_tree_in_order([4, 3, 2, 1, 0]), SPEC))
    assert one == _bytes(app_archive(_tree_in_order([2, 4, 0, 3, 1]), SPEC))
    # Byte order of whole paths: `a`, `a-b`, `a/c` (a per-directory walk would put `a/…` before `a-b`).
    names = [h.name for h, _ in iter_cpio(io.BytesIO(one))]
    assert names.index(b"rootfs/a-b") < names.index(b"rootfs/a/c")
    # And the bytes do depend on what is measured.
    other = LaunchSpec(SPEC.argv, (*SPEC.env, "X=1"), SPEC.workdir, SPEC.user)
    assert _bytes(app_archive(_tree_in_order([0, 1, 2, 3, 4]), other)) != one
