"""The verified blob cache (`<root>/sha256/<hex>`) and layer streams that check their DiffID after draining."""
from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from types import TracebackType
from typing import IO, BinaryIO, cast

import zstandard

from common.atomicfile import atomic_file
from common.digest import Digest, new_hasher, verify_bytes
from common.errors import DigestMismatch, InvalidLayer, LimitExceeded, UnsupportedMediaType
from common.oci import LAYER_COMPRESSION, Compression, Descriptor

_CHUNK = 1024 * 1024
# zstd lets the producer pick the window; past 128 MiB a frame is a memory bomb rather than a layer.
_ZSTD_MAX_WINDOW = 1 << 27
_DECOMPRESSION_ERRORS: tuple[type[BaseException], ...] = (
    gzip.BadGzipFile, EOFError, zlib.error, zstandard.ZstdError, OSError,
)


class BlobStore:
    """Content-addressed files. A blob is only ever renamed into place after its digest was verified,
    so presence with the right size means verified content."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, digest: Digest | str) -> Path:
        """Where a blob lives; the digest is validated first, so it can never name another path."""
        d = digest if isinstance(digest, Digest) else Digest.parse(digest)
        return self.root / d.algorithm / d.hex

    def get(self, descriptor: Descriptor) -> Path | None:
        """The cached file for `descriptor`, or None if absent or of the wrong size."""
        path = self.path(descriptor.digest)
        try:
            if path.stat().st_size == descriptor.size:
                return path
        except FileNotFoundError:
            pass
        return None

    def add_bytes(self, data: bytes, digest: Digest) -> Path:
        """Store small content (a config, a manifest) after checking it hashes to `digest`."""
        verify_bytes(data, digest)
        dest = self.path(digest)
        # Two workers caching the same blob race harmlessly: both files are verified and identical.
        with atomic_file(dest) as f:
            f.write(data)
        return dest

    def verify(self, descriptor: Descriptor) -> bool:
        """Re-hash a cached blob (for a cache that may have been tampered with); a bad one is removed."""
        path = self.get(descriptor)
        if path is None:
            return False
        hasher = new_hasher(descriptor.digest.algorithm)
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                hasher.update(chunk)
        if hasher.hexdigest() == descriptor.digest.hex:
            return True
        path.unlink(missing_ok=True)
        return False


class LayerReader:
    """The uncompressed tar stream of one layer, hashed as it is read.

    The DiffID is checked at EOF, and `finish()` (called by `__exit__` on success) first drains
    what the consumer did not read: a tar reader stops at its end-of-archive blocks, and bytes after
    them are part of the DiffID too.
    """

    def __init__(self, path: Path, compression: Compression, diff_id: Digest, *, max_bytes: int | None = None
                 ) -> None:
        self.diff_id = diff_id
        self.max_bytes = max_bytes
        self.count = 0
        self._hasher = new_hasher(diff_id.algorithm)
        self._verified = False
        self._file: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._stream: IO[bytes]
        try:
            if compression is Compression.GZIP:
                self._stream = cast(IO[bytes], gzip.GzipFile(fileobj=self._file, mode="rb"))
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


def open_layer(path: Path, media_type: str | Compression, diff_id: Digest, *, max_bytes: int | None = None
               ) -> LayerReader:
    """Open a verified layer blob as its uncompressed tar stream (gzip, zstd or none by media type).

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
    return LayerReader(Path(path), compression, diff_id, max_bytes=max_bytes)
