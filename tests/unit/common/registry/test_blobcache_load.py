"""The shared blob cache under load: LRU bound, recency on hits, concurrent processes, atomic appearance."""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import DigestMismatch, SizeMismatch
from common.registry.blobcache import BlobStore
from common.registry.digest import Digest
from common.registry.manifests import Descriptor

KIB = 1024


def blob(seed: int, size: int = 64 * KIB) -> tuple[bytes, Descriptor]:
    data = random.Random(seed).randbytes(size)
    return data, Descriptor("application/octet-stream", Digest.of(data), len(data))


def age(store: BlobStore, desc: Descriptor, seconds_ago: float) -> None:
    """Pretend the blob was last used `seconds_ago` (mtime is the store's record of use)."""
    t = time.time() - seconds_ago
    os.utime(store.path(desc.digest), (t, t))


def add_in_order(store: BlobStore, count: int) -> Iterator[Descriptor]:
    """Add blobs 0 … count-1, each one more recently used than the one before; yields each once it is in."""
    for i in range(count):
        data, desc = blob(i)
        store.add_bytes(data, desc.digest)
        age(store, desc, 100 - i)
        yield desc


def test_bound_is_respected_and_oldest_go_first(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=3 * 64 * KIB, recent_seconds=0)
    descs = []
    for desc in add_in_order(store, 6):
        descs.append(desc)
        assert store.usage() <= 3 * 64 * KIB
    assert [store.get(d) is not None for d in descs] == [False, False, False, True, True, True]


def test_a_hit_refreshes_recency(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=3 * 64 * KIB, recent_seconds=0)
    descs = list(add_in_order(store, 3))
    assert store.get(descs[0]) is not None  # the oldest, used now
    data, new = blob(99)
    store.add_bytes(data, new.digest)
    assert store.get(descs[1]) is None  # the least recently used went
    assert store.get(descs[0]) is not None and store.get(descs[2]) is not None and store.get(new) is not None


def test_recently_used_blobs_are_not_evicted_and_zero_means_unbounded(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=64 * KIB)  # default grace: everything just added is in use
    for i in range(3):
        data, desc = blob(i)
        store.add_bytes(data, desc.digest)
    assert store.usage() == 3 * 64 * KIB
    assert store.trim(64 * KIB).removed == 0
    unbounded = BlobStore(tmp_path, max_bytes=0, recent_seconds=0)
    assert unbounded.trim().removed == 0 and unbounded.usage() == 3 * 64 * KIB
    assert BlobStore(tmp_path, recent_seconds=0).trim(64 * KIB).after == 64 * KIB


def test_an_open_blob_survives_eviction(tmp_path: Path) -> None:
    store = BlobStore(tmp_path, max_bytes=64 * KIB, recent_seconds=0)
    data, desc = blob(1)
    store.add_bytes(data, desc.digest)
    f = store.open(desc)
    assert f is not None
    age(store, desc, 100)
    other, odesc = blob(2)
    store.add_bytes(other, odesc.digest)
    assert store.get(desc) is None and store.open(desc) is None  # evicted ...
    with f:
        assert f.read() == data  # ... yet the reader that held it reads it whole


def test_add_file_verifies_before_anything_appears(tmp_path: Path) -> None:
    store = BlobStore(tmp_path / "store")
    data, desc = blob(3)
    staged = store.staging_path()
    staged.write_bytes(data[:-1] + b"\0")
    with pytest.raises(DigestMismatch):
        store.add_file(staged, desc)
    assert not staged.exists() and store.get(desc) is None
    staged = store.staging_path()
    staged.write_bytes(data)
    assert store.add_file(staged, desc).read_bytes() == data
    assert not staged.exists()


def test_add_file_of_bytes_the_caller_hashed_checks_the_size_only(tmp_path: Path) -> None:
    """`hashed=True` is for the converter's own output, whose digest was computed as it was written."""
    store = BlobStore(tmp_path / "store")
    data, desc = blob(4)
    staged = store.staging_path()
    staged.write_bytes(data[:-1])
    with pytest.raises(SizeMismatch):
        store.add_file(staged, desc, hashed=True)
    assert not staged.exists() and store.get(desc) is None
    staged = store.staging_path()
    staged.write_bytes(data)
    assert store.add_file(staged, desc, hashed=True).read_bytes() == data
    assert store.verify(desc)


def _worker(root: str, seed: int, rounds: int, max_bytes: int, out: multiprocessing.Queue) -> None:
    # No recency grace: with one, a fast machine touches all 12 blobs within it and nothing is ever evicted
    # (the test then saw no evictions and failed). open() holds the shared lock, so evictions race reads safely.
    store = BlobStore(Path(root), max_bytes=max_bytes, recent_seconds=0)
    rng = random.Random(seed)
    hits = misses = 0
    try:
        for _ in range(rounds):
            data, desc = blob(rng.randrange(12), 32 * KIB)
            f = store.open(desc)
            if f is None:
                misses += 1
                store.add_bytes(data, desc.digest)
                continue
            with f:
                got = f.read()
            # A hit must be the whole verified blob, never a torn or foreign one.
            assert hashlib.sha256(got).hexdigest() == desc.digest.hex, "torn read"
            hits += 1
        out.put(("ok", hits, misses))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, which fails the test
        out.put(("error", repr(exc), 0))


def test_processes_share_add_read_and_evict(tmp_path: Path) -> None:
    max_bytes = 5 * 32 * KIB
    ctx = multiprocessing.get_context("fork")
    out: multiprocessing.Queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), seed, 300, max_bytes, out)) for seed in range(4)]
    for p in procs:
        p.start()
    results = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    assert all(r[0] == "ok" for r in results), results
    assert sum(r[1] for r in results) > 0 and sum(r[2] for r in results) > 12  # both hits and evictions happened
    time.sleep(0.1)
    store = BlobStore(tmp_path, max_bytes=max_bytes, recent_seconds=0.05)
    store.trim()
    assert store.usage() <= max_bytes
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.name.endswith(".part")]
    assert leftovers == []


def _writer(root: str, seeds: list[int]) -> None:
    store = BlobStore(Path(root))
    for seed in seeds:
        data, desc = blob(seed, 2 * 1024 * KIB)
        store.add_bytes(data, desc.digest)


def test_a_blob_never_appears_half_written(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    seeds = list(range(100, 110))
    expected = {blob(s, 2 * 1024 * KIB)[1].digest.hex: blob(s, 2 * 1024 * KIB)[1] for s in seeds}
    writer = ctx.Process(target=_writer, args=(str(tmp_path), seeds))
    writer.start()
    store = BlobStore(tmp_path)
    seen: set[str] = set()

    def look() -> None:
        for hex_, desc in expected.items():
            if hex_ in seen:
                continue
            # Present but short would be a torn write: open() checks the size, so look at the path too.
            path = store.path(desc.digest)
            if path.exists():
                assert path.stat().st_size == desc.size, "a blob appeared before it was whole"
            f = store.open(desc)
            if f is None:
                continue
            with f:
                assert hashlib.sha256(f.read()).hexdigest() == hex_
            seen.add(hex_)

    while writer.is_alive():
        look()
    writer.join()
    look()
    assert len(seen) == len(seeds)
