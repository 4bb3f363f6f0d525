"""The verified blob cache (`<root>/sha256/<hex>`), bounded with LRU eviction, and layer streams that check
their DiffID after draining."""
from __future__ import annotations

import errno
import fcntl
import gzip
import os
import shutil
import time
import uuid
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO, cast

import zstandard
from isal import igzip, isal_zlib

from common.errors import DigestMismatch, InvalidLayer, LimitExceeded, SizeMismatch, UnsupportedMediaType
from common.registry.digest import Digest, new_hasher, verify_bytes
from common.registry.manifests import LAYER_COMPRESSION, Descriptor
from common.util.atomicfile import atomic_file
from common.util.compression import Compression

_CHUNK = 1024 * 1024
# zstd lets the producer pick the window; past 128 MiB a frame is a memory bomb rather than a layer.
_ZSTD_MAX_WINDOW = 1 << 27
_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (
    gzip.BadGzipFile, EOFError, zlib.error, cast(type[Exception], isal_zlib.error), zstandard.ZstdError, OSError,
)
DEFAULT_MAX_BYTES = 20 << 30
# `get()` hands out a path that its caller opens a moment later: a blob used (or written) this recently
# is never evicted, so that moment cannot lose the file. Once opened, an unlink no longer matters on Linux.
RECENT_USE_SECONDS = 120.0
# Temporary files of writers that died (a crash between mkstemp and rename) are swept after this long.
_STALE_TEMP_SECONDS = 24 * 3600.0
_LOCK_NAME = ".lock"
_STAGING = ".staging"


@dataclass(frozen=True)
class Trimmed:
    """What one eviction pass found and removed."""

    before: int  # bytes held before the pass
    after: int
    removed: int  # blobs unlinked


