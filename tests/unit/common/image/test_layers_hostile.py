"""Hostile and malformed layers against the layer applier (common/image/layers.py): RELIABILITY.md §C, items 25–53.

Every test runs in a sandbox whose teardown checks that the host probe directory (which hostile
names and links point at by absolute path) is byte-for-byte untouched, that nothing appeared beside
it but the scratch dir, and that the scratch dir holds only private regular spool files.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import stat
import tarfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import pytest

from common.errors import (
    EntryCountExceeded,
    InvalidLayer,
    LimitExceeded,
    NameTooLong,
    PermanentError,
    SymlinkLoop,
    TotalBytesExceeded,
)
from common.image.filetree import Node, NodeKind, Tree
from common.image.layers import ApplyState, Limits, apply_layer, apply_layers
from tests.layertar import END, LayerTar, header_block, pad, pax_record

# --- sandbox ---------------------------------------------------------------------------------------


def _snapshot(root: Path) -> dict[str, tuple[int, int, bytes]]:
    out: dict[str, tuple[int, int, bytes]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            st = p.lstat()
            if stat.S_ISLNK(st.st_mode):
                body = os.readlink(p).encode()
            elif stat.S_ISREG(st.st_mode):
                body = p.read_bytes()
            else:
                body = b""
            out[str(p.relative_to(root))] = (st.st_mode, st.st_mtime_ns, body)
    return out


@dataclass
class Sandbox:
    base: Path
    host: Path
    scratch: Path
    tree: Tree = field(default_factory=Tree)
    state: ApplyState = field(default_factory=ApplyState)
    limits: Limits = field(default_factory=Limits)

    @property
    def hostb(self) -> bytes:
        """The probe dir's absolute host path, as a hostile layer would name it."""
        return str(self.host).encode()

    def in_tree(self, host_path: bytes) -> bytes:
        """Where an absolute host path lands in the tree: the same path, under the tree root."""
        return host_path.lstrip(b"/")

    def apply(self, *layers: LayerTar | bytes | BinaryIO, limits: Limits | None = None) -> Tree:
        for layer in layers:
            stream = layer.stream() if isinstance(layer, LayerTar) else (
                io.BytesIO(layer) if isinstance(layer, bytes) else layer)
            apply_layer(self.tree, stream, spool_dir=self.scratch, limits=limits or self.limits, state=self.state)
        return self.tree

    def node(self, path: bytes, *, follow: bool = False) -> Node:
        node = self.tree.lookup(path, follow=follow)
        assert node is not None, f"{path!r} missing from the tree"
        return node

    def data(self, path: bytes) -> bytes:
        node = self.node(path, follow=True)
        assert node.kind is NodeKind.FILE and node.content is not None
        with node.content.open() as f:
            return f.read()

    def absent(self, path: bytes) -> bool:
        return self.tree.lookup(path, follow=False) is None

    def paths(self) -> list[bytes]:
        return [p for p, _ in self.tree.iter_sorted()]


def _assert_private_scratch(scratch: Path) -> None:
    if not scratch.exists():
        return
    st = scratch.lstat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o700
    for entry in scratch.iterdir():
        st = entry.lstat()
        assert stat.S_ISREG(st.st_mode), f"{entry} is not a regular file"
        assert stat.S_IMODE(st.st_mode) == 0o600, f"{entry} has mode {oct(st.st_mode)}"


@pytest.fixture
def sb(tmp_path: Path) -> Iterator[Sandbox]:
    host = tmp_path / "host"
    (host / "etc").mkdir(parents=True)
    (host / "etc" / "passwd").write_bytes(b"host-passwd")
    (host / "etc" / "whitedout").write_bytes(b"host-whitedout")
    (host / "tmp").mkdir()
    (host / "tmp" / "y").write_bytes(b"host-y")
    (host / "victim" / ".ssh").mkdir(parents=True)
    (host / "victim" / ".ssh" / "authorized_keys").write_bytes(b"host-keys")
    (host / "perm400").write_bytes(b"...")
    (host / "perm400").chmod(0o400)
    (host / "also-exists-outside-root").write_bytes(b"...")
    (host / "also-exists-outside-root").chmod(0o640)
    before = _snapshot(host)
    sandbox = Sandbox(base=tmp_path, host=host, scratch=tmp_path / "scratch")
    yield sandbox
    assert _snapshot(host) == before, "the host probe directory changed"
    assert {p.name for p in tmp_path.iterdir()} <= {"host", "scratch"}
    _assert_private_scratch(sandbox.scratch)


# --- 25–26: entry names ----------------------------------------------------------------------------


def test_apply_dotdot_entry_is_clamped_inside_root(sb: Sandbox) -> None:
    """Item 25: `../../../../<host>/pwn`, `/../x` and `/./.././..` prefixes never leave the tree."""
    unique = f"pwn-{uuid.uuid4().hex}"
    sb.apply(LayerTar()
             .file(b"../../../../../../.." + sb.hostb + b"/pwn", b"escaped?")
             .file("../../../../tmp/" + unique, b"escaped?")
             .file("/../x", b"x")
             .file("/./.././../y", b"y"))
    assert sb.data(sb.in_tree(sb.hostb) + b"/pwn") == b"escaped?"
    assert sb.data(b"tmp/" + unique.encode()) == b"escaped?"
    assert sb.data(b"x") == b"x" and sb.data(b"y") == b"y"
    assert not Path("/tmp", unique).exists()


def test_apply_absolute_entry_is_root_relative(sb: Sandbox) -> None:
    """Item 26: `/etc/shadow` is the tree's `etc/shadow` (leading `/` stripped)."""
    sb.apply(LayerTar().file("/etc/shadow", b"image-shadow", mode=0o640)
             .file(sb.hostb + b"/etc/passwd", b"image-passwd"))
    assert sb.data(b"etc/shadow") == b"image-shadow"
    assert sb.node(b"etc/shadow").mode == 0o640
    assert sb.data(sb.in_tree(sb.hostb) + b"/etc/passwd") == b"image-passwd"


# --- 27–30: writes through symlinks ------------------------------------------------------------------


