"""Peak memory of a process tree (a Celery worker: its main process and its pool children), by sampling /proc.

Two figures come out of one sampler, because RSS double-counts what a forked pool child shares with its
parent: the peak of the tree's summed RSS (an upper bound) and the peak of its summed PSS (each shared page
split between the processes mapping it: what the tree really occupies). The caller adds the third view,
`ru_maxrss` from wait4() on the worker (the largest single process, reaped children included).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from types import TracebackType

import psutil


@dataclass
class TreePeak:
    rss: int = 0  # bytes, the largest sum over one sample
    pss: int = 0
    processes: int = 0  # in the sample with the largest RSS
    samples: int = 0


def sample_tree(pid: int) -> tuple[int, int, int]:
    """(summed RSS, summed PSS, process count) of `pid` and its descendants now; processes that exit mid-read are skipped."""
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0, 0, 0
    rss = pss = count = 0
    for proc in procs:
        try:
            info = proc.memory_full_info()  # smaps_rollup: RSS and PSS in one read
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            continue
        rss += info.rss
        pss += info.pss
        count += 1
    return rss, pss, count


class TreeSampler:
    """Samples a tree every `interval` seconds on a thread while the `with` block runs; `peak` holds the maxima."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        self.pid, self.interval = pid, interval
        self.peak = TreePeak()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sample-{pid}", daemon=True)

    def _run(self) -> None:
        while True:
            rss, pss, count = sample_tree(self.pid)
            self.peak.samples += 1
            if rss > self.peak.rss:
                self.peak.rss, self.peak.processes = rss, count
            self.peak.pss = max(self.peak.pss, pss)
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> TreeSampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()
