"""The cpio "newc" (070701) format of EIF ramdisks: a deterministic streaming writer and a strict reader."""
from __future__ import annotations

import re
import stat
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import BinaryIO

from isal.isal_zlib import crc32, crc32_combine

from common.errors import InvalidCpio
from common.util.exactread import ExactReader

MAGIC = b"070701"
TRAILER_NAME = b"TRAILER!!!"
HEADER_SIZE = 110  # 6-byte magic + 13 fields of 8 hex digits
BLOCK_SIZE = 512
CHUNK_SIZE = 1 << 20
# linuxkit's cpio writer (surma/gocpio) numbers inodes from 721 and writes a constant device 3:1;
# copying both keeps our archives byte-comparable with nitro-cli's for the same entries (EIF.md §5.1).
FIRST_INODE = 721
DEV_MAJOR = 3
DEV_MINOR = 1
# The kernel's initramfs unpacker silently skips entries whose name (with its NUL) or symlink target
# exceeds PATH_MAX (init/initramfs.c do_header), so such entries are refused instead of vanishing.
PATH_MAX = 4096

_U32_MAX = 0xFFFF_FFFF
_HEADER_FIELDS = b"%08x" * 13  # one formatting call per header: it runs once per entry of the image
_HEX_FIELDS = re.compile(rb"[0-9A-Fa-f]{104}")
_FILE_TYPES = frozenset(
    {stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK, stat.S_IFCHR, stat.S_IFBLK, stat.S_IFIFO, stat.S_IFSOCK}
)

Opener = Callable[[], BinaryIO]


@dataclass(frozen=True)
class CpioEntry:
    """One archive member as the writer takes it.

    `name` is the archive path (bytes, no leading "/", any encoding); `mode` is the full st_mode (type bits
    and permission bits); `size` is the data length (file size, or symlink target length); `data` is the
    symlink target or small file content as bytes, or an opener returning a binary reader for streamed
    file content. Regular-file entries sharing a non-None `link_key` are hard links of one inode. `crc`, when
    known, is the CRC-32 of an opener's content: `CpioArchive.crc32` then takes it instead of reading the content.
    """

    name: bytes
    mode: int
    uid: int = 0
    gid: int = 0
    mtime: int = 0
    size: int = 0
    rdevmajor: int = 0
    rdevminor: int = 0
    data: bytes | Opener | None = None
    link_key: object | None = None
    crc: int | None = None


@dataclass(frozen=True)
class CpioHeader:
    """One member header as the reader found it (`name` without its NUL)."""

    name: bytes
    ino: int
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    filesize: int
    devmajor: int
    devminor: int
    rdevmajor: int
    rdevminor: int
    check: int

    @property
    def file_type(self) -> int:
        """The S_IFMT bits of `mode` (compare with `stat.S_IFREG` etc.)."""
        return stat.S_IFMT(self.mode)


@dataclass(frozen=True)
class _Member:
    """A planned member: the entry plus what the archive decided for it."""

    entry: CpioEntry
    ino: int
    nlink: int
    data_size: int  # bytes actually stored: 0 for the later links of a hard-link group
    source: bytes | Opener | None
    crc: int | None = None  # of `source`'s bytes, when an opener's entry said it


def _pad4(n: int) -> int:
    return (4 - n % 4) % 4


def _invalid(message: str, reason: str, name: bytes | None = None) -> InvalidCpio:
    details: dict[str, object] = {"reason": reason}
    if name is not None:
        # repr of bytes never fails, whatever the encoding of the name.
        details["name"] = repr(name)
    return InvalidCpio(message, details=details)