@pytest.mark.parametrize("target", ["/etc", "host"])
def test_apply_write_through_absolute_symlink_lands_in_root(sb: Sandbox, target: str) -> None:
    """Item 27: `localetc -> /etc` (or -> the host probe's etc), then `localetc/unbroken`."""
    link = b"/etc" if target == "/etc" else sb.hostb + b"/etc"
    sb.apply(LayerTar().symlink("localetc", link).file("localetc/unbroken", b"image"))
    assert sb.data(link.lstrip(b"/") + b"/unbroken") == b"image"
    assert sb.node(b"localetc").target == link  # stored verbatim
    assert not (sb.host / "etc" / "unbroken").exists()


def test_apply_relative_symlink_climbing_past_root_is_clamped_not_rejected(sb: Sandbox) -> None:
    """Item 28: `../../../../../../../etc` resolves inside the root (real images, e.g. Corretto cacerts)."""
    sb.apply(
        LayerTar()
        .file("etc/pki/ca-trust/cacerts", b"certs")
        .symlink("usr/lib/jvm/java/lib/security/cacerts", "../../../../../../../../../../etc/pki/ca-trust/cacerts")
        .symlink("localetc", "../../../../../../../etc")
        .file("localetc/unbroken", b"image")
    )
    assert sb.data(b"usr/lib/jvm/java/lib/security/cacerts") == b"certs"
    assert sb.data(b"etc/unbroken") == b"image"


@pytest.mark.parametrize("same_layer", [True, False])
def test_apply_two_step_symlink_then_write_is_contained(sb: Sandbox, same_layer: bool) -> None:
    """Item 29: `x -> ../../<host>/victim/.ssh`, then `x/authorized_keys`, in one layer or the next."""
    target = b"../../../../../../../../.." + sb.hostb + b"/victim/.ssh"
    first = LayerTar().symlink("x", target)
    if same_layer:
        sb.apply(first.file("x/authorized_keys", b"attacker-key"))
    else:
        sb.apply(first, LayerTar().file("x/authorized_keys", b"attacker-key"))
    assert sb.data(sb.in_tree(sb.hostb) + b"/victim/.ssh/authorized_keys") == b"attacker-key"
    assert (sb.host / "victim" / ".ssh" / "authorized_keys").read_bytes() == b"host-keys"


def test_apply_cross_layer_symlinked_ancestor_write_delete_link_stay_in_root(sb: Sandbox) -> None:
    """Item 30: layer 1 `etc -> <host>/tmp`; layer 2 writes, deletes and hard-links under `etc/`."""
    probe_tmp = sb.hostb + b"/tmp"
    mirror = sb.in_tree(probe_tmp)
    sb.apply(
        LayerTar().symlink("etc", probe_tmp).file(probe_tmp + b"/y", b"image-y"),
        LayerTar().file("etc/x", b"image-x").whiteout("etc", "y").link("etc/z", "etc/x"),
    )
    assert sb.data(mirror + b"/x") == b"image-x"
    assert sb.absent(mirror + b"/y")
    assert sb.node(mirror + b"/z") is sb.node(mirror + b"/x")
    assert sb.node(b"etc").kind is NodeKind.SYMLINK
    assert sorted(os.listdir(sb.host / "tmp")) == ["y"]


# --- 31–33: hard links ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "linkname",
    ["../../../../../etc/passwd", "/etc/passwd", "etc/../../../etc/passwd", "sym/passwd", "deep/up/etc/passwd"],
)
def test_apply_hardlink_outside_target_resolves_in_root(sb: Sandbox, linkname: str) -> None:
    """Item 31: hard link targets climbing out, absolute, or through a symlinked dir resolve in-root."""
    sb.apply(
        LayerTar().file("etc/passwd", b"image-passwd").symlink("sym", "/etc").symlink("deep/up", "../../.."),
        LayerTar().link("pw", linkname),
    )
    assert sb.node(b"pw") is sb.node(b"etc/passwd")
    assert sb.data(b"pw") == b"image-passwd"


def test_apply_hardlink_to_host_path_never_links_a_host_inode(sb: Sandbox) -> None:
    """Item 31: a link naming the host's absolute path finds only the tree's copy of that path."""
    host_passwd = sb.hostb + b"/etc/passwd"
    with pytest.raises(InvalidLayer) as info:
        sb.apply(LayerTar().link("pw", host_passwd))
    assert info.value.details["reason"] == "hardlink_target_missing"
    sb.tree, sb.state = Tree(), ApplyState()
    sb.apply(LayerTar().file(host_passwd, b"image-copy").link("pw", host_passwd))
    assert sb.data(b"pw") == b"image-copy"


def test_apply_hardlink_to_symlink_then_chmod_leaves_host_mode(sb: Sandbox) -> None:
    """Item 32 (containerd HardlinkSymlinkChmod): symlink to a host file, hard link to it, re-chmod."""
    perm400 = sb.hostb + b"/perm400"
    outside = sb.hostb + b"/also-exists-outside-root"
    sb.apply(LayerTar().symlink(outside, perm400).link("sketchylink", outside))
    link = sb.node(b"sketchylink")
    assert link is sb.node(sb.in_tree(outside)) and link.kind is NodeKind.SYMLINK and link.target == perm400
    # "chmod": later entries re-list both names with other modes; only tree metadata may change.
    sb.apply(LayerTar().symlink(outside, perm400, mode=0o700).link("sketchylink", outside, mode=0o777))
    assert (sb.host / "perm400").stat().st_mode & 0o7777 == 0o400
    assert (sb.host / "also-exists-outside-root").stat().st_mode & 0o7777 == 0o640
    assert sb.node(b"sketchylink") is sb.node(sb.in_tree(outside))
    assert sb.node(b"sketchylink").mode == 0o700  # a link entry's own mode is not applied (GNU tar)


def test_apply_hardlink_to_symlink_links_the_symlink_itself(sb: Sandbox) -> None:
    """Item 33 (containerd HardlinkSymlinkBeforeCreateTarget): link to a dangling symlink is that symlink."""
    sb.apply(LayerTar().dir("etc", mode=0o770).symlink("localpasswd", "/etc/passwd")
             .link("localpasswd-dup", "localpasswd").file("/etc/passwd", b"after"))
    dup = sb.node(b"localpasswd-dup")
    assert dup is sb.node(b"localpasswd") and dup.kind is NodeKind.SYMLINK
    assert sb.data(b"localpasswd-dup") == b"after"


