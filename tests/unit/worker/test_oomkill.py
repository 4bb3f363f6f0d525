"""Reading the memory cgroup's OOM-kill count (v1 and v2 layouts) and telling OOM-killed children's claims apart."""
from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest

from worker import oomkill


def _v2(root: Path, kills: int) -> str:
    group = root / "system.slice" / "w.service"
    group.mkdir(parents=True)
    (group / "memory.events").write_text(f"low 0\nhigh 0\nmax 12\noom 2\noom_kill {kills}\noom_group_kill 0\n")
    return "0::/system.slice/w.service\n"


def _v1(root: Path, kills: int) -> str:
    group = root / "memory" / "docker" / "abc"
    group.mkdir(parents=True)
    (group / "memory.oom_control").write_text(f"oom_kill_disable 0\nunder_oom 0\noom_kill {kills}\n")
    return "12:cpu,cpuacct:/docker/abc\n4:memory:/docker/abc\n0::/\n"


@pytest.mark.parametrize("layout", [_v1, _v2])
def test_oom_kill_count_reads_the_own_memory_cgroup(tmp_path: Path, monkeypatch, layout):  # noqa: ANN001
    proc = layout(tmp_path, 3)
    events = oomkill._memory_events(proc, tmp_path)
    assert events is not None and events.exists()
    monkeypatch.setattr(oomkill, "_memory_events", lambda _text, _root: events)
    assert oomkill.oom_kill_count(tmp_path) == 3


def test_no_memory_cgroup_is_unknown(tmp_path: Path):
    assert oomkill._memory_events("0::/\n", tmp_path) is None
    assert oomkill._memory_events("4:memory:/gone\n", tmp_path) is None


def test_only_dead_children_with_a_grown_count_are_oom_killed(tmp_path: Path, monkeypatch):  # noqa: ANN001
    monkeypatch.setattr(oomkill, "oom_kill_count", lambda root=None: 5)
    dead = os.fork()
    if dead == 0:
        os._exit(0)
    os.waitpid(dead, 0)
    claims = tmp_path / "claims"
    claims.mkdir()
    killed, before, alive, unknown = (uuid.uuid4() for _ in range(4))
    (claims / str(uuid.uuid4())).write_text(f"{killed} {dead} 4")  # died, and the count grew since: OOM
    (claims / str(uuid.uuid4())).write_text(f"{before} {dead} 5")  # died otherwise (SIGKILL, hard limit)
    (claims / str(uuid.uuid4())).write_text(f"{alive} {os.getpid()} 1")  # still running
    (claims / str(uuid.uuid4())).write_text(f"{unknown} {dead} -")  # no cgroup to read when it claimed
    (claims / str(uuid.uuid4())).write_text(f"{uuid.uuid4()}")  # an older note without the fields
    assert [b for _, b in oomkill.oom_killed_claims(claims)] == [killed]
