"""Streaming tar reading that fails loudly: tarfile in "r|" mode behind header-level guards."""
from __future__ import annotations

import gzip
import lzma
import queue
import tarfile
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from typing import IO, Any, BinaryIO, Self, cast

import zstandard

from common.errors import InvalidLayer, NameTooLong, NitroconvError

# GNU/PAX records that describe the next member rather than being one.
_META_TYPES = (
    tarfile.GNUTYPE_LONGNAME,
    tarfile.GNUTYPE_LONGLINK,
    tarfile.XHDTYPE,
    tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)
_LONG_NAME_TYPES = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)
# tarfile recurses once per metadata header before a member; real archives use one or two.
MAX_META_CHAIN = 16
# Bytes a sparse map may occupy (old GNU extension blocks, or a PAX 1.0 map in the data).
MAX_SPARSE_MAP_BYTES = 1 << 20

# Raised by decompressors underneath us for a damaged stream; all mean "this layer is corrupt".
_CORRUPT_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
    zstandard.ZstdError,
)
# What tarfile lets escape for malformed headers besides its own TarError.
_TARFILE_PARSE_ERRORS: tuple[type[BaseException], ...] = (
    tarfile.TarError,
    ValueError,
    IndexError,
    OverflowError,
    UnicodeError,
    *_CORRUPT_STREAM_ERRORS,
)


# Not in typeshed's tarfile stub, but public names of the module.
_BAD_HEADER_ERRORS: tuple[type[Exception], ...] = (
    vars(tarfile)["TruncatedHeaderError"],
    vars(tarfile)["InvalidHeaderError"],
)


# tarfile's stream mode asks for 10 KiB at a time; the layer below (decompressor, DiffID hash) is read in
# pieces this large instead, so its per-call cost is paid ~100 times less often.
READAHEAD = 1 << 20
# How long leaving a ReadAhead on an error waits for its thread's current read before leaving it behind.
ABANDON_SECONDS = 1.0


class CountingSource:
    """The layer's uncompressed stream: counts bytes, charges them, maps decompressor faults.

    Reads the layer below in READAHEAD pieces and serves tarfile's small reads from them. Bytes are counted
    and charged as they are handed out, so limits trip at the same byte as without the read-ahead.
    """

    def __init__(self, raw: BinaryIO, charge: Callable[[int], None]) -> None:
        self._raw = raw
        self._charge = charge
        self._buffer = b""
        self._at = 0
        self.count = 0

    def _read_raw(self, size: int) -> bytes:
        try:
            data: bytes = self._raw.read(size)
        except NitroconvError:
            raise
        except _CORRUPT_STREAM_ERRORS as exc:
            raise InvalidLayer(
                "layer stream is corrupt or truncated", details={"reason": "corrupt_stream", "error": str(exc)}
            ) from exc
        return data

    def read(self, size: int = -1) -> bytes:
        if self._at < len(self._buffer):
            end = len(self._buffer) if size is None or size < 0 else self._at + size
            data = self._buffer[self._at:end]
            self._at += len(data)
        elif size is None or size < 0 or size >= READAHEAD:
            data = self._read_raw(size)
        else:
            self._buffer, self._at = self._read_raw(READAHEAD), 0
            data = self._buffer[:size]
            self._at = len(data)
        self.count += len(data)
        self._charge(len(data))
        return data

    def drain(self, chunk: int = 1 << 20) -> None:
        """Read to the end, so a digest computed over the stream covers trailing bytes too."""
        while self.read(chunk):
            pass