@pytest.mark.parametrize(
    "build, reason",
    [
        (lambda t: t.dir("d").link("l", "d"), "hardlink_to_directory"),
        (lambda t: t.link("l", "."), "hardlink_to_directory"),
        (lambda t: t.link("l", "../"), "hardlink_to_directory"),
        (lambda t: t.link("l", "not-yet").file("not-yet", b"late"), "hardlink_target_missing"),
        (lambda t: t.file("f", b"x").link("f", "f"), "hardlink_to_itself"),
        (lambda t: t.file("f", b"x").link("f", "/./f"), "hardlink_to_itself"),
        (lambda t: t.file("f", b"x").link("l", "f/x"), "hardlink_target_missing"),
    ],
)
def test_apply_hardlink_to_directory_missing_or_self_is_invalid(sb: Sandbox, build, reason: str) -> None:
    """Item 33: hard links to a directory, to a later entry, or to themselves are invalid layers."""
    with pytest.raises(InvalidLayer) as info:
        sb.apply(build(LayerTar()))
    assert info.value.code == "invalid_layer"
    assert info.value.details["reason"] == reason


def test_apply_hardlink_across_layers_is_the_same_node_and_survives_target_replacement(sb: Sandbox) -> None:
    """Items 31/33: a link may name a lower layer's file; replacing the original later unlinks only it."""
    sb.apply(LayerTar().file("bin/busybox", b"v1", mode=0o755), LayerTar().link("bin/sh", "bin/busybox"))
    assert sb.node(b"bin/sh") is sb.node(b"bin/busybox")
    sb.apply(LayerTar().file("bin/busybox", b"v2"))
    assert sb.data(b"bin/busybox") == b"v2" and sb.data(b"bin/sh") == b"v1"


# --- 34–36: names that mean the root, duplicates, type changes -------------------------------------------


@pytest.mark.parametrize("name", [".", "./", "/", "..", "../..", "a/..", "./."])
@pytest.mark.parametrize("kind", ["symlink", "file", "dir", "link", "fifo"])
def test_apply_entry_naming_the_root_never_replaces_it(sb: Sandbox, name: str, kind: str) -> None:
    """Item 34: `.`, `/`, `..` (and spellings of them) never replace or restyle the root."""
    keep = LayerTar().file("keep", b"k")
    layer = LayerTar()
    {"symlink": lambda: layer.symlink(name, "/tmp"), "file": lambda: layer.file(name, b"x", mode=0o777),
     "dir": lambda: layer.dir(name, mode=0o777, uid=1000), "link": lambda: layer.link(name, "keep"),
     "fifo": lambda: layer.fifo(name)}[kind]()
    sb.apply(keep, layer)
    root = sb.tree.root
    assert root.kind is NodeKind.DIR and (root.mode, root.uid) == (0o755, 0)
    assert sb.paths() == [b"keep"]
    assert sb.state.layers[-1].ignored == 1


def test_apply_entry_with_empty_name_is_ignored(sb: Sandbox) -> None:
    """Item 34: an empty name (hand-made header) is ignored too."""
    layer = header_block(b"", kind=tarfile.SYMTYPE, extra={157: b"/etc"}) + END
    sb.apply(LayerTar().file("keep", b"k"), layer)
    assert sb.tree.root.kind is NodeKind.DIR and sb.paths() == [b"keep"]


def test_apply_duplicate_paths_with_type_change_follow_the_last_entry(sb: Sandbox) -> None:
    """Item 35 (containerd SymlinkOverridePath): file foo/tmp/x, foo -> /, foo/tmp/x, dir foo."""
    sb.apply(LayerTar().file("foo/tmp/x", b"first").symlink("foo", "/").file("foo/tmp/x", b"second").dir("foo"))
    assert sb.node(b"foo").kind is NodeKind.DIR
    assert sb.node(b"foo").children == {}
    assert sb.data(b"tmp/x") == b"second"


def test_apply_directory_over_symlink_replaces_the_symlink(sb: Sandbox) -> None:
    """Item 36 (containerd DirectoryOverrideSymlink): a dir entry unlinks the symlink, not its target."""
    sb.apply(LayerTar().dir("real").file("real/keep", b"k").symlink("link", "/real"),
             LayerTar().dir("link", mode=0o700).file("link/new", b"n"))
    assert sb.node(b"link").kind is NodeKind.DIR and sb.node(b"link").mode == 0o700
    assert sb.data(b"link/new") == b"n"
    assert sorted(sb.node(b"real").children) == [b"keep"]


def test_apply_file_over_directory_unlinks_and_recreates(sb: Sandbox) -> None:
    """Item 36: anything but dir-over-dir unlinks what was there, subtree included."""
    sb.apply(LayerTar().file("d/a", b"a").file("d/b/c", b"c"), LayerTar().file("d", b"now a file"))
    assert sb.data(b"d") == b"now a file"
    assert sb.paths() == [b"d"]


def test_apply_directory_over_directory_merges_attributes_keeps_children(sb: Sandbox) -> None:
    """Item 36: dir over dir replaces mode/owner/mtime and keeps the lower children."""
    sb.apply(LayerTar().dir("d", mode=0o700, uid=1).file("d/lower", b"l"),
             LayerTar().dir("d", mode=0o1777, uid=2, gid=3, mtime=42).file("d/upper", b"u"))
    d = sb.node(b"d")
    assert (d.mode, d.uid, d.gid, d.mtime) == (0o1777, 2, 3, 42)
    assert sorted(d.children) == [b"lower", b"upper"]


