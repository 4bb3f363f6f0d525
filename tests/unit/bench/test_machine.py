"""The `machine:` line make bench prints first: real hashes and real writes, small ones."""
from __future__ import annotations

from pathlib import Path

from bench._machine import measure


def test_measure_gives_every_rate_and_leaves_nothing_behind(tmp_path: Path) -> None:
    state = tmp_path / "state"
    machine = measure(state, hash_bytes=1 << 20, write_bytes=4 << 20)
    assert machine.cpus >= 1
    assert min(machine.sha256_gbs, machine.sha384_gbs, machine.write_gbs, machine.rewrite_gbs) > 0
    assert list(state.iterdir()) == []
    line = machine.line()
    assert line.startswith(f"machine: {machine.cpus} CPUs (")
    assert f"sha384 {machine.sha384_gbs:.2f} GB/s" in line
