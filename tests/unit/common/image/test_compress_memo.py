"""Deflated blocks of known ranges reused across streams (common/image/compress.py): the same bytes out as a fresh
compression, only blocks lying with their dictionary inside a range, and content changed behind a key redone."""
from __future__ import annotations

import gzip
import io
from collections.abc import Iterator, Sequence

import pytest

from common.image.compress import (
    DEFLATE_WINDOW,
    DEFLATED,
    GZIP_BLOCK,
    KnownRange,
    open_compressor,
)
from common.util.compression import Compression
from tests.fixtures.samples import sample


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    DEFLATED.clear()
    yield
    DEFLATED.clear()


def gz(data: bytes, known: Sequence[KnownRange] = (), kind: Compression = Compression.GZIP) -> bytes:
    out = io.BytesIO()
    compressor = open_compressor(kind, out, threads=2, known=known)
    for i in range(0, len(data), 700_000):
        compressor.write(data[i:i + 700_000])
    compressor.close()
    return out.getvalue()


# A "kernel" from 1584 (where the EIF's lies in an output layer) for 5.5 blocks, inside a 9-block stream.
START, SIZE = 1584, 5 * GZIP_BLOCK + GZIP_BLOCK // 2
KERNEL = KnownRange(START, SIZE, ("file", "bzImage-1"))


def stream(kernel: bytes, tail_seed: int) -> bytes:
    return sample(START, seed=tail_seed) + kernel + sample(9 * GZIP_BLOCK - START - SIZE, seed=tail_seed + 1)


def test_known_range_blocks_are_deflated_once_and_give_the_same_stream() -> None:
    kernel = sample(SIZE, seed=1)
    first, second = stream(kernel, 10), stream(kernel, 20)  # same kernel, different everything else
    assert gz(first, [KERNEL]) == gz(first)
    # Blocks 1..4 lie in the range with the 32 KiB before them; block 0 and block 5 (the range ends inside it) do not.
    assert len(DEFLATED) == 4
    warm = gz(second, [KERNEL])
    assert warm == gz(second) and gzip.decompress(warm) == second
    assert len(DEFLATED) == 4


def test_a_block_whose_dictionary_leaves_the_range_is_not_memoised() -> None:
    kernel = sample(SIZE, seed=1)
    # The range starts 16 KiB before a block boundary: that block's dictionary reaches outside it.
    shifted = KnownRange(GZIP_BLOCK - DEFLATE_WINDOW // 2, SIZE, "k")
    data = sample(shifted.start, seed=3) + kernel + sample(GZIP_BLOCK, seed=4)
    assert gz(data, [shifted]) == gz(data)
    offsets = sorted(key[1] for key in DEFLATED._entries)  # (key, offset in range, …)
    assert offsets == [GZIP_BLOCK * i + DEFLATE_WINDOW // 2 for i in range(1, 5)]


def test_changed_content_behind_a_key_is_deflated_again() -> None:
    gz(stream(sample(SIZE, seed=1), 10), [KERNEL])
    changed = stream(sample(SIZE, seed=2), 10)  # other bytes, same key: every block's CRC differs
    out = gz(changed, [KERNEL])
    assert out == gz(changed) and gzip.decompress(out) == changed


def test_zstd_ignores_known_ranges() -> None:
    data = stream(sample(SIZE, seed=1), 10)
    assert gz(data, [KERNEL], Compression.ZSTD) == gz(data, (), Compression.ZSTD)
    assert len(DEFLATED) == 0
