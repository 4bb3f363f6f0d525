"""The in-memory image tree: nodes, contents and chroot-confined path resolution over bytes names."""
from __future__ import annotations

import enum
import errno
import heapq
import io
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Protocol

from common.errors import SymlinkLoop

# Linux MAXSYMLINKS: the kernel gives up with ELOOP after this many links in one lookup.
MAX_SYMLINK_HOPS = 40

DEFAULT_DIR_MODE = 0o755


class NodeKind(enum.Enum):
    FILE = "file"
    DIR = "dir"
    SYMLINK = "symlink"
    CHAR = "char"
    BLOCK = "block"
    FIFO = "fifo"


_TYPE_BITS: dict[NodeKind, int] = {
    NodeKind.FILE: stat.S_IFREG,
    NodeKind.DIR: stat.S_IFDIR,
    NodeKind.SYMLINK: stat.S_IFLNK,
    NodeKind.CHAR: stat.S_IFCHR,
    NodeKind.BLOCK: stat.S_IFBLK,
    NodeKind.FIFO: stat.S_IFIFO,
}


class Content(Protocol):
    """Bytes of a regular file, readable as often as needed."""

    @property
    def size(self) -> int: ...

    def open(self) -> BinaryIO:
        """A fresh reader that yields exactly `size` bytes."""
        ...


@dataclass(frozen=True)
class BytesContent:
    """Content held in memory (small files added by callers, empty files)."""

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def open(self) -> BinaryIO:
        return io.BytesIO(self.data)


@dataclass(frozen=True)
class SpoolContent:
    """A region of a spool file in the scratch dir; `crc`, the CRC-32 of its bytes when the spooler computed it
    (an EIF's CRC is then known before its ramdisk is read: common.enclave.cpio.CpioArchive.crc32)."""

    spool_path: Path
    offset: int
    size: int
    crc: int | None = None

    def open(self) -> BinaryIO:
        fd = os.open(self.spool_path, os.O_RDONLY | os.O_CLOEXEC)
        return io.BufferedReader(_RegionReader(fd, self.offset, self.size))


class _RegionReader(io.RawIOBase):
    """Reads [offset, offset+size) of a file descriptor with pread, so readers never share a position."""

    def __init__(self, fd: int, offset: int, size: int) -> None:
        super().__init__()
        self._fd = fd
        self._offset = offset
        self._size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, pos: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + pos < 0:
            raise ValueError("negative seek position")
        self._pos = base + pos
        return self._pos

    def readinto(self, buffer: bytearray | memoryview) -> int:  # type: ignore[override]
        want = min(len(buffer), self._size - self._pos)
        if want <= 0:
            return 0
        # Straight into the caller's buffer: the app ramdisk's bytes are copied once on their way out.
        got = os.preadv(self._fd, [memoryview(buffer)[:want]], self._offset + self._pos)
        if not got:
            # A short spool would otherwise produce a silently truncated file in the image.
            raise OSError(errno.EIO, "spool file is shorter than the recorded content")
        self._pos += got
        return got

    def close(self) -> None:
        if not self.closed:
            os.close(self._fd)
        super().close()


