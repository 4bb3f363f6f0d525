"""A memory cgroup of the test's own with a hard limit, for a worker to hit it the way a container's or a systemd
unit's MemoryMax= would: the kernel's OOM killer ends a process of the group (SIGKILL), no MemoryError.

Uses cgroup v2 (`memory.max`) where the machine's unified hierarchy has the memory controller, else cgroup v1
(`memory.limit_in_bytes`); the group is made under the test process's own memory cgroup."""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.fixtures.require import skip_or_fail


@dataclass(frozen=True)
class MemoryGroup:
    path: Path
    v2: bool

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))

    def oom_kills(self) -> int:
        text = (self.path / ("memory.events" if self.v2 else "memory.oom_control")).read_text()
        counts = dict(line.split() for line in text.splitlines() if line.strip())
        return int(counts.get("oom_kill", 0))

    def peak(self) -> int:
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text()) if (self.path / name).exists() else 0


def _own_group() -> tuple[Path, bool] | None:
    lines = [line.split(":", 2) for line in Path("/proc/self/cgroup").read_text().splitlines()]
    unified = Path("/sys/fs/cgroup")
    controllers = unified / "cgroup.controllers"
    if controllers.exists() and "memory" in controllers.read_text().split():
        for _, names, rel in lines:
            if names == "":
                return unified / rel.lstrip("/"), True
    for _, names, rel in lines:
        if "memory" in names.split(","):
            return unified / "memory" / rel.lstrip("/"), False
    return None


@contextmanager
def memory_group(limit: int) -> Iterator[MemoryGroup]:
    found = _own_group()
    if found is None or not os.access(found[0], os.W_OK):
        skip_or_fail("no writable memory cgroup (cgroup v2 memory controller or v1 memory hierarchy) here")
    parent, v2 = found  # type: ignore[misc]
    path = parent / f"nitroconv-test-{uuid.uuid4().hex[:8]}"
    path.mkdir()
    try:
        if v2:
            (path / "memory.max").write_text(str(limit))
            (path / "memory.swap.max").write_text("0")
        else:
            (path / "memory.limit_in_bytes").write_text(str(limit))
            swap = path / "memory.memsw.limit_in_bytes"
            if swap.exists():
                swap.write_text(str(limit))
        yield MemoryGroup(path, v2)
    finally:
        procs = path / "cgroup.procs"
        for pid in procs.read_text().split() if procs.exists() else []:
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        for _ in range(50):
            try:
                path.rmdir()
                break
            except OSError:  # the killed processes are not reaped yet
                time.sleep(0.1)
