"""The output layer's compressors: valid gzip/zstd, the input back exactly, the same bytes for any thread count."""
from __future__ import annotations

import gzip
import hashlib
import io
import random
import subprocess
import threading
from pathlib import Path

import pytest
import zstandard

from common.errors import InvalidOptions
from common.image.compress import (
    GZIP_BLOCK,
    OUTPUT_COMPRESSIONS,
    GzipBlocks,
    open_compressor,
    parse_compression,
)
from common.util.compression import Compression
from tests.fixtures.samples import sample


def compress(kind: Compression, data: bytes, threads: int, piece: int) -> tuple[bytes, str, int]:
    out = io.BytesIO()
    compressor = open_compressor(kind, out, threads=threads)
    for i in range(0, len(data), piece):
        compressor.write(data[i:i + piece])
    result = compressor.close()
    blob = out.getvalue()
    return blob, result.sha256, result.size


# Sizes around the block boundary, an empty stream, and several blocks with a short tail.
SIZES = [0, 1, GZIP_BLOCK - 1, GZIP_BLOCK, GZIP_BLOCK + 1, 3 * GZIP_BLOCK + 12345]


@pytest.mark.parametrize("kind", OUTPUT_COMPRESSIONS)
@pytest.mark.parametrize("size", SIZES)
def test_layercompress_roundtrip_and_digest(kind: Compression, size: int) -> None:
    data = sample(size)
    blob, sha, length = compress(kind, data, threads=2, piece=300_000)
    assert (sha, length) == (hashlib.sha256(blob).hexdigest(), len(blob))
    if kind is Compression.GZIP:
        assert gzip.decompress(blob) == data
    else:
        assert zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read() == data


@pytest.mark.parametrize("kind", OUTPUT_COMPRESSIONS)
def test_layercompress_output_does_not_depend_on_threads_or_write_sizes(kind: Compression) -> None:
    data = sample(5 * GZIP_BLOCK + 777)
    outputs = {compress(kind, data, threads, piece)[0]
               for threads, piece in ((1, GZIP_BLOCK), (2, 65536), (3, 1_000_003), (8, GZIP_BLOCK))}
    assert len(outputs) == 1


def test_layercompress_gzip_uses_blocks_with_dictionary() -> None:
    """Repeated content across a block boundary shrinks: the next block is primed with the previous 32 KiB."""
    rng = random.Random(1)
    chunk = rng.randbytes(16 << 10)
    data = rng.randbytes(GZIP_BLOCK - len(chunk)) + chunk + chunk + rng.randbytes(GZIP_BLOCK - len(chunk))
    blob, _, _ = compress(Compression.GZIP, data, threads=2, piece=GZIP_BLOCK)
    assert len(blob) < len(data) - len(chunk) // 2


@pytest.mark.parametrize("kind", OUTPUT_COMPRESSIONS)
def test_layercompress_command_line_tools_accept_it(kind: Compression, tmp_path: Path) -> None:
    data = sample(2 * GZIP_BLOCK + 5)
    blob, _, _ = compress(kind, data, threads=2, piece=GZIP_BLOCK)
    path = tmp_path / f"layer.{kind.value}"
    path.write_bytes(blob)
    tool = "gzip" if kind is Compression.GZIP else "zstd"
    subprocess.run([tool, "-t", str(path)], check=True, capture_output=True)
    plain = subprocess.run([tool, "-dc", str(path)], check=True, capture_output=True).stdout
    assert plain == data


def test_layercompress_abort_stops_threads() -> None:
    compressor = GzipBlocks(io.BytesIO(), threads=2)
    compressor.write(sample(3 * GZIP_BLOCK))
    compressor.abort()
    assert not [t for t in threading.enumerate() if t.name.startswith(("nitroconv-gzip", "nitroconv-blobsha"))]


def test_layercompress_setting_values() -> None:
    assert parse_compression(" ZSTD ") is Compression.ZSTD
    assert parse_compression("gzip") is Compression.GZIP
    with pytest.raises(InvalidOptions):
        parse_compression("brotli")
    with pytest.raises(InvalidOptions):
        parse_compression("none")  # a layer read may be uncompressed; the one written never is