# --- 37: loops ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "build",
    [
        lambda t: t.symlink("a", "b").symlink("b", "a").file("a/x", b"x"),
        lambda t: t.symlink("bin/sh", "dash").symlink("bin/dash", "dash").file("bin/sh/x", b"x"),
        lambda t: t.symlink("l", "l/x").file("l/y", b"y"),
        lambda t: t.symlink("a", "/b/").symlink("b", "../a").whiteout("a", "x"),
        lambda t: t.symlink("a", "b").symlink("b", "a").file("f", b"f").link("l", "a/f"),
    ],
)
def test_apply_symlink_loop_fails_with_symlink_loop(sb: Sandbox, build) -> None:
    """Item 37: ELOOP while resolving a write, a whiteout or a link target is `symlink_loop`, no hang."""
    with pytest.raises(SymlinkLoop) as info:
        sb.apply(build(LayerTar()))
    assert info.value.code == "symlink_loop"
    json.dumps(info.value.details)


def test_apply_symlink_chain_longer_than_forty_hops_is_a_loop(sb: Sandbox) -> None:
    """Item 37: a 41-link chain is ELOOP like the kernel's; 40 still resolves."""
    layer = LayerTar().dir("end").symlink("l0", "end")
    for i in range(1, 42):
        layer.symlink(f"l{i}", f"l{i - 1}")
    sb.apply(layer.file("l39/ok", b"ok"))
    assert sb.data(b"end/ok") == b"ok"
    with pytest.raises(SymlinkLoop):
        sb.apply(LayerTar().file("l41/no", b"no"))


# --- 38–39: devices, FIFOs, special bits -----------------------------------------------------------------


def test_apply_device_nodes_and_fifos_are_kept_only_as_metadata(sb: Sandbox) -> None:
    """Item 38: char/block devices and FIFOs (even a FIFO at etc/passwd) are tree entries, never mknod'ed."""
    sb.apply(LayerTar().block("dev/sda", 8, 0, mode=0o660).char("dev/null", 1, 3, mode=0o666)
             .fifo("etc/passwd", mode=0o644))
    sda, null, fifo = sb.node(b"dev/sda"), sb.node(b"dev/null"), sb.node(b"etc/passwd")
    assert (sda.kind, sda.rdev, sda.st_mode) == (NodeKind.BLOCK, (8, 0), stat.S_IFBLK | 0o660)
    assert (null.kind, null.rdev, null.st_mode) == (NodeKind.CHAR, (1, 3), stat.S_IFCHR | 0o666)
    assert fifo.kind is NodeKind.FIFO and fifo.st_mode == stat.S_IFIFO | 0o644
    assert sb.state.layers[0].spool_path is None  # no file data, so not even a spool file


def test_apply_setuid_sticky_world_writable_root_owned_kept_in_tree_only(sb: Sandbox) -> None:
    """Item 39: special bits and owners are tree metadata; on disk only 0600 spool files in a 0700 dir."""
    sb.apply(LayerTar().file("bin/su", b"\x7fELF", mode=0o4755).file("bin/wall", b"\x7fELF", mode=0o2755, gid=5)
             .dir("tmp", mode=0o1777).file("etc/ww", b"w", mode=0o666, uid=1000, gid=1000))
    assert sb.node(b"bin/su").mode == 0o4755 and sb.node(b"bin/su").uid == 0
    assert (sb.node(b"bin/wall").mode, sb.node(b"bin/wall").gid) == (0o2755, 5)
    assert sb.node(b"tmp").st_mode == stat.S_IFDIR | 0o1777
    assert (sb.node(b"etc/ww").mode, sb.node(b"etc/ww").uid) == (0o666, 1000)
    spools = list(sb.scratch.iterdir())
    assert len(spools) == 1 and stat.S_IMODE(spools[0].stat().st_mode) == 0o600


def test_apply_spool_dir_holds_only_private_regular_files(sb: Sandbox) -> None:
    """Items 38/39: after a layer with every entry type, the scratch dir has one 0600 regular file per layer."""
    full = (LayerTar().file("bin/su", b"x" * 5000, mode=0o6755).char("dev/c", 1, 1).block("dev/b", 7, 0)
            .fifo("run/f").symlink("s", "/etc").link("bin/su2", "bin/su").dir("d", mode=0o7777))
    sb.apply(full, LayerTar().file("second", b"2"), LayerTar().dir("no-data"))
    spools = sorted(sb.scratch.iterdir())
    assert len(spools) == 2
    assert stat.S_IMODE(sb.scratch.stat().st_mode) == 0o700
    for spool in spools:
        st = spool.lstat()
        assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600
    assert sum(p.stat().st_size for p in spools) == 5001


# --- 40–43: limits -----------------------------------------------------------------------------------------


def _gzip_zeros_layer(size: int) -> bytes:
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.GNU_FORMAT) as tar:
        info = tarfile.TarInfo("zeros")
        info.size = size
        tar.addfile(info, io.BytesIO(bytes(size)))
    return gzip.compress(raw.getvalue(), compresslevel=9)


def test_apply_gzip_bomb_fails_with_limit_exceeded(sb: Sandbox) -> None:
    """Item 40: a small gzip inflating past the byte limit fails `limit_exceeded`, spool discarded."""
    bomb = _gzip_zeros_layer(8 << 20)
    assert len(bomb) < 64 << 10
    limits = Limits(max_total_bytes=1 << 20)
    with pytest.raises(TotalBytesExceeded) as info:
        sb.apply(gzip.GzipFile(fileobj=io.BytesIO(bomb)), limits=limits)
    err = info.value
    assert err.code == "limit_exceeded" and isinstance(err, LimitExceeded) and isinstance(err, PermanentError)
    assert err.details["limit"] == "total_bytes" and err.details["max"] == 1 << 20
    assert list(sb.scratch.iterdir()) == []


def test_apply_moderate_bombs_across_layers_hit_the_cumulative_limit(sb: Sandbox) -> None:
    """Item 40: the byte limit is over the whole image, so many moderate layers add up."""
    limits = Limits(max_total_bytes=1 << 20)
    layer = LayerTar().file("chunk", bytes(300 << 10)).bytes()
    sb.apply(layer, layer, layer, limits=limits)  # a later layer's rewrite of the same path still costs
    with pytest.raises(TotalBytesExceeded) as info:
        sb.apply(layer, limits=limits)
    assert info.value.details["limit"] == "total_bytes" and info.value.details["value"] > 1 << 20