class ReadAhead:
    """Reads a stream to its end in a background thread, READAHEAD bytes at a time, at most `depth` pieces ahead.

    The layer below (gzip or zstd decompression, the DiffID hash) releases the GIL, so it runs on another
    core while the caller parses tar headers and spools file data. What the stream raises is raised by
    `read()` at the same place in the stream. Leaving the block stops the thread (it finishes the piece it
    is reading) and joins it, so the stream is the caller's alone again afterwards.
    """

    _EOF = b""

    def __init__(self, raw: BinaryIO, *, depth: int = 4) -> None:
        self._raw = raw
        self._queue: queue.Queue[bytes | BaseException] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._done = False
        self._thread = threading.Thread(target=self._run, name="nitroconv-readahead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._raw.read(READAHEAD)
            except BaseException as exc:  # raised again in the reader's thread, in stream order
                self._put(exc)
                return
            self._put(data)
            if not data:
                return

    def _put(self, item: bytes | BaseException) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def read(self, size: int = -1) -> bytes:
        """The next piece (up to READAHEAD bytes whatever `size`; the rest with `size` < 0); b"" at the end."""
        if size is None or size < 0:
            return b"".join(iter(lambda: self.read(READAHEAD), b""))
        if self._done:
            return b""
        item = self._queue.get()
        if isinstance(item, BaseException):
            self._done = True
            raise item
        if not item:
            self._done = True
        return item

    def close(self, abandon_after: float | None = None) -> None:
        """Stop the thread and join it; with `abandon_after`, give up waiting after that many seconds (the thread
        is a daemon, stopped, and ends when its blocked read returns)."""
        self._stop.set()
        deadline = None if abandon_after is None else time.monotonic() + abandon_after
        while self._thread.is_alive():
            if deadline is not None and time.monotonic() >= deadline:
                return
            try:
                self._queue.get(timeout=0.1)
            except queue.Empty:
                pass
        self._thread.join()

    def __enter__(self) -> ReadAhead:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        # Leaving on an error (a time limit, a cancel) must not wait for a read blocked on a stalled source: the
        # caller is done with the stream, and whoever owns the source unblocks that read when it closes it.
        self.close(abandon_after=ABANDON_SECONDS if exc_type is not None else None)


class _BudgetReader:
    """Stands in for tarfile's stream while it parses a sparse map, bounding what the map may take."""

    def __init__(self, inner: Any, budget: int) -> None:
        self._inner = inner
        self._left = budget

    def read(self, size: int) -> bytes:
        self._left -= size
        if self._left < 0:
            raise InvalidLayer("sparse map is too large", details={"reason": "sparse_map", "max": MAX_SPARSE_MAP_BYTES})
        data: bytes = self._inner.read(size)
        return data

    def tell(self) -> int:
        pos: int = self._inner.tell()
        return pos


def _corrupt(reason: str, **details: object) -> InvalidLayer:
    return InvalidLayer(f"tar stream is malformed: {reason}", details={"reason": reason, **details})


class _GuardedTarInfo(tarfile.TarInfo):
    """Hooks tarfile's documented per-member extension point (_proc_member) to bound header work."""

    @classmethod
    def fromtarfile(cls, tarfile_: tarfile.TarFile) -> Self:
        try:
            return super().fromtarfile(tarfile_)
        except _BAD_HEADER_ERRORS as exc:
            # TarFile.next() treats these as a clean end of archive once past the first member,
            # which would silently drop the rest of a damaged layer. Go's archive/tar errors.
            raise _corrupt("bad_header", error=str(exc)) from None

    def _proc_member(self, tarfile_: _LayerTarFile) -> tarfile.TarInfo:
        if self.size < 0:
            raise _corrupt("negative_size", size=self.size)
        if self.type in _META_TYPES:
            tarfile_.meta_chain += 1
            if tarfile_.meta_chain > MAX_META_CHAIN:
                raise _corrupt("metadata_chain", max=MAX_META_CHAIN)
            if self.type in _LONG_NAME_TYPES and self.size > tarfile_.max_path_bytes + 1:
                raise NameTooLong(
                    "GNU long name is longer than the path limit",
                    details={"limit": "path_bytes", "max": tarfile_.max_path_bytes, "value": self.size - 1},
                )
            if self.size > tarfile_.max_metadata_bytes:
                raise _corrupt("metadata_too_large", size=self.size, max=tarfile_.max_metadata_bytes)
        else:
            tarfile_.meta_chain = 0
        result: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        return result

    def _proc_sparse(self, tarfile_: _LayerTarFile) -> tarfile.TarInfo:
        # Old GNU sparse: a chain of extension blocks of unbounded length.
        return self._with_budget(tarfile_, lambda: super(_GuardedTarInfo, self)._proc_sparse(tarfile_))  # type: ignore[misc]

    def _proc_gnusparse_10(self, next_: tarfile.TarInfo, pax_headers: dict[str, str], tarfile_: _LayerTarFile) -> None:
        # PAX sparse 1.0: the map is a newline list at the start of the data, of any claimed length.
        self._with_budget(
            tarfile_,
            lambda: super(_GuardedTarInfo, self)._proc_gnusparse_10(next_, pax_headers, tarfile_),  # type: ignore[misc]
        )

    @staticmethod
    def _with_budget(tarfile_: _LayerTarFile, call: Callable[[], Any]) -> Any:
        inner = tarfile_.fileobj
        tarfile_.fileobj = _BudgetReader(inner, MAX_SPARSE_MAP_BYTES)  # type: ignore[assignment]
        try:
            return call()
        finally:
            tarfile_.fileobj = inner


class _LayerTarFile(tarfile.TarFile):
    members: list[tarfile.TarInfo]
    meta_chain = 0

    def __init__(self, *args: Any, max_path_bytes: int, max_metadata_bytes: int, **kwargs: Any) -> None:
        # Set before super().__init__, which already parses the first header.
        self.max_path_bytes = max_path_bytes
        self.max_metadata_bytes = max_metadata_bytes
        super().__init__(*args, **kwargs)


class TarStream:
    """Members of one tar stream in order; data of regular members is read with `open_member`."""

    def __init__(self, source: CountingSource, *, max_path_bytes: int, max_metadata_bytes: int) -> None:
        self._source = source
        # The stub's overloads know neither our extra keyword arguments nor a duck-typed fileobj.
        self._tar = _guard(
            lambda: _LayerTarFile.open(  # type: ignore[call-overload]
                fileobj=source,
                mode="r|",
                tarinfo=_GuardedTarInfo,
                encoding="utf-8",
                errors="surrogateescape",
                max_path_bytes=max_path_bytes,
                max_metadata_bytes=max_metadata_bytes,
            )
        )

    def __iter__(self) -> Iterator[tarfile.TarInfo]:
        while True:
            member = _guard(self._tar.next)
            if member is None:
                return
            # Stream mode still appends every member to TarFile.members: a million-entry layer
            # would otherwise hold a million TarInfo objects.
            self._tar.members.clear()
            if member.size < 0:  # a PAX `size` record is applied after our header checks
                raise _corrupt("negative_size", size=member.size)
            _check_sparse(member)
            yield member

    def open_member(self, member: tarfile.TarInfo) -> IO[bytes]:
        stream = self._tar.fileobj
        if (member.isreg() and member.sparse is None and isinstance(stream, _TARFILE_STREAM)
                and getattr(stream, "comptype", None) == "tar" and isinstance(getattr(stream, "buf", None), bytes)
                and getattr(stream, "pos", None) == member.offset_data):
            return cast(IO[bytes], _DirectMember(stream, self._source, member.size))
        reader = _guard(lambda: self._tar.extractfile(member))
        if reader is None:
            raise _corrupt("not_a_file")
        return reader

    def read(self, reader: IO[bytes], size: int) -> bytes:
        data: bytes = _guard(lambda: reader.read(size))
        return data

    def close(self) -> None:
        self._tar.close()


# tarfile's stream-mode reader. Its private `buf` (bytes read ahead of `pos`) and `pos` are all a member's
# data read needs; when they are not what 3.11's tarfile has, members are read through `extractfile`.
_TARFILE_STREAM: type = getattr(tarfile, "_Stream", type(None))


class _DirectMember:
    """A regular member's data read straight from the source below tarfile's stream, once: tarfile's own reader
    passes every byte through its 10 KiB record buffer in several copies. The stream's read-ahead and position
    are kept as tarfile keeps them, so its next header is read from where this member's data ends."""

    def __init__(self, stream: Any, source: CountingSource, size: int) -> None:
        self._stream, self._source, self._left = stream, source, size

    def read(self, size: int = -1) -> bytes:
        want = self._left if size is None or size < 0 else min(size, self._left)
        if want <= 0:
            return b""
        stream = self._stream
        buffered: bytes = stream.buf
        pieces: list[bytes] = []
        got = 0
        if buffered:
            pieces.append(buffered[:want])
            stream.buf = buffered[want:]
            got = len(pieces[0])
        while got < want:  # the source hands out what its current piece holds
            piece = self._source.read(want - got)
            if not piece:  # what tarfile's own reader says of data cut short
                raise _corrupt("unreadable", error="unexpected end of data")
            pieces.append(piece)
            got += len(piece)
        data = pieces[0] if len(pieces) == 1 else b"".join(pieces)
        stream.pos += len(data)
        self._left -= len(data)
        return data

    def close(self) -> None:
        pass


def _guard(call: Callable[[], Any]) -> Any:
    """Run a tarfile operation, turning whatever a malformed archive makes it raise into InvalidLayer."""
    try:
        return call()
    except NitroconvError:
        raise
    except RecursionError as exc:
        raise _corrupt("too_deep") from exc
    except _TARFILE_PARSE_ERRORS as exc:
        raise _corrupt("unreadable", error=str(exc)) from exc


def _check_sparse(member: tarfile.TarInfo) -> None:
    sparse: list[tuple[int, int]] | None = member.sparse  # type: ignore[assignment]
    if sparse is None:
        return
    end = 0
    for offset, numbytes in sparse:
        if offset < 0 or numbytes < 0:
            raise _corrupt("sparse_map", name=member.name[:200])
        if numbytes == 0:
            # Unused old-GNU header slots parse as (0, 0); they carry no data.
            continue
        # Overlapping or out-of-order maps make tarfile seek backwards or spin (CVE-2025-8194 class).
        if offset < end:
            raise _corrupt("sparse_map", name=member.name[:200])
        end = offset + numbytes
    if end > member.size:
        raise _corrupt("sparse_map", name=member.name[:200])
