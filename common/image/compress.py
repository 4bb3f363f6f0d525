"""Deterministic parallel compression of a stream: gzip in independent blocks (pigz's scheme, ISA-L's deflate) or
multi-threaded zstd. The bytes out depend on the bytes in and the level, never on the thread count."""
from __future__ import annotations

import collections
import functools
import hashlib
import os
import struct
import zlib
from collections.abc import Hashable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import BinaryIO, Protocol

import zstandard
from isal import isal_zlib

from common.errors import InvalidOptions
from common.util.compression import Compression
from common.util.hashpipe import HashPipe
from common.util.memo import ProcessMemo

# The compressions a written layer may have: every registry client reads gzip; zstd is smaller and faster to make.
OUTPUT_COMPRESSIONS = (Compression.GZIP, Compression.ZSTD)
MEDIA_TYPES = {
    Compression.GZIP: "application/vnd.oci.image.layer.v1.tar+gzip",
    Compression.ZSTD: "application/vnd.oci.image.layer.v1.tar+zstd",
}
# ISA-L level 1: several times zlib level 1's speed for slightly more bytes on an EIF (mostly an uncompressed
# cpio); bench/README.md has the figures.
GZIP_LEVEL = 1
# Each block is deflated on its own, primed with the 32 KiB before it, and ends on a byte boundary (a sync
# flush): the split depends on stream offsets only, so the output is the same with any number of threads.
GZIP_BLOCK = 1 << 20
DEFLATE_WINDOW = 32 << 10
# Level 1: on an EIF, faster than ISA-L's gzip and smaller than it; higher levels cost far more time than they
# save bytes (bench/README.md).
# The multi-threaded mode cuts jobs by level, not by worker count (tests/unit/common/image/test_compress.py).
ZSTD_LEVEL = 1
# gzip header: no name, mtime 0, XFL 0, OS 255 (unknown): nothing about the host or the time.
_GZIP_HEADER = bytes([0x1F, 0x8B, 8, 0, 0, 0, 0, 0, 0, 0xFF])


def parse_compression(value: str) -> Compression:
    """An output layer's compression by name (`gzip` or `zstd`)."""
    try:
        kind = Compression(value.strip().lower())
    except ValueError:
        kind = Compression.NONE
    if kind not in OUTPUT_COMPRESSIONS:
        raise InvalidOptions(f"output compression {value!r} is not one of gzip, zstd",
                             details={"field": "output_compression"})
    return kind


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Compressed:
    size: int
    sha256: str  # hex, of the compressed bytes


class StreamCompressor(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> Compressed: ...

    def abort(self) -> None: ...


class _Sink:
    """Writes to the output file, counting, and hashing in a thread, so the blob digest needs no second read."""

    def __init__(self, out: BinaryIO) -> None:
        self._out, self._sha, self.size = out, HashPipe(hashlib.sha256(), name="nitroconv-blobsha"), 0

    def write(self, data: bytes) -> None:
        self._sha.update(data)
        self.size += len(data)
        self._out.write(data)

    def result(self) -> Compressed:
        return Compressed(self.size, self._sha.finish().hexdigest())

    def abort(self) -> None:
        self._sha.abort()


@dataclass(frozen=True)
class KnownRange:
    """Stream bytes [start, start + size) are the content `key` names, the same in every stream that says so
    (the EIF's kernel in an output layer): their deflated blocks can be reused from an earlier stream."""

    start: int
    size: int
    key: Hashable


# A block deflated: its pieces in order (not joined: a joined copy of each block would be held at the peak
# while the threads work) and the block's CRC-32.
Deflated = tuple[tuple[bytes, ...], int]
# Deflated blocks of known ranges, by (key, block offset in the range, lengths): the kernel's ~12 MiB, once.
DEFLATED: ProcessMemo[Deflated] = ProcessMemo(capacity=256, max_weight=48 << 20,
                                              weigh=lambda entry: sum(map(len, entry[0])))


def _deflate_block(block: bytes, dictionary: bytes) -> Deflated:
    """One block as raw deflate ending in a sync flush, and the block's CRC-32 (ISA-L releases the GIL)."""
    compressor = (isal_zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15, zdict=dictionary) if dictionary
                  else isal_zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15))
    return (compressor.compress(block), compressor.flush(zlib.Z_SYNC_FLUSH)), isal_zlib.crc32(block)


def _deflate_known(key: Hashable, block: bytes, dictionary: bytes) -> Deflated:
    """`_deflate_block` for a block of a known range: reused when the memo holds it with this very CRC-32 (a
    range whose content changed behind its key is deflated again, and the layer's own checks see the rest)."""
    crc = isal_zlib.crc32(block)
    found = DEFLATED.get(key)
    if found is not None and found[1] == crc:
        return found
    result = _deflate_block(block, dictionary)
    DEFLATED.put(key, result)
    return result