def test_apply_declared_size_is_charged_before_reading(sb: Sandbox) -> None:
    """Item 40: a header declaring 1 TiB with no data behind it fails on the declared size, at once."""
    layer = header_block(b"huge", size=1 << 40)
    with pytest.raises(TotalBytesExceeded) as info:
        sb.apply(layer)
    assert info.value.details["measure"] == "declared"
    assert info.value.details["value"] == 1 << 40


def test_apply_trailing_junk_after_tar_end_is_read_and_charged(sb: Sandbox) -> None:
    """Items 40/51: the stream is read to its end (a digest covers trailing junk) and that counts too."""
    layer = LayerTar().file("a", b"a").bytes()
    stream = io.BytesIO(layer + bytes(64 << 10))
    apply_layer(sb.tree, stream, spool_dir=sb.scratch, limits=Limits(), state=sb.state)
    assert stream.tell() == len(layer) + (64 << 10)
    assert sb.state.layers[0].stream_bytes == len(layer) + (64 << 10)
    with pytest.raises(TotalBytesExceeded) as info:
        sb.apply(layer + bytes(2 << 20), limits=Limits(max_total_bytes=1 << 20))
    assert info.value.details["measure"] == "stream"


def _pax_sparse_10(name: str, realsize: int, blocks: list[tuple[int, bytes]]) -> bytes:
    """A GNU PAX 1.0 sparse member: the map is a decimal list at the start of the member data."""
    sparse_map = f"{len(blocks)}\n" + "".join(f"{off}\n{len(data)}\n" for off, data in blocks)
    payload = pad(sparse_map.encode()) + b"".join(data for _, data in blocks)
    info = tarfile.TarInfo(f"GNUSparseFile.0/{name}")
    info.size = len(payload)
    info.pax_headers = {"GNU.sparse.major": "1", "GNU.sparse.minor": "0", "GNU.sparse.name": name,
                        "GNU.sparse.realsize": str(realsize)}
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _gnu_old_sparse(name: bytes, realsize: int, blocks: list[tuple[int, bytes]], *, extension_blocks: int = 0) -> bytes:
    """An old-GNU 'S' member with up to four inline map entries and optional (empty) extension blocks."""
    extra = {483: b"%011o\0" % realsize}
    for i, (off, data) in enumerate(blocks):
        extra[386 + 24 * i] = b"%011o\0" % off
        extra[386 + 24 * i + 12] = b"%011o\0" % len(data)
    if extension_blocks:
        extra[482] = b"\x01"
    stored = b"".join(data for _, data in blocks)
    header = header_block(name, kind=tarfile.GNUTYPE_SPARSE, size=len(stored), extra=extra)
    ext = b""
    for i in range(extension_blocks):
        block = bytearray(512)
        block[504] = 1 if i < extension_blocks - 1 else 0
        ext += bytes(block)
    return header + ext + pad(stored) + END


def test_apply_sparse_file_is_counted_and_stored_at_its_declared_size(sb: Sandbox) -> None:
    """Item 41: sparse members (PAX 1.0 and old GNU) expand to their real size and are charged for it."""
    sb.apply(_pax_sparse_10("pax", 4096, [(1024, b"D" * 512)]),
             _gnu_old_sparse(b"gnu", 3000, [(0, b"A" * 512), (2048, b"B" * 512)]))
    assert sb.data(b"pax") == bytes(1024) + b"D" * 512 + bytes(2560)
    assert sb.data(b"gnu") == b"A" * 512 + bytes(1536) + b"B" * 512 + bytes(440)
    assert sb.state.content_bytes == 4096 + 3000


def test_apply_sparse_entry_declaring_a_huge_size_hits_the_limit(sb: Sandbox) -> None:
    """Item 41: a sparse entry declaring 1 TiB real size is charged 1 TiB, before anything is expanded."""
    with pytest.raises(TotalBytesExceeded) as info:
        sb.apply(_pax_sparse_10("huge", 1 << 40, [(0, b"x" * 512)]))
    assert info.value.details["value"] == 1 << 40
    with pytest.raises(TotalBytesExceeded):
        sb.apply(_gnu_old_sparse(b"huge2", (1 << 33) - 1, [(0, b"x" * 512)]))


def test_apply_sparse_map_that_never_ends_is_invalid(sb: Sandbox) -> None:
    """Item 41: an old-GNU sparse map of endless extension blocks is refused, not buffered."""
    with pytest.raises(InvalidLayer) as info:
        sb.apply(_gnu_old_sparse(b"s", 1024, [(0, b"x" * 512)], extension_blocks=3000))
    assert info.value.details["reason"] == "sparse_map"


def test_apply_many_tiny_entries_hit_the_entry_cap(sb: Sandbox) -> None:
    """Item 42: an entry-count cap over all layers, `limit_exceeded` with details.limit == "entries"."""
    layer = LayerTar()
    for i in range(600):
        layer.file(f"f{i}")
    data = layer.bytes()
    limits = Limits(max_entries=1000)
    sb.apply(data, limits=limits)
    with pytest.raises(EntryCountExceeded) as info:
        sb.apply(data, limits=limits)
    assert info.value.code == "limit_exceeded"
    assert info.value.details == {"limit": "entries", "max": 1000, "value": 1001}


def test_apply_implicit_parent_directories_count_as_entries(sb: Sandbox) -> None:
    """Item 42: directories created for a deep name count, so one header cannot make thousands of nodes."""
    with pytest.raises(EntryCountExceeded):
        sb.apply(LayerTar().file("a/b/c/d/e/f/g", b""), limits=Limits(max_entries=5))


class _CountingChildren(dict):
    """A directory's children that count full scans (what an opaque whiteout's purge does)."""

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        self.scans = 0

    def __iter__(self):
        self.scans += 1
        return super().__iter__()