class BlobStore:
    """Content-addressed files. A blob is only ever renamed into place after its digest was verified,
    so presence with the right size means verified content.

    Shared by every worker process of a host. Use is recorded in the file's mtime (set on each hit);
    with `max_bytes` > 0, adding a blob evicts the least recently used ones until the store fits. An
    evictor holds an exclusive `flock` on `<root>/.lock`; a hit holds it shared while it records its
    use, so no pass can remove a blob between being found and being marked as just used.
    """

    def __init__(self, root: Path, *, max_bytes: int = 0, recent_seconds: float = RECENT_USE_SECONDS) -> None:
        self.root = Path(root)
        self.max_bytes = max_bytes
        self.recent_seconds = recent_seconds

    def path(self, digest: Digest | str) -> Path:
        """Where a blob lives; the digest is validated first, so it can never name another path."""
        d = digest if isinstance(digest, Digest) else Digest.parse(digest)
        return self.root / d.algorithm / d.hex

    def get(self, descriptor: Descriptor) -> Path | None:
        """The cached file for `descriptor` (its use recorded), or None if absent or of the wrong size.

        The path stays valid for `recent_seconds`; callers that keep a blob longer use `open()`.
        """
        path = self.path(descriptor.digest)
        with self._lock(fcntl.LOCK_SH):
            try:
                if path.stat().st_size != descriptor.size:
                    return None
                os.utime(path)
            except FileNotFoundError:
                return None
        return path

    def open(self, descriptor: Descriptor) -> BinaryIO | None:
        """The cached blob as an open file (it outlives any later eviction), or None on a miss."""
        path = self.path(descriptor.digest)
        with self._lock(fcntl.LOCK_SH):
            try:
                f = path.open("rb")
            except FileNotFoundError:
                return None
            if os.fstat(f.fileno()).st_size != descriptor.size:
                f.close()
                return None
            os.utime(path)
        return f

    def add_bytes(self, data: bytes, digest: Digest) -> Path:
        """Store small content (a config, a manifest) after checking it hashes to `digest`."""
        verify_bytes(data, digest)
        dest = self.path(digest)
        # Two workers caching the same blob race harmlessly: both files are verified and identical.
        with atomic_file(dest) as f:
            f.write(data)
        self.trim()
        return dest

    def staging_path(self) -> Path:
        """A fresh name on the store's filesystem for a file that `add_file()` will take in."""
        staging = self.root / _STAGING
        staging.mkdir(parents=True, exist_ok=True)
        return staging / f"{uuid.uuid4().hex}.part"

    def add_file(self, source: Path, descriptor: Descriptor, *, hashed: bool = False) -> Path:
        """Move `source` into the store once its size and digest match `descriptor`; `source` is consumed.

        A mismatch raises `SizeMismatch`/`DigestMismatch` and removes `source`; nothing appears in the store.
        `hashed`: the caller wrote `source` itself and computed the digest from the very bytes it wrote (the
        converter's output layer), so only the size is checked: hashing it again would cost as much as a
        small image's whole pull. Whatever is later pushed from the store is checked by the registry anyway.
        """
        source = Path(source)
        try:
            size = source.stat().st_size
            if size != descriptor.size:
                raise SizeMismatch(f"{source.name} is {size} bytes, the descriptor says {descriptor.size}",
                                   details={"expected": descriptor.size, "actual": size})
            if not hashed and _hex_digest(source, descriptor.digest.algorithm) != descriptor.digest.hex:
                raise DigestMismatch(f"{source.name} does not hash to {descriptor.digest}",
                                     details={"expected": str(descriptor.digest)})
            dest = self.path(descriptor.digest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.replace(source, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                with atomic_file(dest) as out, source.open("rb") as src:
                    shutil.copyfileobj(src, out, _CHUNK)
        finally:
            source.unlink(missing_ok=True)
        self.trim()
        return dest

    def verify(self, descriptor: Descriptor) -> bool:
        """Re-hash a cached blob (for a cache that may have been tampered with); a bad one is removed."""
        path = self.get(descriptor)
        if path is None:
            return False
        if _hex_digest(path, descriptor.digest.algorithm) == descriptor.digest.hex:
            return True
        path.unlink(missing_ok=True)
        return False

    def usage(self) -> int:
        """Bytes held by stored blobs (temporary files of writers in progress not counted)."""
        return sum(size for _, size, _ in self._entries(time.time()))

    def trim(self, max_bytes: int | None = None) -> Trimmed:
        """Evict least recently used blobs until the store holds at most `max_bytes` (default: the store's).

        Blobs used within `recent_seconds` are kept even if that leaves the store above the bound for
        a while: they are in use, and the next pass after they age removes them if still needed.
        """
        limit = self.max_bytes if max_bytes is None else max_bytes
        if limit <= 0:
            return Trimmed(0, 0, 0)
        with self._lock(fcntl.LOCK_EX):
            now = time.time()
            entries = sorted(self._entries(now, sweep=True))
            total = before = sum(size for _, size, _ in entries)
            removed = 0
            for mtime, size, path in entries:
                if total <= limit:
                    break
                if now - mtime < self.recent_seconds:
                    break  # sorted by use: everything after this one is more recent still
                path.unlink(missing_ok=True)
                total -= size
                removed += 1
        return Trimmed(before, total, removed)

    def _entries(self, now: float, *, sweep: bool = False) -> Iterator[tuple[float, int, Path]]:
        """(last use, size, path) of every stored blob; `sweep` also removes writers' stale temporaries."""
        try:
            algorithms = [d for d in os.scandir(self.root) if d.is_dir() and not d.name.startswith(".")]
        except FileNotFoundError:
            return
        staging = self.root / _STAGING
        for directory in [Path(d.path) for d in algorithms] + ([staging] if sweep else []):
            try:
                listing = list(os.scandir(directory))
            except FileNotFoundError:
                continue
            for entry in listing:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if entry.name.startswith(".") or directory == staging:
                    if sweep and now - st.st_mtime > _STALE_TEMP_SECONDS:
                        Path(entry.path).unlink(missing_ok=True)
                    continue
                yield st.st_mtime, st.st_size, Path(entry.path)

    @contextmanager
    def _lock(self, kind: int) -> Iterator[None]:
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, kind)
            yield
        finally:
            os.close(fd)  # closing releases the lock


class LayerReader:
    """The uncompressed tar stream of one layer, hashed as it is read.

    The DiffID is checked at EOF, and `finish()` (called by `__exit__` on success) first drains
    what the consumer did not read: a tar reader stops at its end-of-archive blocks, and bytes after
    them are part of the DiffID too.
    """

    def __init__(self, path: Path | BinaryIO, compression: Compression, diff_id: Digest, *,
                 max_bytes: int | None = None) -> None:
        self.diff_id = diff_id
        self.max_bytes = max_bytes
        self.count = 0
        self._hasher = new_hasher(diff_id.algorithm)
        self._verified = False
        self._file: BinaryIO = open(path, "rb") if isinstance(path, Path) else path  # noqa: SIM115 - closed by close()
        self._stream: IO[bytes]
        try:
            if compression is Compression.GZIP:
                # ISA-L inflates faster than zlib (bench/README.md) and reads the same multi-member streams.
                self._stream = cast(IO[bytes], igzip.GzipFile(fileobj=self._file, mode="rb"))
            elif compression is Compression.ZSTD:
                dctx = zstandard.ZstdDecompressor(max_window_size=_ZSTD_MAX_WINDOW)
                self._stream = cast(IO[bytes], dctx.stream_reader(self._file, read_across_frames=True, closefd=False))
            else:
                self._stream = self._file
        except BaseException:
            self._file.close()
            raise
        self._compression = compression

    def read(self, size: int = -1, /) -> bytes:
        if size is None or size < 0:
            size = _CHUNK
        try:
            data = self._stream.read(size)
        except _DECOMPRESSION_ERRORS as exc:
            raise InvalidLayer(f"corrupt {self._compression.value} layer stream: {exc}",
                               details={"diff_id": str(self.diff_id)}) from exc
        if not data:
            self._check()
            return b""
        self.count += len(data)
        if self.max_bytes is not None and self.count > self.max_bytes:
            raise LimitExceeded(f"layer {self.diff_id} uncompresses to more than {self.max_bytes} bytes",
                                details={"limit": self.max_bytes, "diff_id": str(self.diff_id)})
        self._hasher.update(data)
        return data

    def finish(self) -> Digest:
        """Drain the rest of the stream and raise `DigestMismatch` unless it all hashes to the DiffID."""
        while self.read(_CHUNK):
            pass
        return self.diff_id

    def _check(self) -> None:
        if self._verified:
            return
        actual = Digest(self.diff_id.algorithm, self._hasher.hexdigest())
        if actual != self.diff_id:
            raise DigestMismatch(
                f"layer content hashes to {actual}, the config's diff_id is {self.diff_id}",
                details={"expected": str(self.diff_id), "actual": str(actual), "bytes": self.count},
            )
        self._verified = True

    # file-object protocol, enough for tarfile (stream mode) and shutil
    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.count

    def seek(self, offset: int, whence: int = 0, /) -> int:
        raise OSError("layer streams are not seekable; open tarfile in stream mode ('r|')")

    def write(self, data: bytes, /) -> int:
        raise OSError("layer streams are read-only")

    def close(self) -> None:
        try:
            self._stream.close()
        finally:
            self._file.close()

    @property
    def closed(self) -> bool:
        return self._file.closed

    def __enter__(self) -> LayerReader:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        try:
            if exc_type is None:
                self.finish()
        finally:
            self.close()


def open_layer(path: Path | BinaryIO, media_type: str | Compression, diff_id: Digest, *, max_bytes: int | None = None
               ) -> LayerReader:
    """Open a verified layer blob (a path, or a file object the reader then owns) as its uncompressed tar stream
    (gzip, zstd or none by media type).

    Use as `with open_layer(...) as f: tarfile.open(fileobj=f, mode="r|")`: leaving the block
    normally drains and checks the DiffID; `max_bytes` bounds the uncompressed size (a bomb guard).
    """
    if isinstance(media_type, Compression):
        compression = media_type
    else:
        found = LAYER_COMPRESSION.get(media_type)
        if found is None:
            raise UnsupportedMediaType(f"unsupported layer media type {media_type!r}",
                                       details={"media_type": media_type})
        compression = found
    return LayerReader(path if not isinstance(path, str | os.PathLike) else Path(path), compression, diff_id,
                       max_bytes=max_bytes)


def _hex_digest(path: Path, algorithm: str) -> str:
    hasher = new_hasher(algorithm)
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            hasher.update(chunk)
    return hasher.hexdigest()
