"""What this machine is like today, printed before `make bench`'s figures: the rates a conversion's time rests on.

Figures taken on different VMs of the same kind differed by up to 2x; these lines say which kind of day a run
had. The hashes are what PCR0/PCR2 (SHA-384) and the digests (sha256) cost. The page-cache writes are the
other surprise: a VM that hands its free pages back to the host pays a host fault for each such page it
uses again (seen here: 0.27 GB/s into new pages at times, 3-4 GB/s into pages freed a moment before), and
every spool, blob and layer file a conversion or `docker pull` writes lands in new pages (bench/README.md).
"""
from __future__ import annotations

import hashlib
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

_HASH_BYTES = 64 << 20
_WRITE_BYTES = 256 << 20
_BLOCK = 1 << 20


@dataclass(frozen=True)
class Machine:
    cpus: int
    model: str
    sha256_gbs: float
    sha384_gbs: float
    write_gbs: float  # a new file's first write, 1 MiB at a time, into the page cache
    rewrite_gbs: float  # the same again after the first file is deleted: its pages are reused

    def line(self) -> str:
        return (f"machine: {self.cpus} CPUs ({self.model}); sha256 {self.sha256_gbs:.2f} GB/s, "
                f"sha384 {self.sha384_gbs:.2f} GB/s; page-cache writes {self.write_gbs:.2f} GB/s "
                f"(again into freed pages: {self.rewrite_gbs:.2f} GB/s)")


def _model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def _hash_rate(name: str, data: bytes) -> float:
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        hashlib.new(name, data).digest()
        best = min(best, time.perf_counter() - start)
    return len(data) / best / 1e9


def _write_rate(directory: Path, size: int) -> float:
    block = os.urandom(_BLOCK)
    blocks = max(size // _BLOCK, 1)
    fd, name = tempfile.mkstemp(prefix="machine-", suffix=".tmp", dir=directory)
    try:
        start = time.perf_counter()
        with os.fdopen(fd, "wb", buffering=0) as out:
            for _ in range(blocks):
                out.write(block)
        return blocks * _BLOCK / (time.perf_counter() - start) / 1e9
    finally:
        os.unlink(name)


def measure(directory: Path, *, hash_bytes: int = _HASH_BYTES, write_bytes: int = _WRITE_BYTES) -> Machine:
    """About 2 s with the default sizes. `directory` is where the benchmarks write (the state dir), so the same
    filesystem; nothing is left in it."""
    directory.mkdir(parents=True, exist_ok=True)
    data = os.urandom(hash_bytes)
    first = _write_rate(directory, write_bytes)
    return Machine(cpus=os.cpu_count() or 1, model=_model(), sha256_gbs=_hash_rate("sha256", data),
                   sha384_gbs=_hash_rate("sha384", data), write_gbs=first,
                   rewrite_gbs=_write_rate(directory, write_bytes))