def _check_name(name: bytes) -> None:
    if not isinstance(name, bytes):
        raise _invalid(f"entry name must be bytes, not {type(name).__name__}", "bad_name")
    if not name:
        raise _invalid("empty entry name", "bad_name", name)
    if b"\0" in name:
        raise _invalid("entry name contains NUL", "bad_name", name)
    if name == TRAILER_NAME:
        raise _invalid("entry name collides with the archive trailer", "bad_name", name)
    if len(name) + 1 > PATH_MAX:
        raise _invalid(f"entry name longer than {PATH_MAX - 1} bytes", "name_too_long", name)
    # One spelling per path: otherwise "a//b" and "a/b" would be distinct entries that unpack onto each other.
    if name.startswith(b"/") or name.endswith(b"/") or any(
        part in (b"", b".", b"..") for part in name.split(b"/")
    ):
        raise _invalid("entry name is not a clean relative path", "bad_name", name)


def _check_entry(entry: CpioEntry) -> None:
    name = entry.name
    _check_name(name)
    for field in ("mode", "uid", "gid", "mtime", "size", "rdevmajor", "rdevminor"):
        value = getattr(entry, field)
        if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= _U32_MAX:
            raise _invalid(f"{field}={value!r} does not fit a 32-bit newc field", "field_overflow", name)
    kind = stat.S_IFMT(entry.mode)
    if entry.mode & ~0o177777 or kind not in _FILE_TYPES:
        raise _invalid(f"mode {entry.mode:#o} has no valid file type", "bad_mode", name)
    if entry.link_key is not None and kind != stat.S_IFREG:
        raise _invalid("only regular files can be hard links", "bad_link", name)
    if (entry.rdevmajor or entry.rdevminor) and kind not in (stat.S_IFCHR, stat.S_IFBLK):
        raise _invalid("device numbers on an entry that is not a device node", "bad_rdev", name)
    data = entry.data
    if kind == stat.S_IFREG:
        if isinstance(data, bytes):
            if len(data) != entry.size:
                raise _invalid(f"data is {len(data)} bytes but size is {entry.size}", "size_mismatch", name)
        elif data is None:
            # A hard link may leave its data to another link of the same inode (checked per group).
            if entry.size and entry.link_key is None:
                raise _invalid(f"size is {entry.size} but the entry has no data", "size_mismatch", name)
        elif not callable(data):
            raise _invalid("data must be bytes, an opener or None", "bad_data", name)
    elif kind == stat.S_IFLNK:
        if not isinstance(data, bytes) or not data:
            raise _invalid("a symlink needs its target as non-empty bytes", "bad_symlink", name)
        if len(data) != entry.size:
            raise _invalid(f"target is {len(data)} bytes but size is {entry.size}", "size_mismatch", name)
        if b"\0" in data or len(data) >= PATH_MAX:
            raise _invalid("symlink target contains NUL or exceeds PATH_MAX", "bad_symlink", name)
    elif entry.size or data not in (None, b""):
        raise _invalid("only regular files and symlinks carry data", "bad_data", name)


def _plan(entries: Iterable[CpioEntry]) -> tuple[_Member, ...]:
    ordered = sorted(entries, key=lambda e: e.name if isinstance(e.name, bytes) else b"")
    for entry in ordered:
        _check_entry(entry)
    for before, after in zip(ordered, ordered[1:], strict=False):
        if before.name == after.name:
            raise _invalid("duplicate entry name", "duplicate_name", after.name)

    groups: dict[object, list[CpioEntry]] = {}
    for entry in ordered:
        if entry.link_key is not None:
            groups.setdefault(entry.link_key, []).append(entry)
    for links in groups.values():
        first = links[0]
        for other in links[1:]:
            same = (other.mode, other.uid, other.gid, other.mtime, other.size) == (
                first.mode, first.uid, first.gid, first.mtime, first.size
            )
            if not same:
                raise _invalid("hard links of one inode disagree on mode, owner, mtime or size", "bad_link",
                               other.name)

    members: list[_Member] = []
    group_ino: dict[object, int] = {}
    next_ino = FIRST_INODE
    for entry in ordered:
        key = entry.link_key
        group = groups.get(key) if key is not None else None
        if group is None or len(group) == 1:
            nlink = 2 if stat.S_ISDIR(entry.mode) else 1
            members.append(_Member(entry, next_ino, nlink, entry.size, entry.data, entry.crc))
            next_ino += 1
        elif key in group_ino:
            # Later links carry no data; the kernel links them to the inode the first one created.
            members.append(_Member(entry, group_ino[key], len(group), 0, None))
        else:
            group_ino[key] = next_ino
            provider = next((link for link in group if link.data is not None), None)
            source = provider.data if provider is not None else None
            if source is None and entry.size:
                raise _invalid("no link of this inode provides its data", "size_mismatch", entry.name)
            members.append(_Member(entry, next_ino, len(group), entry.size, source,
                                   provider.crc if provider is not None else None))
            next_ino += 1
    if next_ino > _U32_MAX:
        raise _invalid("too many inodes for 32-bit inode numbers", "field_overflow")
    return tuple(members)


