"""The process-tree sampler against a real process tree (no sockets): a child holding known memory."""
from __future__ import annotations

import subprocess
import sys
import time

from bench._memory import TreeSampler, sample_tree

MIB = 1 << 20
# A parent that forks a child; the child touches 64 MiB and waits; the parent waits for it.
TREE = """
import os, sys, time
if os.fork() == 0:
    block = bytearray(64 << 20)
    for i in range(0, len(block), 4096):
        block[i] = 1
    print("ready", flush=True)
    time.sleep(30)
    os._exit(0)
os.wait()
"""


def test_sampler_sums_the_tree_and_keeps_the_peak() -> None:
    proc = subprocess.Popen([sys.executable, "-c", TREE], stdout=subprocess.PIPE)
    try:
        with TreeSampler(proc.pid, interval=0.02) as sampler:
            assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
            time.sleep(0.2)
            rss, pss, count = sample_tree(proc.pid)
        assert count == 2
        assert rss >= 64 * MIB and pss >= 64 * MIB
        peak = sampler.peak
        assert peak.samples >= 2 and peak.processes == 2
        assert peak.rss >= 64 * MIB and peak.pss >= 64 * MIB
        assert peak.pss <= peak.rss  # PSS splits what parent and child share; RSS counts it twice
    finally:
        proc.kill()
        proc.wait()


def test_a_gone_process_samples_as_empty() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert sample_tree(proc.pid) == (0, 0, 0)
