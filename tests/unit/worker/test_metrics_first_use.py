"""The worker's metrics are built once however many threads count first (the pull's prefetch threads do)."""
from __future__ import annotations

import subprocess
import sys

# Many threads released together make their first count at once; with an unguarded lazy build two of them
# register the same series and one raises DuplicateTimeseries. A fresh interpreter per round: the metrics
# live in prometheus_client's default registry, built once per process.
_PROGRAM = """
import sys, threading
from worker import metrics
barrier = threading.Barrier(32)
errors = []
def first_count():
    barrier.wait()
    try:
        metrics.record_outcome("succeeded", None)
    except Exception as exc:
        errors.append(repr(exc))
threads = [threading.Thread(target=first_count) for _ in range(32)]
for t in threads:
    t.start()
for t in threads:
    t.join()
from prometheus_client import REGISTRY
total = REGISTRY.get_sample_value("nitroconv_conversions_total", {"outcome": "succeeded", "code": ""})
print(errors[:1], total)
sys.exit(1 if errors or total != 32 else 0)
"""


def test_metrics_first_use_from_many_threads_registers_once() -> None:
    for _ in range(5):
        done = subprocess.run([sys.executable, "-c", _PROGRAM], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stdout + done.stderr