def _header(name: bytes, *, ino: int, mode: int, uid: int, gid: int, nlink: int, mtime: int, filesize: int,
            rdevmajor: int, rdevminor: int) -> bytes:
    namesize = len(name) + 1
    fields = (ino, mode, uid, gid, nlink, mtime, filesize, DEV_MAJOR, DEV_MINOR, rdevmajor, rdevminor, namesize, 0)
    head = MAGIC + _HEADER_FIELDS % fields + name + b"\0"
    return head + b"\0" * _pad4(len(head))


def _entry_header(member: _Member) -> bytes:
    e = member.entry
    return _header(e.name, ino=member.ino, mode=e.mode, uid=e.uid, gid=e.gid, nlink=member.nlink, mtime=e.mtime,
                   filesize=member.data_size, rdevmajor=e.rdevmajor, rdevminor=e.rdevminor)


def _header_length(name: bytes) -> int:
    n = HEADER_SIZE + len(name) + 1
    return n + _pad4(n)


class _Chunker:
    """Coalesces small pieces into chunks of exactly CHUNK_SIZE (the last one may be shorter)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    @property
    def pending(self) -> int:
        return len(self._buf)

    def push(self, data: bytes) -> Iterator[bytes]:
        if not self._buf and len(data) == CHUNK_SIZE:
            yield data  # the common case for big files: no copy through the buffer
            return
        self._buf += data
        while len(self._buf) >= CHUNK_SIZE:
            with memoryview(self._buf) as view:  # one copy out, not a bytearray slice and then bytes of it
                chunk = bytes(view[:CHUNK_SIZE])
            del self._buf[:CHUNK_SIZE]
            yield chunk

    def flush(self) -> Iterator[bytes]:
        if self._buf:
            yield bytes(self._buf)
            self._buf.clear()


class CpioArchive:
    """A deterministic newc archive of `entries`, in the layout linuxkit writes for nitro-cli.

    Entries are sorted by name bytes (so a directory precedes its children), inodes are numbered from
    721 with hard links sharing one, directories get nlink 2, a hard-linked file stores its data once on
    its first link (later links have size 0, which the kernel's initramfs unpacker accepts), and the
    archive ends with a `TRAILER!!!` entry and zero padding to a multiple of 512 bytes. The same set of
    entries gives the same bytes whatever their input order. Invalid entries raise `InvalidCpio` here.
    """

    def __init__(self, entries: Iterable[CpioEntry]) -> None:
        self._members = _plan(entries)
        self._trailer = _header(TRAILER_NAME, ino=FIRST_INODE + self._inode_count(), mode=0, uid=0, gid=0,
                                nlink=1, mtime=0, filesize=0, rdevmajor=0, rdevminor=0)
        length = len(self._trailer)
        for m in self._members:
            length += _header_length(m.entry.name) + m.data_size + _pad4(m.data_size)
        self._padding = (BLOCK_SIZE - length % BLOCK_SIZE) % BLOCK_SIZE
        self._size = length + self._padding

    def _inode_count(self) -> int:
        return len({m.ino for m in self._members})

    @property
    def size(self) -> int:
        """Exact byte length of the archive, known before anything is read or written."""
        return self._size

    def __len__(self) -> int:
        return len(self._members)

    def headers(self) -> list[CpioHeader]:
        """The headers the archive will write, in order (trailer excluded)."""
        return [
            CpioHeader(name=m.entry.name, ino=m.ino, mode=m.entry.mode, uid=m.entry.uid, gid=m.entry.gid,
                       nlink=m.nlink, mtime=m.entry.mtime, filesize=m.data_size, devmajor=DEV_MAJOR,
                       devminor=DEV_MINOR, rdevmajor=m.entry.rdevmajor, rdevminor=m.entry.rdevminor, check=0)
            for m in self._members
        ]

    def chunks(self) -> Iterator[bytes]:
        """Yield the archive bytes in chunks of at most 1 MiB, streaming file content from the openers.

        Raises `InvalidCpio` if an opener yields more or fewer bytes than its entry's size.
        """
        out = _Chunker()
        for member in self._members:
            yield from out.push(_entry_header(member))
            source, size = member.source, member.data_size
            if size == 0:
                continue
            if isinstance(source, bytes):
                yield from out.push(source)
            else:
                assert source is not None  # _plan guarantees a source for every stored byte
                yield from self._stream(out, member.entry.name, source, size)
            yield from out.push(b"\0" * _pad4(size))
        yield from out.push(self._trailer + b"\0" * self._padding)
        yield from out.flush()

    @staticmethod
    def _stream(out: _Chunker, name: bytes, opener: Opener, size: int) -> Iterator[bytes]:
        remaining = size
        with opener() as reader:
            while remaining:
                # Top the buffer up to a full chunk so that later reads pass through without copying.
                want = min(remaining, CHUNK_SIZE - out.pending if out.pending else CHUNK_SIZE)
                piece = reader.read(want)
                if not piece:
                    raise _invalid(f"content ended {remaining} bytes short of size {size}", "size_mismatch", name)
                remaining -= len(piece)
                yield from out.push(piece)
            if reader.read(1):
                raise _invalid(f"content is longer than size {size}", "size_mismatch", name)

    def crc32(self) -> int:
        """The CRC-32 of the bytes `chunks()` yields, computed without reading content whose entry gave its `crc`
        (the rest is read here). `chunks()` does not check content against it: a writer that needs the CRC
        before the bytes checks the CRC of what it wrote after (common.enclave.writer)."""
        crc = 0
        for member in self._members:
            crc = crc32(_entry_header(member), crc)
            source, size = member.source, member.data_size
            if size == 0:
                continue
            if isinstance(source, bytes):
                crc = crc32(source, crc)
            elif member.crc is not None:
                crc = crc32_combine(crc, member.crc, size)
            else:
                assert source is not None
                out = _Chunker()
                for piece in self._stream(out, member.entry.name, source, size):
                    crc = crc32(piece, crc)
                for piece in out.flush():
                    crc = crc32(piece, crc)
            crc = crc32(b"\0" * _pad4(size), crc)
        return crc32(self._trailer + b"\0" * self._padding, crc)

    def write_to(self, out: BinaryIO) -> int:
        """Write the whole archive to `out`; returns the number of bytes written (always `size`)."""
        written = 0
        for chunk in self.chunks():
            out.write(chunk)
            written += len(chunk)
        return written


# --- reader -------------------------------------------------------------------------------------------------


class _Input(ExactReader):
    """Exact reads with position tracking, so errors can say where the archive broke."""

    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(stream, lambda what, at: InvalidCpio(
            f"archive truncated in {what} at offset {at}", details={"reason": "truncated", "offset": at}))

    def expect_zeros(self, n: int, what: str) -> None:
        if n and self.read_exact(n, what).strip(b"\0"):
            raise InvalidCpio(f"non-zero {what} before offset {self.offset}",
                              details={"reason": "bad_padding", "offset": self.offset})


def _read_header(src: _Input) -> CpioHeader:
    start = src.offset
    raw = src.read_exact(HEADER_SIZE, "a header")
    if raw[:6] != MAGIC:
        hint = " (070702 crc format is not accepted)" if raw[:6] == b"070702" else ""
        raise InvalidCpio(f"bad magic {raw[:6]!r} at offset {start}{hint}",
                          details={"reason": "bad_magic", "offset": start})
    if not _HEX_FIELDS.fullmatch(raw[6:]):
        raise InvalidCpio(f"header fields at offset {start} are not 13 x 8 hex digits",
                          details={"reason": "bad_header", "offset": start})
    (ino, mode, uid, gid, nlink, mtime, filesize, devmajor, devminor, rdevmajor, rdevminor, namesize,
     check) = (int(raw[i:i + 8], 16) for i in range(6, HEADER_SIZE, 8))
    if check != 0:
        raise InvalidCpio(f"check field is {check:#x} at offset {start}; newc requires 0",
                          details={"reason": "bad_header", "offset": start})
    if not 2 <= namesize <= PATH_MAX:
        raise InvalidCpio(f"name size {namesize} at offset {start} is outside 2..{PATH_MAX}",
                          details={"reason": "bad_name", "offset": start})
    name = src.read_exact(namesize, "a name")
    if name[-1] != 0 or b"\0" in name[:-1]:
        raise InvalidCpio(f"name at offset {start} is not a single NUL-terminated string",
                          details={"reason": "bad_name", "offset": start})
    src.expect_zeros(_pad4(HEADER_SIZE + namesize), "name padding")
    return CpioHeader(name=name[:-1], ino=ino, mode=mode, uid=uid, gid=gid, nlink=nlink, mtime=mtime,
                      filesize=filesize, devmajor=devmajor, devminor=devminor, rdevmajor=rdevmajor,
                      rdevminor=rdevminor, check=check)


def _body(src: _Input, size: int, chunk_size: int) -> Iterator[bytes]:
    remaining = size
    while remaining:
        piece = src.read_exact(min(chunk_size, remaining), "file data")
        remaining -= len(piece)
        yield piece


def iter_cpio_stream(
    stream: BinaryIO, *, chunk_size: int = CHUNK_SIZE
) -> Iterator[tuple[CpioHeader, Iterator[bytes]]]:
    """Parse a newc archive strictly, yielding each member's header and an iterator over its data.

    The data iterator must be consumed before advancing to the next member; whatever is left of it is
    skipped. Checks: magic 070701, hex fields, check 0, NUL-terminated names, zero padding, the
    `TRAILER!!!` entry, and nothing but zero bytes after it. Raises `InvalidCpio`.
    """
    src = _Input(stream)
    while True:
        header = _read_header(src)
        if header.name == TRAILER_NAME:
            if header.filesize:
                raise InvalidCpio("trailer entry carries data", details={"reason": "bad_trailer"})
            while piece := src.read_some(chunk_size):
                if piece.strip(b"\0"):
                    raise InvalidCpio(f"non-zero bytes after the trailer, before offset {src.offset}",
                                      details={"reason": "trailing_data", "offset": src.offset})
            return
        body = _body(src, header.filesize, chunk_size)
        yield header, body
        for _ in body:  # skip what the consumer did not read
            pass
        src.expect_zeros(_pad4(header.filesize), "data padding")


def iter_cpio(stream: BinaryIO) -> Iterator[tuple[CpioHeader, bytes]]:
    """Parse a newc archive strictly, yielding (header, data) with each member's data in memory."""
    for header, body in iter_cpio_stream(stream):
        yield header, b"".join(body)


def list_cpio(stream: BinaryIO) -> list[CpioHeader]:
    """The headers of a newc archive (trailer excluded), validating it fully without keeping any data."""
    return [header for header, _ in iter_cpio_stream(stream)]
