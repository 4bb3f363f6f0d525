"""Scratch dir names and the reaper's decision, against a real directory tree and a stand-in lease table."""
from __future__ import annotations

import uuid
from pathlib import Path

from worker.scratch import parse_name, reap, scratch_dir, scratch_root


def test_scratch_name_round_trips_build_and_lease():
    build, fence = uuid.uuid4(), uuid.uuid4()
    path = scratch_dir(Path("/state"), build, fence)
    assert path.parent == scratch_root(Path("/state"))
    assert parse_name(path.name) == (build, fence)


def test_scratch_parse_name_ignores_foreign_entries():
    assert parse_name("lost+found") is None
    assert parse_name(f"{uuid.uuid4()}.not-a-token") is None
    assert parse_name("x.y") is None


def test_scratch_reap_removes_only_dirs_without_a_live_lease(tmp_path: Path):
    live_build, dead_build = uuid.uuid4(), uuid.uuid4()
    live_fence, old_fence, dead_fence = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    live = scratch_dir(tmp_path, live_build, live_fence)
    superseded = scratch_dir(tmp_path, live_build, old_fence)  # an earlier attempt of a build now running again
    dead = scratch_dir(tmp_path, dead_build, dead_fence)
    foreign = scratch_root(tmp_path) / "keep-me"
    for d in (live, superseded, dead, foreign):
        (d / "rootfs").mkdir(parents=True)
        (d / "rootfs" / "f").write_bytes(b"x")
    asked: list[set[uuid.UUID]] = []

    def leases(ids):  # noqa: ANN001, ANN202
        asked.append(set(ids))
        return {(live_build, live_fence)}

    removed = reap(tmp_path, leases)
    assert sorted(removed) == sorted([superseded, dead])
    assert live.exists() and foreign.exists() and not superseded.exists() and not dead.exists()
    assert asked == [{live_build, dead_build}]


def test_scratch_reap_without_a_scratch_root_does_nothing(tmp_path: Path):
    assert reap(tmp_path, lambda ids: set()) == []