class GzipBlocks:
    """A gzip member written in GZIP_BLOCK blocks deflated by `threads` threads, in order.

    At most threads + 1 blocks are in flight (one ready while the threads work: more only adds to the worker's
    peak memory), so memory stays a few MiB whatever the stream's length.
    A block that lies, with its dictionary, inside one of `known` is taken from the memo of earlier streams
    when there (`_deflate_known`): the same bytes, deflated once per process.
    """

    def __init__(self, out: BinaryIO, *, threads: int, known: Sequence[KnownRange] = ()) -> None:
        self._sink = _Sink(out)
        self._sink.write(_GZIP_HEADER)
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="nitroconv-gzip")
        self._limit = max(1, threads) + 1
        self._pending: collections.deque[tuple[Future[Deflated], int]] = collections.deque()
        self._parts: list[memoryview] = []  # held pieces of the next block
        self._held = 0
        self._previous = b""
        self._crc = 0
        self._length = 0
        self._known = tuple(known)
        self._submitted = 0  # stream offset of the next block

    def write(self, data: bytes) -> None:
        if not self._held and len(data) == GZIP_BLOCK:
            self._submit(bytes(data))  # the common case: whole blocks pass without a copy through the buffer
            return
        # Pieces that do not fall on block boundaries are held as views and joined once per block: one copy.
        view = memoryview(data if isinstance(data, bytes) else bytes(data))
        while view:
            take = view[:GZIP_BLOCK - self._held]
            self._parts.append(take)
            self._held += len(take)
            view = view[len(take):]
            if self._held == GZIP_BLOCK:
                self._submit_held()

    def _submit_held(self) -> None:
        block = b"".join(self._parts)
        self._parts.clear()
        self._held = 0
        self._submit(block)

    def _memo_key(self, offset: int, length: int, window: int) -> Hashable | None:
        for known in self._known:
            if known.start <= offset - window and offset + length <= known.start + known.size:
                return known.key, offset - known.start, length, window, GZIP_LEVEL
        return None

    def _submit(self, block: bytes) -> None:
        dictionary = self._previous[-DEFLATE_WINDOW:]
        self._previous = block
        key = self._memo_key(self._submitted, len(block), len(dictionary))
        self._submitted += len(block)
        deflate = _deflate_block if key is None else functools.partial(_deflate_known, key)
        self._pending.append((self._pool.submit(deflate, block, dictionary), len(block)))
        while len(self._pending) > self._limit:
            self._drain_one()

    def _drain_one(self) -> None:
        future, length = self._pending.popleft()
        pieces, crc = future.result()
        self._crc = isal_zlib.crc32_combine(self._crc, crc, length)
        self._length += length
        for piece in pieces:
            self._sink.write(piece)

    def close(self) -> Compressed:
        try:
            if self._held:
                self._submit_held()
            while self._pending:
                self._drain_one()
        finally:
            self._pool.shutdown(wait=True, cancel_futures=True)
        # An empty final block ends the deflate stream; then CRC-32 and length mod 2^32 (RFC 1952).
        self._sink.write(isal_zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, -15).flush(zlib.Z_FINISH))
        self._sink.write(struct.pack("<II", self._crc, self._length & 0xFFFFFFFF))
        return self._sink.result()

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._sink.abort()


class ZstdFrames:
    """zstd in its multi-threaded mode (worker threads inside libzstd), which gives the same frame for any
    worker count; always at least one worker, because the single-threaded mode cuts the stream otherwise."""

    def __init__(self, out: BinaryIO, *, threads: int) -> None:
        self._sink = _Sink(out)
        self._compressor = zstandard.ZstdCompressor(level=ZSTD_LEVEL, threads=max(1, threads)).compressobj()

    def write(self, data: bytes) -> None:
        out = self._compressor.compress(data)
        if out:
            self._sink.write(out)

    def close(self) -> Compressed:
        self._sink.write(self._compressor.flush())
        return self._sink.result()

    def abort(self) -> None:
        self._sink.abort()  # libzstd's workers belong to the compression context, freed with it


def open_compressor(kind: Compression, out: BinaryIO, *, threads: int | None = None,
                    known: Sequence[KnownRange] = ()) -> StreamCompressor:
    """`known`: ranges of the stream whose deflated blocks gzip may reuse (zstd compresses one frame: none)."""
    count = default_threads() if threads is None else threads
    if kind is Compression.ZSTD:
        return ZstdFrames(out, threads=count)
    return GzipBlocks(out, threads=count, known=known)
