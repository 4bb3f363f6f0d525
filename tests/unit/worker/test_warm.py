"""Warming a worker (worker/pipeline/warm.py) fills the per-process memos a conversion then hits."""
from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from common.enclave.prefix import PREFIXES
from common.image.compress import DEFLATED, GZIP_BLOCK
from tests.fixtures.devblobs import blobs_target, build_dev_blobs
from worker.pipeline.warm import warm


@pytest.fixture(autouse=True)
def empty_memos() -> Iterator[None]:
    PREFIXES.clear()
    DEFLATED.clear()
    yield
    PREFIXES.clear()
    DEFLATED.clear()


def test_warm_measures_the_prefix_and_deflates_the_kernel_blocks() -> None:
    blobs = build_dev_blobs(blobs_target()).dir
    assert warm(blobs)
    kernel = (blobs / "bzImage").stat().st_size
    assert len(PREFIXES) == 1
    # Every 1 MiB block of the layer lying with its 32 KiB dictionary inside the kernel: all but the edges.
    assert kernel // GZIP_BLOCK - 2 <= len(DEFLATED) <= kernel // GZIP_BLOCK


def test_warm_with_unusable_blobs_says_so_and_keeps_nothing(tmp_path: Path) -> None:
    assert not warm(tmp_path)
    assert len(PREFIXES) == 0 and len(DEFLATED) == 0
