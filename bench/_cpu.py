"""Where a batch's CPU went: user+system seconds of every process on the machine, grouped by role.

Figure 5's speed-up is bounded by the CPU one conversion costs the whole machine (the worker, the
registry receiving the output layer, the API answering polls, Postgres), so the bench prints that cost
per conversion. Processes are sampled before and after; one that started and ended in between is missed.
"""
from __future__ import annotations

from collections import Counter

import psutil

# First match wins: a Celery worker's command line (`python -m worker` or `celery … worker`) also names the
# repository, like the bench's own.
_ROLES = (("celery", "worker"), ("-m worker", "worker"), ("docker-registry", "registry"), ("gunicorn", "api"), ("postgres", "postgres"),
          ("redis-server", "redis"), ("bench/", "bench client"))


def _role(proc: psutil.Process) -> str:
    try:
        line = " ".join(proc.cmdline()) or proc.name()
    except psutil.Error:
        return "other"
    return next((role for key, role in _ROLES if key in line), "other")


def snapshot() -> dict[int, tuple[str, float]]:
    """pid → (role, CPU seconds so far)."""
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter():
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue
        out[proc.pid] = (_role(proc), times.user + times.system)
    return out


def by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]]) -> dict[str, float]:
    """CPU seconds spent between the two snapshots, per role (largest first)."""
    spent: Counter[str] = Counter()
    for pid, (role, cpu) in after.items():
        spent[role] += cpu - before.get(pid, (role, 0.0))[1]
    return dict(spent.most_common())
