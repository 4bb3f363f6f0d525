"""Conversions the kernel's OOM killer ended (the worker's memory cgroup hit its limit): FAILED `resource_limit`.

A pool child killed by the OOM killer gets no chance to say why: Celery sees a lost worker and requeues the message,
and the same image would exhaust the memory again on every attempt until `attempts_exhausted`. So each child notes,
with the build it claimed (worker.lifecycle.note_claim), its pid and its memory cgroup's OOM-kill count. The child
the pool forks to replace a dead one looks at the notes of dead children: a count that has grown since means the
kernel killed for memory, and the build that child ran ends FAILED `resource_limit`, not retried.
"""
from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.settings import Settings
from common.store import builds as buildstore
from common.store.models import Build
from common.store.status import RUNNING, ConversionState
from worker.scratch import reap_dead, scratch_dir

log = logging.getLogger(__name__)
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _memory_events(proc_cgroup: str, root: Path) -> Path | None:
    """The file holding this process's memory cgroup's `oom_kill` count: v2 `memory.events`, v1
    `memory.oom_control`; None when there is no memory cgroup to read."""
    lines = [line.split(":", 2) for line in proc_cgroup.splitlines() if line.count(":") >= 2]
    for _, controllers, rel in lines:
        if controllers == "" and (root / rel.lstrip("/") / "memory.events").exists():
            return root / rel.lstrip("/") / "memory.events"
    for _, controllers, rel in lines:
        if "memory" in controllers.split(","):
            path = root / "memory" / rel.lstrip("/") / "memory.oom_control"
            return path if path.exists() else None
    return None


def oom_kill_count(root: Path = CGROUP_ROOT) -> int | None:
    """How many processes the OOM killer has ended in this process's memory cgroup (None: unknown here)."""
    try:
        events = _memory_events(Path("/proc/self/cgroup").read_text(), root)
        if events is None:
            return None
        for line in events.read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
    except (OSError, ValueError):
        return None
    return None


def note_fields() -> str:
    """What a claim note carries after the build id: this child's pid and the OOM-kill count (`-`: unknown)."""
    count = oom_kill_count()
    return f"{os.getpid()} {'-' if count is None else count}"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def end_oom_killed(s: Settings, session: Session, build_id: uuid.UUID) -> bool:
    """FAILED `resource_limit` for the attempt of `build_id` this host ran (its scratch dir names its lease), if
    it is still the live one; an attempt another worker took over meanwhile is never touched."""
    row = session.execute(select(Build.conversion_state, Build.lease_owner)
                          .where(Build.id == build_id)).one_or_none()
    if row is None or row[1] is None or ConversionState(row[0]) not in RUNNING:
        return False
    state, fence = ConversionState(row[0]), row[1]
    if not scratch_dir(s.state_dir, build_id, fence).exists():
        return False
    return buildstore.end_unsuccessfully(
        session, build_id, state, ConversionState.FAILED, actor=buildstore.worker_actor(fence),
        code="resource_limit", message="the worker ran out of memory during the conversion (killed by the kernel's "
                                       "OOM killer at its memory limit)", fence=fence)


def oom_killed_claims(claims_dir: Path) -> list[tuple[Path, uuid.UUID]]:
    """Notes of dead children that the OOM killer ended (the count grew since they claimed), with their build."""
    now = oom_kill_count()
    if now is None or not claims_dir.is_dir():
        return []
    found = []
    for note in claims_dir.iterdir():
        try:
            build, pid, count = note.read_text().split()
            if count == "-" or _alive(int(pid)) or now <= int(count):
                continue
            found.append((note, uuid.UUID(build)))
        except (OSError, ValueError):
            continue
    return found


def end_oom_killed_attempts(s: Settings, session: Session, found: list[tuple[Path, uuid.UUID]]) -> list[uuid.UUID]:
    """End the builds of `oom_killed_claims`; their notes are consumed."""
    ended = []
    for note, build_id in found:
        if end_oom_killed(s, session, build_id):
            log.warning("resource limit build_id=%s: its pool child was killed by the OOM killer", build_id)
            ended.append(build_id)
        note.unlink(missing_ok=True)
    if ended:
        reap_dead(s.state_dir, session)
    return ended
