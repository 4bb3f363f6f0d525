"""Applying OCI/Docker layer tars to a Tree: changeset rules, whiteouts, links, limits; nothing lands on the host."""
from __future__ import annotations

import math
import os
import tarfile
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, BinaryIO, cast

from isal.isal_zlib import crc32

from common.errors import (
    EntryCountExceeded,
    InvalidLayer,
    LimitExceeded,
    NameTooLong,
    SymlinkLoop,
    TotalBytesExceeded,
)
from common.image.filetree import (
    DEFAULT_DIR_MODE,
    BytesContent,
    Chain,
    Content,
    Node,
    NodeKind,
    SpoolContent,
    Tree,
    WalkCounter,
    clean_path,
    place,
    printable,
)
from common.image.tarstream import CountingSource, ReadAhead, TarStream
from common.util.hashpipe import HashPipe, Writes

WHITEOUT_PREFIX = b".wh."
OPAQUE_WHITEOUT = b".wh..wh..opq"
AUFS_META_PREFIX = b".wh..wh."

_U32 = 1 << 32
# Pieces (of at most _CHUNK) queued ahead of the spool's writing thread.
_SPOOL_DEPTH = 4
# Small files' contents go to the spool's thread gathered into pieces of about this size.
_SPOOL_GATHER = 256 << 10
_CHUNK = 1 << 20
_EMPTY = BytesContent(b"")

# None stands for a hard link: it names an existing node instead of making one.
_ENTRY_KINDS: dict[bytes, NodeKind | None] = {
    **{t: NodeKind.FILE for t in tarfile.REGULAR_TYPES},
    tarfile.DIRTYPE: NodeKind.DIR,
    tarfile.SYMTYPE: NodeKind.SYMLINK,
    tarfile.LNKTYPE: None,
    tarfile.CHRTYPE: NodeKind.CHAR,
    tarfile.BLKTYPE: NodeKind.BLOCK,
    tarfile.FIFOTYPE: NodeKind.FIFO,
}


@dataclass(frozen=True)
class Limits:
    """Bounds on what one image may cost; all cumulative over its layers."""

    max_total_bytes: int = 8 << 30
    max_entries: int = 1_000_000
    max_path_bytes: int = 4096
    max_name_bytes: int = 255
    max_depth: int = 256
    # Path components resolved (symlink targets included); bounds the work hostile link chains cause.
    max_walk_steps: int = 50_000_000
    # One PAX or GNU metadata header; tarfile holds it in memory whole.
    max_metadata_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        for name, value in vars(self).items():
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Limits.{name} must be a positive int, got {value!r}")


@dataclass(frozen=True)
class LayerStats:
    """What applying one layer did."""

    index: int
    members: int
    files: int
    content_bytes: int
    stream_bytes: int
    whiteouts: int
    opaque_whiteouts: int
    hardlinks: int
    implicit_dirs: int
    ignored: int
    spool_path: Path | None


@dataclass
class ApplyState:
    """Running totals across the layers of one image. Deletions refund nothing: the work was done."""

    entries: int = 0
    stream_bytes: int = 0
    content_bytes: int = 0
    walk: WalkCounter = field(default_factory=WalkCounter)
    layers: list[LayerStats] = field(default_factory=list)


def apply_layer(
    tree: Tree, tar_stream: BinaryIO, *, spool_dir: Path, limits: Limits, state: ApplyState
) -> LayerStats:
    """Apply one uncompressed layer tar on top of `tree`, reading the stream once, to its very end.

    Names are cleaned lexically, then resolved in the tree with chroot semantics; regular-file bytes go
    to one 0600 spool file in `spool_dir`, nothing else touches the disk. Raises InvalidLayer,
    LimitExceeded (TotalBytesExceeded, EntryCountExceeded, walk steps), NameTooLong or SymlinkLoop, after
    which the tree is half-applied and must be discarded; spool I/O errors (ENOSPC) stay OSError.
    """
    spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    stats = _LayerApplier(tree, limits, state, spool_dir, len(state.layers)).run(tar_stream)
    state.layers.append(stats)
    return stats