def test_apply_repeated_opaque_whiteouts_scan_each_directory_once(sb: Sandbox) -> None:
    """Item 42: 2000 opaque markers for one directory do not rescan its 2000 children each time."""
    lower = LayerTar()
    for i in range(100):
        lower.file(f"a/lower{i}")
    sb.apply(lower)
    a = sb.node(b"a")
    a.children = children = _CountingChildren(a.children)
    upper = LayerTar()
    for i in range(2000):
        upper.file(f"a/upper{i}").opaque("a")
    sb.apply(upper)
    assert children.scans == 1
    assert sorted(sb.node(b"a").children) == sorted(b"upper%d" % i for i in range(2000))


@pytest.mark.parametrize(
    "name, limit",
    [
        ("/".join(["a"] * 1001), "depth"),
        ("d/" * 2100 + "f", "path_bytes"),
        ("dir/" + "n" * 256, "name_bytes"),
        ("x" * 5000, "path_bytes"),
    ],
)
@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_apply_deep_or_long_names_fail_cleanly(sb: Sandbox, name: str, limit: str, fmt: int) -> None:
    """Item 43: depth > 1000, path > PATH_MAX, component > 255 (GNU/PAX long names): name_too_long."""
    with pytest.raises(NameTooLong) as info:
        sb.apply(LayerTar(fmt).file("ok", b"fine").file(name, b"x"))
    assert info.value.code == "name_too_long"
    assert info.value.details["limit"] == limit
    assert list(sb.scratch.iterdir()) == []  # the half-written spool is gone


def test_apply_enormous_gnu_long_name_is_refused_before_buffering(sb: Sandbox) -> None:
    """Item 43: a GNU 'L' record claiming 1 GiB is refused from its header, not read into memory."""
    layer = header_block(b"././@LongLink", kind=tarfile.GNUTYPE_LONGNAME, size=1 << 30)
    with pytest.raises(NameTooLong) as info:
        sb.apply(layer)
    assert info.value.details["limit"] == "path_bytes"


def test_apply_symlink_cannot_smuggle_a_path_past_the_depth_limit(sb: Sandbox) -> None:
    """Item 43: limits hold for where an entry really lands, not only for its tar name."""
    deep = "/".join(["a"] * 200)
    limits = Limits(max_depth=256)
    with pytest.raises(NameTooLong) as info:
        sb.apply(LayerTar().dir(deep).symlink("l", deep).file("l/" + "/".join(["b"] * 100), b""), limits=limits)
    assert info.value.details["limit"] == "depth"


def test_apply_deep_but_legal_tree_has_no_recursion_problems(sb: Sandbox) -> None:
    """Item 43: 250 levels (under the limit) apply, walk and sort iteratively."""
    name = "/".join(["d"] * 250)
    sb.apply(LayerTar().file(name + "/f", b"deep"))
    assert sb.data(name.encode() + b"/f") == b"deep"
    assert len(sb.paths()) == 251


# --- 44: names --------------------------------------------------------------------------------------------------


NAMES = [b"\xff\xfe", b"new\nline", b"tab\tand\x1b[31mesc", b"Case", b"case", b"caf\xc3\xa9", b"cafe\xcc\x81",
         b"\xe2\x80\xaeevil", b"sp ace"]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_apply_non_utf8_and_control_names_are_preserved_byte_exact(sb: Sandbox, fmt: int) -> None:
    """Item 44: non-UTF-8 bytes, control characters, case-only differences survive exactly."""
    layer = LayerTar(fmt)
    for name in NAMES:
        layer.file(b"d/" + name, name)
    layer.symlink(b"link\xff", b"target\xfe").link(b"hard\x80", b"d/\xff\xfe")
    sb.apply(layer)
    assert sb.paths() == sorted([b"d", b"link\xff", b"hard\x80"] + [b"d/" + n for n in NAMES])
    for name in NAMES:
        assert sb.data(b"d/" + name) == name
    assert sb.node(b"link\xff").target == b"target\xfe"
    assert sb.node(b"hard\x80") is sb.node(b"d/\xff\xfe")


def test_apply_errors_about_binary_names_are_json_safe(sb: Sandbox) -> None:
    """Item 44: logging or JSON-encoding an error naming a non-UTF-8 path never throws."""
    with pytest.raises(NameTooLong) as info:
        sb.apply(LayerTar(tarfile.PAX_FORMAT).file(b"\xff\n" * 200, b""))
    encoded = json.dumps({"code": info.value.code, "details": info.value.details})
    assert "\\\\xff" in encoded
    str(info.value)


def test_apply_name_with_nul_byte_is_invalid(sb: Sandbox) -> None:
    """Item 44: a PAX path with an embedded NUL would be cut short in the cpio; refuse it."""
    info = tarfile.TarInfo("x")
    info.pax_headers = {"path": "etc/passwd\0junk"}
    with pytest.raises(InvalidLayer) as err:
        sb.apply(LayerTar(tarfile.PAX_FORMAT).raw(info, b"x"))
    assert err.value.details["reason"] == "bad_name"


# --- 45–50: whiteouts -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [".wh.", ".wh..", ".wh...", "etc/.wh...", "etc/.wh..", "a/b/.wh."])
def test_apply_whiteout_with_empty_or_traversal_name_is_invalid(sb: Sandbox, name: str) -> None:
    """Item 45 (containerd WhiteoutRoot/Parent/CurrentDirectory/RootParent): invalid archive."""
    sb.apply(LayerTar().file("etc/keep", b"k"))
    with pytest.raises(InvalidLayer) as info:
        sb.apply(LayerTar().file(name))
    assert info.value.details["reason"] == "bad_whiteout"
    assert sb.data(b"etc/keep") == b"k"


def test_apply_whiteout_name_used_as_a_directory_is_invalid(sb: Sandbox) -> None:
    """Item 45: `.wh.` is reserved, so `.wh.x/y` cannot exist in a filesystem."""
    with pytest.raises(InvalidLayer) as info:
        sb.apply(LayerTar().file(".wh.x/y", b""))
    assert info.value.details["reason"] == "whiteout_parent"


def test_apply_aufs_housekeeping_entries_are_skipped(sb: Sandbox) -> None:
    """Item 49: old aufs exports' `.wh..wh.plnk/…` and `.wh..wh.aufs` never reach the tree."""
    sb.apply(LayerTar().file(".wh..wh.aufs").dir(".wh..wh.plnk").file(".wh..wh.plnk/123.456", b"x")
             .file("real", b"r"))
    assert sb.paths() == [b"real"]