@dataclass(eq=False, slots=True)
class Node:
    """One inode of the image. Hard links are the same Node reachable at several paths (eq is identity)."""

    kind: NodeKind
    mode: int = 0
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    content: Content | None = field(default=None, repr=False)
    target: bytes = b""
    rdev: tuple[int, int] = (0, 0)
    children: dict[bytes, Node] = field(default_factory=dict, repr=False)
    xattrs: dict[bytes, bytes] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.mode &= 0o7777

    @classmethod
    def directory(cls, *, mode: int = DEFAULT_DIR_MODE, uid: int = 0, gid: int = 0, mtime: int = 0) -> Node:
        return cls(NodeKind.DIR, mode, uid, gid, mtime)

    @classmethod
    def file(cls, content: Content, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 0) -> Node:
        return cls(NodeKind.FILE, mode, uid, gid, mtime, content=content)

    @classmethod
    def symlink(cls, target: bytes, *, mode: int = 0o777, uid: int = 0, gid: int = 0, mtime: int = 0) -> Node:
        return cls(NodeKind.SYMLINK, mode, uid, gid, mtime, target=target)

    @classmethod
    def device(
        cls, kind: NodeKind, rdev: tuple[int, int], *, mode: int = 0o600, uid: int = 0, gid: int = 0, mtime: int = 0
    ) -> Node:
        if kind not in (NodeKind.CHAR, NodeKind.BLOCK):
            raise ValueError(f"not a device kind: {kind}")
        return cls(kind, mode, uid, gid, mtime, rdev=rdev)

    @classmethod
    def fifo(cls, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 0) -> Node:
        return cls(NodeKind.FIFO, mode, uid, gid, mtime)

    @property
    def size(self) -> int:
        """Data bytes as cpio stores them: file content, or the symlink target."""
        if self.kind is NodeKind.FILE:
            return self.content.size if self.content is not None else 0
        if self.kind is NodeKind.SYMLINK:
            return len(self.target)
        return 0

    @property
    def st_mode(self) -> int:
        return _TYPE_BITS[self.kind] | self.mode


def replace_attributes(node: Node, source: Node) -> None:
    """Dir over dir: the image spec replaces the attributes and keeps the children."""
    node.mode = source.mode
    node.uid = source.uid
    node.gid = source.gid
    node.mtime = source.mtime
    node.xattrs = source.xattrs


def place(parent: Node, name: bytes, node: Node) -> Node:
    """Put `node` at `name` in `parent` by the image spec's "changeset over existing files" rule.

    Only a directory over a directory merges (attributes replaced, children kept); anything else
    unlinks what was there and links `node`. Returns the node now at `name`.
    """
    existing = parent.children.get(name)
    if existing is not None and existing is not node and existing.kind is NodeKind.DIR and node.kind is NodeKind.DIR:
        replace_attributes(existing, node)
        return existing
    parent.children[name] = node
    return node


def split_path(path: bytes) -> list[bytes]:
    """Components of `path`, with empty and `.` components dropped and `..` kept for the walker."""
    return [c for c in path.split(b"/") if c and c != b"."]


def clean_path(path: bytes) -> list[bytes]:
    """Lexically cleaned components (Go's filepath.Clean on "/" + path): `..` clamps at the root."""
    out: list[bytes] = []
    for c in path.split(b"/"):
        if not c or c == b".":
            continue
        if c == b"..":
            if out:
                out.pop()
            continue
        out.append(c)
    return out


def printable(path: bytes, limit: int = 200) -> str:
    """A str for logs and JSON details that never fails, whatever bytes a name holds."""
    text = path[: limit + 1].decode("utf-8", "backslashreplace")
    return text if len(path) <= limit else text[:limit] + "…"


class Chain:
    """The real directories from the root down to where a walk stands, with their names."""

    __slots__ = ("nodes", "names", "path_bytes")

    def __init__(self, root: Node) -> None:
        self.nodes: list[Node] = [root]
        self.names: list[bytes] = []
        self.path_bytes = 0

    @property
    def top(self) -> Node:
        return self.nodes[-1]

    @property
    def depth(self) -> int:
        return len(self.names)

    def child_path_bytes(self, name: bytes) -> int:
        """Length of the relative path of `name` inside the current directory."""
        return self.path_bytes + (1 if self.names else 0) + len(name)

    def push(self, name: bytes, node: Node) -> None:
        self.path_bytes = self.child_path_bytes(name)
        self.nodes.append(node)
        self.names.append(name)

    def pop(self) -> None:
        """`..`: up one real directory; at the root it stays (chroot semantics)."""
        if self.names:
            name = self.names.pop()
            self.nodes.pop()
            self.path_bytes -= len(name) + (1 if self.names else 0)

    def reset(self) -> None:
        """An absolute symlink target: start again from the tree root."""
        del self.nodes[1:]
        self.names.clear()
        self.path_bytes = 0

    def path(self) -> bytes:
        return b"/".join(self.names)