def apply_layers(
    layers: Iterable[BinaryIO],
    *,
    spool_dir: Path,
    limits: Limits | None = None,
    tree: Tree | None = None,
    state: ApplyState | None = None,
) -> Tree:
    """Apply layers bottom to top, strictly one after another (a later layer's deletions must win)."""
    tree = tree if tree is not None else Tree()
    limits = limits if limits is not None else Limits()
    state = state if state is not None else ApplyState()
    for layer in layers:
        apply_layer(tree, layer, spool_dir=spool_dir, limits=limits, state=state)
    return tree


def _invalid(reason: str, raw: bytes, message: str, **details: object) -> InvalidLayer:
    return InvalidLayer(message, details={"reason": reason, "path": printable(raw), **details})


def _as_bytes(name: str, raw_for_error: bytes = b"") -> bytes:
    # tarfile decoded with utf-8 + surrogateescape, so this restores the archive's bytes exactly.
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:
        raise _invalid("bad_name", raw_for_error, "entry name cannot be represented as bytes") from exc


class _LayerApplier:
    def __init__(self, tree: Tree, limits: Limits, state: ApplyState, spool_dir: Path, index: int) -> None:
        self.tree = tree
        self.limits = limits
        self.state = state
        self.spool_dir = spool_dir
        self.index = index
        # Entries this layer wrote, per directory: id(dir) -> (dir, {name: explicit}). `explicit` is
        # False for directories it only wrote through. The dir is held so its id is not reused.
        self.owned: dict[int, tuple[Node, dict[bytes, bool]]] = {}
        # Directories whose lower content is already hidden in this layer: each is purged once.
        self.purged: dict[int, Node] = {}
        self.spool: IO[bytes] | None = None
        # The spool's writes run in a thread of their own (the kernel's copy releases the GIL) while this one parses.
        self.spool_pipe: HashPipe | None = None
        self.spool_path: Path | None = None
        self.spool_offset = 0
        self.members = self.files = self.content_bytes = 0
        self.whiteouts = self.opaque_whiteouts = self.hardlinks = self.implicit_dirs = self.ignored = 0

    # --- driver ------------------------------------------------------------------------------
    def run(self, tar_stream: BinaryIO) -> LayerStats:
        try:
            # Decompression and the DiffID hash run ahead in a thread while this one parses and spools.
            with ReadAhead(tar_stream) as ahead:
                source = CountingSource(cast(BinaryIO, ahead), self._charge_stream)
                tar = TarStream(
                    source, max_path_bytes=self.limits.max_path_bytes,
                    max_metadata_bytes=self.limits.max_metadata_bytes
                )
                try:
                    for member in tar:
                        self._apply(tar, member)
                finally:
                    tar.close()
                source.drain()
        except BaseException:
            self._discard_spool()
            raise
        try:
            self._close_spool()
        except BaseException:
            self._discard_spool()
            raise
        return LayerStats(
            index=self.index,
            members=self.members,
            files=self.files,
            content_bytes=self.content_bytes,
            stream_bytes=source.count,
            whiteouts=self.whiteouts,
            opaque_whiteouts=self.opaque_whiteouts,
            hardlinks=self.hardlinks,
            implicit_dirs=self.implicit_dirs,
            ignored=self.ignored,
            spool_path=self.spool_path,
        )

    def _apply(self, tar: TarStream, member: tarfile.TarInfo) -> None:
        self.members += 1
        self._count_entry()
        raw = _as_bytes(member.name)
        if member.type not in _ENTRY_KINDS:
            raise _invalid("unsupported_type", raw, "unsupported tar entry type", type=repr(member.type))
        kind = _ENTRY_KINDS[member.type]
        components = self._components(raw)
        parents, base = components[:-1], components[-1] if components else b""

        if any(c.startswith(WHITEOUT_PREFIX) for c in parents):
            # `.wh.` is reserved, so no directory can carry it; old aufs exports keep hard-link
            # bookkeeping under `.wh..wh.plnk/`, which Docker skips and so do we.
            if any(c.startswith(AUFS_META_PREFIX) for c in parents):
                self.ignored += 1
                return
            raise _invalid("whiteout_parent", raw, "a whiteout name used as a directory")
        if not components:
            # `.`, `/`, `..`, "": never replace or restyle the root (containerd ignores these too).
            self.ignored += 1
            return
        if base.startswith(WHITEOUT_PREFIX):
            self._whiteout(parents, base, raw)
            return

        if kind is None:
            self._hardlink(member, parents, base, raw)
            return
        chain = self._parent(parents, raw)
        mode, uid, gid, mtime, xattrs = self._attributes(member, raw)
        if kind is NodeKind.DIR:
            node = Node.directory(mode=mode, uid=uid, gid=gid, mtime=mtime)
        elif kind is NodeKind.FILE:
            node = Node.file(self._content(tar, member, raw), mode=mode, uid=uid, gid=gid, mtime=mtime)
            self.files += 1
        elif kind is NodeKind.SYMLINK:
            node = Node.symlink(self._symlink_target(member, raw), mode=mode, uid=uid, gid=gid, mtime=mtime)
        elif kind is NodeKind.FIFO:
            node = Node.fifo(mode=mode, uid=uid, gid=gid, mtime=mtime)
        else:
            node = Node.device(kind, self._rdev(member, raw), mode=mode, uid=uid, gid=gid, mtime=mtime)
        node.xattrs = xattrs
        self._place(chain, base, node)

    # --- names and limits --------------------------------------------------------------------
    def _components(self, raw: bytes) -> list[bytes]:
        lim = self.limits
        if len(raw) > lim.max_path_bytes:
            raise NameTooLong(
                "entry path is too long",
                details={"limit": "path_bytes", "max": lim.max_path_bytes, "value": len(raw), "path": printable(raw)},
            )
        if b"\0" in raw:
            raise _invalid("bad_name", raw, "entry name contains a NUL byte")
        components = clean_path(raw)
        if len(components) > lim.max_depth:
            raise NameTooLong(
                "entry path is too deep",
                details={"limit": "depth", "max": lim.max_depth, "value": len(components), "path": printable(raw)},
            )
        for c in components:
            if len(c) > lim.max_name_bytes:
                raise NameTooLong(
                    "entry name component is too long",
                    details={"limit": "name_bytes", "max": lim.max_name_bytes, "value": len(c), "path": printable(raw)},
                )
        return components

    def _check_location(self, chain: Chain, name: bytes) -> None:
        # Symlinks can put an entry deeper or further down than its tar name says; the limits are
        # about the image's real paths, so check where it actually lands.
        lim = self.limits
        where = printable(chain.path() + b"/" + name)
        if len(name) > lim.max_name_bytes:
            raise NameTooLong(
                "name component is too long",
                details={"limit": "name_bytes", "max": lim.max_name_bytes, "value": len(name), "path": where},
            )
        if chain.depth + 1 > lim.max_depth:
            raise NameTooLong(
                "resolved path is too deep",
                details={"limit": "depth", "max": lim.max_depth, "value": chain.depth + 1, "path": where},
            )
        if chain.child_path_bytes(name) > lim.max_path_bytes:
            raise NameTooLong(
                "resolved path is too long",
                details={
                    "limit": "path_bytes", "max": lim.max_path_bytes, "value": chain.child_path_bytes(name),
                    "path": where,
                },
            )

    def _count_entry(self) -> None:
        if self.state.entries >= self.limits.max_entries:
            raise EntryCountExceeded(
                "image has too many entries",
                details={"limit": "entries", "max": self.limits.max_entries, "value": self.state.entries + 1},
            )
        self.state.entries += 1

    def _charge_stream(self, n: int) -> None:
        self.state.stream_bytes += n
        if self.state.stream_bytes > self.limits.max_total_bytes:
            raise TotalBytesExceeded(
                "uncompressed layers are too large",
                details={
                    "limit": "total_bytes", "measure": "stream", "max": self.limits.max_total_bytes,
                    "value": self.state.stream_bytes,
                },
            )

    def _charge_content(self, n: int, raw: bytes) -> None:
        # Charged at the declared size, before reading: a sparse or lying header cannot
        # make us spool first and count later.
        self.state.content_bytes += n
        if self.state.content_bytes > self.limits.max_total_bytes:
            raise TotalBytesExceeded(
                "image files are too large",
                details={
                    "limit": "total_bytes", "measure": "declared", "max": self.limits.max_total_bytes,
                    "value": self.state.content_bytes, "path": printable(raw),
                },
            )

    def _check_walk(self) -> None:
        if self.state.walk.steps > self.limits.max_walk_steps:
            raise LimitExceeded(
                "path resolution work is too large",
                details={"limit": "walk_steps", "max": self.limits.max_walk_steps, "value": self.state.walk.steps},
            )

    # --- resolution --------------------------------------------------------------------------
    def _parent(self, parents: list[bytes], raw: bytes) -> Chain:
        """The directory an entry goes in, creating missing parents (counted, limited, owned)."""
        try:
            chain = self.tree.walk(parents, make_dir=self._implicit_dir, counter=self.state.walk)
        except NotADirectoryError as exc:
            raise _invalid("parent_not_directory", raw, "a parent of the entry is not a directory") from exc
        except SymlinkLoop as exc:
            exc.details.setdefault("entry", printable(raw))
            raise
        self._check_walk()
        assert chain is not None  # make_dir given: a walk never comes back empty-handed
        return chain

    def _existing_dir(self, parents: list[bytes], raw: bytes) -> Chain | None:
        try:
            chain = self.tree.walk(parents, counter=self.state.walk)
        except NotADirectoryError:
            chain = None
        except SymlinkLoop as exc:
            exc.details.setdefault("entry", printable(raw))
            raise
        self._check_walk()
        return chain

    def _implicit_dir(self, chain: Chain, name: bytes) -> Node:
        self._check_location(chain, name)
        self._count_entry()
        self.implicit_dirs += 1
        self._own(chain, name, explicit=False)
        return Node.directory(mode=DEFAULT_DIR_MODE)

    def _place(self, chain: Chain, name: bytes, node: Node) -> None:
        self._check_location(chain, name)
        place(chain.top, name, node)
        self._own(chain, name, explicit=True)

    def _owned_names(self, directory: Node) -> dict[bytes, bool]:
        entry = self.owned.get(id(directory))
        if entry is None:
            entry = self.owned[id(directory)] = (directory, {})
        return entry[1]

    def _own(self, chain: Chain, name: bytes, *, explicit: bool) -> None:
        names = self._owned_names(chain.top)
        if name in names:
            names[name] = names[name] or explicit
            return
        names[name] = explicit
        # Mark the directories written through, bottom-up; stop at the first one already marked,
        # since its ancestors were marked with it. Amortised O(1) per entry.
        for depth in range(chain.depth - 1, -1, -1):
            up = self._owned_names(chain.nodes[depth])
            if chain.names[depth] in up:
                break
            up[chain.names[depth]] = False

    # --- whiteouts ---------------------------------------------------------------------------
    def _whiteout(self, parents: list[bytes], base: bytes, raw: bytes) -> None:
        # Whiteouts hide lower layers only, wherever they sit in the tar (image spec), so anything
        # this layer wrote survives them: see _hide_lower. A missing or non-directory parent means
        # there is nothing to hide.
        if base == OPAQUE_WHITEOUT:
            self.opaque_whiteouts += 1
            chain = self._existing_dir(parents, raw)
            if chain is not None:
                self._purge(chain.top, reset=False)
            return
        if base.startswith(AUFS_META_PREFIX):
            self.ignored += 1
            return
        name = base[len(WHITEOUT_PREFIX):]
        if name in (b"", b".", b".."):
            raise _invalid("bad_whiteout", raw, "whiteout names no entry in its directory")
        self.whiteouts += 1
        chain = self._existing_dir(parents, raw)
        if chain is not None:
            self._hide_lower(chain.top, name)

    def _hide_lower(self, parent: Node, name: bytes) -> None:
        # A directory this layer only wrote through (not listed itself) is reset to implicit-parent
        # attributes: that is what "delete it, then create its children" gives in the other order.
        entry = self.owned.get(id(parent))
        explicit = entry[1].get(name) if entry is not None else None
        if explicit is None:
            parent.children.pop(name, None)
            return
        child = parent.children.get(name)
        if child is not None and child.kind is NodeKind.DIR:
            self._purge(child, reset=not explicit)

    def _purge(self, directory: Node, *, reset: bool) -> None:
        """Hide everything lower layers put below `directory`; keep what this layer wrote."""
        stack = [(directory, reset)]
        while stack:
            node, reset_it = stack.pop()
            if reset_it:
                node.mode, node.uid, node.gid, node.mtime, node.xattrs = DEFAULT_DIR_MODE, 0, 0, 0, None
            if id(node) in self.purged:
                continue
            self.purged[id(node)] = node
            entry = self.owned.get(id(node))
            names = entry[1] if entry is not None else {}
            for name in list(node.children):
                explicit = names.get(name)
                if explicit is None:
                    del node.children[name]
                    continue
                child = node.children[name]
                if child.kind is NodeKind.DIR:
                    stack.append((child, not explicit))

    # --- entries -----------------------------------------------------------------------------
    def _hardlink(self, member: tarfile.TarInfo, parents: list[bytes], base: bytes, raw: bytes) -> None:
        # containerd's hardlinkRootPath: the target's parent resolves in-root, its last component is
        # not followed (a link to a symlink is that symlink). As link(2) would fail, a target that is
        # missing (not in a lower layer nor earlier in this one), a directory, or the link's own path
        # is an invalid layer. The link is the same Node; like GNU tar, its header's metadata is not
        # applied to the shared inode.
        self.hardlinks += 1
        target_raw = _as_bytes(member.linkname, raw)
        if len(target_raw) > self.limits.max_path_bytes:
            raise NameTooLong(
                "hard link target is too long",
                details={"limit": "path_bytes", "max": self.limits.max_path_bytes, "value": len(target_raw),
                         "path": printable(raw)},
            )
        if b"\0" in target_raw:
            raise _invalid("bad_link", raw, "hard link target contains a NUL byte")
        target_components = clean_path(target_raw)
        if not target_components:
            raise _invalid("hardlink_to_directory", raw, "hard link to the root directory")
        target_parent = self._existing_dir(target_components[:-1], raw)
        target_name = target_components[-1]
        target = target_parent.top.children.get(target_name) if target_parent is not None else None
        if target_parent is None or target is None:
            raise _invalid("hardlink_target_missing", raw, "hard link target does not exist",
                           target=printable(target_raw))
        if target.kind is NodeKind.DIR:
            raise _invalid("hardlink_to_directory", raw, "hard link to a directory", target=printable(target_raw))
        chain = self._parent(parents, raw)
        if chain.top is target_parent.top and base == target_name:
            raise _invalid("hardlink_to_itself", raw, "hard link to itself")
        self._place(chain, base, target)

    def _symlink_target(self, member: tarfile.TarInfo, raw: bytes) -> bytes:
        target = _as_bytes(member.linkname, raw)
        if len(target) > self.limits.max_path_bytes:
            raise NameTooLong(
                "symlink target is too long",
                details={"limit": "link_target_bytes", "max": self.limits.max_path_bytes, "value": len(target),
                         "path": printable(raw)},
            )
        if not target or b"\0" in target:
            raise _invalid("bad_link", raw, "symlink target is empty or contains a NUL byte")
        return target

    def _rdev(self, member: tarfile.TarInfo, raw: bytes) -> tuple[int, int]:
        major, minor = member.devmajor, member.devminor
        if not (0 <= major < _U32 and 0 <= minor < _U32):
            raise _invalid("bad_device", raw, "device numbers out of range", major=major, minor=minor)
        return major, minor

    def _attributes(
        self, member: tarfile.TarInfo, raw: bytes
    ) -> tuple[int, int, int, int, dict[bytes, bytes] | None]:
        if not (0 <= member.uid < _U32 and 0 <= member.gid < _U32):
            raise _invalid("bad_owner", raw, "uid or gid out of range", uid=member.uid, gid=member.gid)
        mtime = member.mtime
        if isinstance(mtime, float):
            if not math.isfinite(mtime):
                raise _invalid("bad_mtime", raw, "mtime is not a finite number")
            mtime = math.floor(mtime)
        # newc (and the kernel that unpacks it) carries an unsigned 32-bit mtime; clamping keeps a
        # pre-1970 or far-future timestamp from corrupting the archive, and mtime carries no security.
        mtime = min(max(mtime, 0), _U32 - 1)
        xattrs: dict[bytes, bytes] | None = None
        for key, value in member.pax_headers.items():
            if key.startswith("SCHILY.xattr."):
                xattrs = xattrs if xattrs is not None else {}
                xattrs[_as_bytes(key[len("SCHILY.xattr."):], raw)] = _as_bytes(value, raw)
        return member.mode & 0o7777, member.uid, member.gid, mtime, xattrs

    def _content(self, tar: TarStream, member: tarfile.TarInfo, raw: bytes) -> Content:
        size = member.size
        self._charge_content(size, raw)
        self.content_bytes += size
        if size == 0:
            return _EMPTY
        spool, spool_path = self._spool_file()
        offset = self.spool_offset
        reader = tar.open_member(member)
        remaining, crc = size, 0
        while remaining:
            chunk = tar.read(reader, min(_CHUNK, remaining))
            if not chunk:
                raise _invalid("truncated", raw, "file data ends before its declared size")
            spool.update(chunk)
            # Kept so the EIF's CRC can be known before its ramdisk is streamed (a few ms per image here).
            crc = crc32(chunk, crc)
            remaining -= len(chunk)
        self.spool_offset += size
        return SpoolContent(spool_path, offset, size, crc)

    # --- spool -------------------------------------------------------------------------------
    def _spool_file(self) -> tuple[HashPipe, Path]:
        if self.spool_pipe is None or self.spool_path is None:
            # mkstemp: O_EXCL, mode 0600, a fresh name; the only thing this module creates on disk.
            fd, name = tempfile.mkstemp(prefix=f"layer-{self.index:04d}-", suffix=".spool", dir=self.spool_dir)
            self.spool = os.fdopen(fd, "wb")
            self.spool_path = Path(name)
            self.spool_pipe = HashPipe(Writes(self.spool), name="nitroconv-spool", depth=_SPOOL_DEPTH,
                                       gather=_SPOOL_GATHER)
        return self.spool_pipe, self.spool_path

    def _close_spool(self) -> None:
        try:
            if self.spool_pipe is not None:
                self.spool_pipe.finish()  # raises what a write raised (ENOSPC)
        finally:
            if self.spool is not None:
                self.spool.close()

    def _discard_spool(self) -> None:
        if self.spool_pipe is not None:
            self.spool_pipe.abort()
        if self.spool is not None:
            self.spool.close()
        if self.spool_path is not None:
            self.spool_path.unlink(missing_ok=True)
            self.spool_path = None