@pytest.mark.parametrize("target", ["/etc", "host"])
def test_apply_whiteout_through_symlinked_parent_removes_in_root_only(sb: Sandbox, target: str) -> None:
    """Item 46 (containerd WhiteoutSymlinkPath): `localetc/.wh.whitedout` removes the tree's file only."""
    real = b"/etc" if target == "/etc" else sb.hostb + b"/etc"
    sb.apply(LayerTar().file(real + b"/whitedout", b"image").file(real + b"/other", b"o").symlink("localetc", real),
             LayerTar().whiteout("localetc", "whitedout"))
    assert sb.absent(real.lstrip(b"/") + b"/whitedout")
    assert sb.data(real.lstrip(b"/") + b"/other") == b"o"
    assert (sb.host / "etc" / "whitedout").read_bytes() == b"host-whitedout"


def _add(layer: LayerTar, kind: str, name: str, *, data: bytes, mode: int) -> None:
    if kind == "file":
        layer.file(name, data)
    elif kind == "dir":
        layer.dir(name, mode=mode)
    elif kind == "opaque":
        layer.opaque(name)
    else:
        layer.whiteout(*name.rsplit("/", 1))


def _lower_for_opaque() -> LayerTar:
    return (LayerTar().dir("a", mode=0o750, uid=7).file("a/old", b"old").dir("a/b", mode=0o700)
            .file("a/b/lowerfile", b"l").file("a/b/c/lower", b"l").file("sibling", b"s"))


def _tree_shape(tree: Tree) -> list[tuple[bytes, NodeKind, int, int, int]]:
    return [(p, n.kind, n.mode, n.uid, n.mtime) for p, n in tree.iter_sorted()]


@pytest.mark.parametrize("position", [0, 1, 2, 3])
def test_apply_opaque_whiteout_is_independent_of_its_position(sb: Sandbox, position: int) -> None:
    """Item 47: `a/b/c/foo` before or after `a/.wh..wh..opq`: foo kept, every lower child of a/ hidden."""
    upper = [("file", "a/b/c/foo", b"foo"), ("file", "a/x", b"x"), ("dir", "a/b/c", None)]
    upper.insert(position, ("opaque", "a", None))
    layer = LayerTar()
    for kind, name, data in upper:
        _add(layer, kind, name, data=data or b"", mode=0o711)
    sb.apply(_lower_for_opaque(), layer)
    assert sb.paths() == [b"a", b"a/b", b"a/b/c", b"a/b/c/foo", b"a/x", b"sibling"]
    assert sb.node(b"a").mode == 0o750  # the opaque dir itself keeps its attributes
    # a/b was only written through: as if deleted and recreated as an implicit parent.
    assert (sb.node(b"a/b").mode, sb.node(b"a/b").uid) == (0o755, 0)
    assert sb.node(b"a/b/c").mode == 0o711
    assert sb.state.layers[-1].opaque_whiteouts == 1


def test_apply_opaque_whiteout_results_equal_for_every_order(sb: Sandbox) -> None:
    """Item 47: the resulting trees, attributes included, are identical whatever the entry order."""
    entries = [("opaque", "a"), ("file", "a/b/c/foo"), ("dir", "a/b"), ("file", "a/x"), ("whiteout", "a/b/lowerfile")]
    shapes = set()
    for rotation in range(len(entries)):
        order = entries[rotation:] + entries[:rotation]
        layer = LayerTar()
        for kind, name in order:
            _add(layer, kind, name, data=b"f", mode=0o701)
        tree = apply_layers([_lower_for_opaque().stream(), layer.stream()], spool_dir=sb.scratch)
        shapes.add(tuple(_tree_shape(tree)))
    assert len(shapes) == 1


@pytest.mark.parametrize("whiteout_first", [True, False])
def test_apply_whiteout_of_same_layer_entry_does_not_hide_it(sb: Sandbox, whiteout_first: bool) -> None:
    """Item 48: whiteouts apply only to lower layers; this layer's own `x` and `d/new` survive."""
    sb.apply(LayerTar().file("x", b"lower").file("d/old", b"old").dir("d", mode=0o700))
    layer = LayerTar()
    if whiteout_first:
        layer.whiteout("", "x").whiteout("", "d").file("x", b"upper").file("d/new", b"new")
    else:
        layer.file("x", b"upper").file("d/new", b"new").whiteout("", "x").whiteout("", "d")
    sb.apply(layer)
    assert sb.data(b"x") == b"upper"
    assert sb.paths() == [b"d", b"d/new", b"x"]
    assert sb.node(b"d").mode == 0o755  # lower d deleted; d is now only the implicit parent of d/new


def test_apply_whiteout_hides_a_lower_hardlink_name_only(sb: Sandbox) -> None:
    """Item 48: deleting one name of a hard-linked file keeps the other; a same-layer link is kept."""
    sb.apply(LayerTar().file("a", b"data").link("b", "a"), LayerTar().whiteout("", "a").link("c", "b").whiteout("", "c"))
    assert sb.absent(b"a")
    assert sb.node(b"c") is sb.node(b"b") and sb.data(b"b") == b"data"


def test_apply_whiteouts_never_reach_the_tree_and_missing_targets_are_noops(sb: Sandbox) -> None:
    """Item 49 (containerd WhiteoutDeadSymlinkParent): no `.wh.*` in the tree; nothing to hide is fine."""
    sb.apply(LayerTar().symlink("deadlink", "/nowhere").file("f", b"file"),
             LayerTar().whiteout("", "nonexistent").whiteout("missing/dir", "x").whiteout("deadlink", "x")
             .whiteout("f", "x").opaque("missing").opaque("deadlink").file("new", b"n"))
    assert sb.paths() == [b"deadlink", b"f", b"new"]
    assert not any(b".wh." in p for p in sb.paths())
    assert sb.state.layers[-1].whiteouts == 4