class WalkCounter:
    """Counts components resolved, so a caller can bound the total work hostile symlinks cause."""

    __slots__ = ("steps",)

    def __init__(self) -> None:
        self.steps = 0


# Called for a missing directory component; returns the new DIR node (the walker links it).
MakeDir = Callable[[Chain, bytes], Node]


class _Walk:
    __slots__ = ("hops", "counter", "origin")

    def __init__(self, counter: WalkCounter | None, origin: bytes) -> None:
        self.hops = 0
        self.counter = counter if counter is not None else WalkCounter()
        self.origin = origin

    def follow(self, chain: Chain, link: Node) -> list[bytes]:
        """Components of a symlink target to resolve next, in-root; raises on ELOOP."""
        self.hops += 1
        if self.hops > MAX_SYMLINK_HOPS:
            raise SymlinkLoop(
                "too many levels of symbolic links",
                details={"path": printable(self.origin), "max_hops": MAX_SYMLINK_HOPS},
            )
        if link.target.startswith(b"/"):
            chain.reset()
        return split_path(link.target)


class Tree:
    """A whole image filesystem in memory; nothing in it ever touches the host's namespace."""

    def __init__(self) -> None:
        self.root = Node.directory(mode=DEFAULT_DIR_MODE)

    # --- resolution ---------------------------------------------------------------------------
    def walk(
        self,
        components: Sequence[bytes],
        *,
        chain: Chain | None = None,
        make_dir: MakeDir | None = None,
        counter: WalkCounter | None = None,
    ) -> Chain | None:
        """Resolve every component as a directory, following symlinks with chroot semantics.

        Absolute targets restart at the tree root and `..` never climbs above it. A missing
        component is created through `make_dir` if given, else the result is None. Raises
        NotADirectoryError for a component that is not a directory, SymlinkLoop on ELOOP.
        """
        chain = chain if chain is not None else Chain(self.root)
        walk = _Walk(counter, b"/".join(components))
        pending = list(reversed(components))
        return chain if self._resolve(chain, pending, make_dir, walk) else None

    def _resolve(self, chain: Chain, pending: list[bytes], make_dir: MakeDir | None, walk: _Walk) -> bool:
        # Iterative: `pending` is a stack of components still to walk, symlink targets are pushed
        # onto it, so neither deep paths nor link chains can exhaust the Python stack.
        counter = walk.counter
        while pending:
            name = pending.pop()
            counter.steps += 1
            if not name or name == b".":
                continue
            if name == b"..":
                chain.pop()
                continue
            child = chain.top.children.get(name)
            if child is None:
                if make_dir is None:
                    return False
                child = make_dir(chain, name)
                chain.top.children[name] = child
            if child.kind is NodeKind.DIR:
                chain.push(name, child)
            elif child.kind is NodeKind.SYMLINK:
                pending.extend(reversed(walk.follow(chain, child)))
            else:
                raise NotADirectoryError(
                    errno.ENOTDIR, "not a directory", printable(chain.path() + b"/" + name)
                )
        return True

    def lookup(self, path: bytes, *, follow: bool = True, counter: WalkCounter | None = None) -> Node | None:
        """The node at `path` (absolute or relative to the root), or None; like stat/lstat in a chroot."""
        walk = _Walk(counter, path)
        chain = Chain(self.root)
        components = split_path(path)
        while True:
            if not components:
                return chain.top
            *parents, last = components
            try:
                if not self._resolve(chain, list(reversed(parents)), None, walk):
                    return None
            except NotADirectoryError:
                return None
            if last == b"..":
                chain.pop()
                return chain.top
            child = chain.top.children.get(last)
            if child is None:
                return None
            if child.kind is NodeKind.SYMLINK and follow:
                components = walk.follow(chain, child)
                continue
            return child

    # --- construction -------------------------------------------------------------------------
    def add_node(self, path: bytes, node: Node, *, parents: bool = True) -> Node:
        """Link `node` at `path` (replacing per the changeset rule); returns the node now there.

        Parents resolve in-root through symlinks; the last component is never followed. Missing
        parents are created as 0755 root-owned directories when `parents`, else FileNotFoundError.
        """
        components = split_path(path)
        if not components or components[-1] == b"..":
            raise ValueError(f"{printable(path)!r} names the root or a parent, not an entry")
        make_dir = _implicit_dir if parents else None
        chain = self.walk(components[:-1], make_dir=make_dir)
        if chain is None:
            raise FileNotFoundError(errno.ENOENT, "parent directory does not exist", printable(path))
        return place(chain.top, components[-1], node)

    def add_dir(
        self, path: bytes, *, mode: int = DEFAULT_DIR_MODE, uid: int = 0, gid: int = 0, mtime: int = 0,
        parents: bool = True,
    ) -> Node:
        return self.add_node(path, Node.directory(mode=mode, uid=uid, gid=gid, mtime=mtime), parents=parents)

    def add_file(
        self, path: bytes, content: Content, *, mode: int = 0o644, uid: int = 0, gid: int = 0, mtime: int = 0,
        parents: bool = True,
    ) -> Node:
        return self.add_node(path, Node.file(content, mode=mode, uid=uid, gid=gid, mtime=mtime), parents=parents)

    def add_symlink(
        self, path: bytes, target: bytes, *, mode: int = 0o777, uid: int = 0, gid: int = 0, mtime: int = 0,
        parents: bool = True,
    ) -> Node:
        return self.add_node(path, Node.symlink(target, mode=mode, uid=uid, gid=gid, mtime=mtime), parents=parents)

    def add_hardlink(self, path: bytes, target: bytes, *, parents: bool = True) -> Node:
        """Make `path` another name of the (non-directory) node at `target`; `target` itself is not followed."""
        node = self.lookup(target, follow=False)
        if node is None:
            raise FileNotFoundError(errno.ENOENT, "hard link target does not exist", printable(target))
        if node.kind is NodeKind.DIR:
            raise IsADirectoryError(errno.EPERM, "hard link to a directory", printable(target))
        return self.add_node(path, node, parents=parents)

    def remove(self, path: bytes) -> bool:
        """Unlink the entry at `path` (a directory goes with everything below it); False if absent."""
        components = split_path(path)
        if not components or components[-1] == b"..":
            raise ValueError(f"{printable(path)!r} names the root or a parent, not an entry")
        try:
            chain = self.walk(components[:-1])
        except NotADirectoryError:
            return False
        if chain is None:
            return False
        return chain.top.children.pop(components[-1], None) is not None

    # --- reading ------------------------------------------------------------------------------
    def iter_sorted(self) -> Iterator[tuple[bytes, Node]]:
        """Every path but the root, relative, in bytewise order of the whole path (parents first).

        A heap keyed by full path gives exact byte order (`a`, `a-b`, `a/c`), which a per-directory
        sorted DFS would not, and stays iterative however deep the tree is.
        """
        heap: list[tuple[bytes, Node]] = list(self.root.children.items())
        heapq.heapify(heap)
        while heap:
            # Paths are unique, so tuple comparison never falls through to the Node.
            path, node = heapq.heappop(heap)
            yield path, node
            if node.kind is NodeKind.DIR:
                prefix = path + b"/"
                for name, child in node.children.items():
                    heapq.heappush(heap, (prefix + name, child))

    def _walk_nodes(self) -> Iterator[Node]:
        stack = [self.root]
        while stack:
            for child in stack.pop().children.values():
                yield child
                if child.kind is NodeKind.DIR:
                    stack.append(child)

    @property
    def entry_count(self) -> int:
        """Paths in the tree, the root excluded (a hard link counts once per name)."""
        return sum(1 for _ in self._walk_nodes())

    @property
    def total_bytes(self) -> int:
        """File content bytes, each hard-linked file counted once."""
        seen: set[int] = set()
        total = 0
        for node in self._walk_nodes():
            if node.kind is NodeKind.FILE and id(node) not in seen:
                seen.add(id(node))
                total += node.size
        return total


def _implicit_dir(chain: Chain, name: bytes) -> Node:
    return Node.directory(mode=DEFAULT_DIR_MODE)
