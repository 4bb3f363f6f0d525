"""worker.heap against the real glibc of this host: arenas counted by malloc_stats(), freezing by the collector."""
from __future__ import annotations

import subprocess
import sys

# Threads that allocate at the same time (each holds a buffer while the others start), then glibc's own
# count of arenas: malloc_stats() prints one "Arena N:" block per arena on stderr.
_ARENAS = """
import ctypes, sys, threading
from worker import heap
if sys.argv[1] == "limit":
    assert heap.limit_arenas(1)
barrier = threading.Barrier(6)
def work():
    held = [bytearray(1 << 16) for _ in range(64)]
    barrier.wait()
    del held
threads = [threading.Thread(target=work) for _ in range(6)]
for t in threads: t.start()
for t in threads: t.join()
ctypes.CDLL(None).malloc_stats()
"""


def _arenas(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", _ARENAS, mode], capture_output=True, text=True, check=True)
    return sum(line.startswith("Arena ") for line in out.stderr.splitlines())


def test_heap_one_arena_for_every_thread_started_after_the_limit():
    assert _arenas("default") > 1  # the control: glibc's default gives allocating threads arenas of their own
    assert _arenas("limit") == 1


def test_heap_release_and_freeze_in_a_fresh_interpreter():
    # The worker main process's last hook before the pool forks freezes what it made (whatever queues it serves).
    code = ("import gc; from worker import celery_app, heap; assert gc.get_freeze_count() == 0; "
            "celery_app._warm_memos(instance=None); print(gc.get_freeze_count() > 10000); "
            "x = [bytearray(1 << 20) for _ in range(64)]; del x; print(isinstance(heap.release(), bool))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["True", "True"]