def test_apply_layers_serially_a_later_deletion_wins(sb: Sandbox) -> None:
    """Item 50: a file removed in layer N+1 (`RUN rm`) is absent; layers apply in order, one at a time."""
    state = ApplyState()
    tree = apply_layers(
        [LayerTar().file("app/tmpfile", b"t").file("app/keep", b"k").stream(),
         LayerTar().whiteout("app", "tmpfile").stream(),
         LayerTar().file("app/later", b"l").stream()],
        spool_dir=sb.scratch, state=state)
    assert [p for p, _ in tree.iter_sorted()] == [b"app", b"app/keep", b"app/later"]
    assert [s.index for s in state.layers] == [0, 1, 2]
    assert [s.whiteouts for s in state.layers] == [0, 1, 0]


# --- 52: malformed streams ---------------------------------------------------------------------------------------


def _with_header_after_first(block: bytes) -> bytes:
    return LayerTar().file("first", b"1").bytes()[:1024] + block + END


def _truncated_gzip() -> BinaryIO:
    data = gzip.compress(LayerTar().file("a", os.urandom(50_000)).bytes())
    return gzip.GzipFile(fileobj=io.BytesIO(data[: len(data) // 2]))


def _corrupt_gzip() -> BinaryIO:
    data = bytearray(gzip.compress(LayerTar().file("a", os.urandom(50_000)).bytes()))
    data[len(data) // 2] ^= 0xFF
    return gzip.GzipFile(fileobj=io.BytesIO(bytes(data)))


def _pax(records: bytes, then: bytes) -> bytes:
    return header_block(b"./PaxHeaders/x", kind=tarfile.XHDTYPE, size=len(records)) + pad(records) + then


MALFORMED = {
    "truncated_gzip": (_truncated_gzip, "corrupt_stream"),
    "corrupt_gzip": (_corrupt_gzip, "corrupt_stream"),
    "not_a_tar": (lambda: io.BytesIO(os.urandom(4096)), "bad_header"),
    "empty_stream": (lambda: io.BytesIO(b""), "unreadable"),
    "negative_size": (
        lambda: io.BytesIO(header_block(b"neg", size_field=tarfile.itn(-1, 12, tarfile.GNU_FORMAT)) + END),
        "negative_size"),
    "negative_pax_size": (lambda: io.BytesIO(_pax(pax_record("size", "-512"), header_block(b"f") + END)),
                          "negative_size"),
    "zero_length_pax_record": (lambda: io.BytesIO(_pax(b"0 path=x\n", header_block(b"f") + END)), "bad_header"),
    "bad_checksum_after_first": (lambda: io.BytesIO(
        _with_header_after_first(header_block(b"second")[:148] + b"0000000\0" + header_block(b"second")[156:])),
        "bad_header"),
    "truncated_header_after_first": (
        lambda: io.BytesIO(LayerTar().file("first", b"1").bytes()[:1024] + b"x" * 100), "bad_header"),
    "truncated_member_data": (
        lambda: io.BytesIO(LayerTar().file("big", b"z" * 100_000).bytes()[:50_000]), "unreadable"),
    "unsupported_type": (lambda: io.BytesIO(header_block(b"vol", kind=b"V") + END), "unsupported_type"),
    "pax_chain": (lambda: io.BytesIO(b"".join(
        header_block(b"./PaxHeaders/x", kind=tarfile.XHDTYPE, size=512) + pad(pax_record("uid", "1234"))
        for _ in range(200)) + header_block(b"f") + END), "metadata_chain"),
    "huge_pax_header": (
        lambda: io.BytesIO(header_block(b"./PaxHeaders/x", kind=tarfile.XHDTYPE, size=1 << 40)), "metadata_too_large"),
    "pax_mtime_inf": (lambda: io.BytesIO(_pax(pax_record("mtime", "inf"), header_block(b"f") + END)), "bad_mtime"),
    "pax_uid_huge": (lambda: io.BytesIO(_pax(pax_record("uid", "9" * 30), header_block(b"f") + END)), "bad_owner"),
    "bad_sparse_map": (lambda: io.BytesIO(_gnu_old_sparse(b"s", 100, [(0, b"x" * 512)])), "sparse_map"),
    "symlink_empty_target": (lambda: io.BytesIO(header_block(b"s", kind=tarfile.SYMTYPE) + END), "bad_link"),
}


@pytest.mark.timeout(30)
@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_apply_malformed_stream_fails_fast_with_invalid_layer(sb: Sandbox, case: str) -> None:
    """Item 52: truncated/corrupt gzip, not-a-tar, negative sizes, zero-length PAX records, silent-EOF
    headers, truncated data, recursion bait, huge metadata: `invalid_layer`, no hang, no crash."""
    make, reason = MALFORMED[case]
    with pytest.raises(InvalidLayer) as info:
        sb.apply(make())
    assert info.value.code == "invalid_layer" and not info.value.retryable
    assert info.value.details["reason"] == reason
    json.dumps(info.value.details)
    assert list(sb.scratch.iterdir()) == []


def test_apply_tar_without_end_marker_at_a_block_boundary_is_accepted(sb: Sandbox) -> None:
    """Item 52, by contrast: a stream ending cleanly between members (no zero blocks) is complete (Go's reader)."""
    data = LayerTar().file("a", b"a").file("b", b"b").bytes()
    sb.apply(data[:2048])
    assert sb.paths() == [b"a", b"b"]


# --- 53: no extraction at all --------------------------------------------------------------------------------


def test_apply_never_uses_tarfile_extraction(sb: Sandbox, monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 53: nothing relies on tarfile's extraction filters, because nothing is extracted."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("tarfile extraction was used")

    for name in ("extract", "extractall", "makefile", "makedir", "makelink", "makefifo", "makedev", "chown", "chmod"):
        monkeypatch.setattr(tarfile.TarFile, name, refuse)
    sb.apply(LayerTar().file(b"../../" + sb.hostb + b"/x", b"x").symlink("s", sb.hostb).link("h", "s")
             .char("c", 1, 1).fifo("f").dir("d", mode=0o7777).file("s/y", b"y"))
    assert sb.data(sb.in_tree(sb.hostb) + b"/y") == b"y"
