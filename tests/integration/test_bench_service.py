"""bench/service.py end to end on the real stack it starts (Postgres, Redis, registry, API, celery workers).

A smoke run of figure 5 only, with two images a batch: the bench must run, report every conversion as
SUCCEEDED, write its JSON, and leave no scratch database, no Redis keys and no processes behind (its
registry included). The figure's value is a measurement, not asserted (a timing goal is the bench's to print).
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
from redis import Redis
from sqlalchemy import create_engine, text

from tests.fixtures.parallel import redis_db

REPO = Path(__file__).resolve().parents[2]
# Not the service tests' DB: the bench flushes its DB before and after, which would drop the Celery queue
# bindings of a session-scoped worker sharing it; counted down from the top, away from theirs.
REDIS_URL = f"redis://127.0.0.1:6379/{redis_db(int(os.environ.get('NITROCONV_TEST_BENCH_REDIS_DB', '15')), -1)}"
pytestmark = pytest.mark.integration


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _database_exists(name: str) -> bool:
    engine = create_engine("postgresql+psycopg2://postgres@127.0.0.1:5432/postgres")
    try:
        with engine.connect() as conn:
            return conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first() is not None
    finally:
        engine.dispose()


def test_figure_5_runs_through_the_service_and_cleans_up(tmp_path: Path) -> None:
    out = tmp_path / "figures.json"
    port = _free_port()
    proc = subprocess.run([sys.executable, "bench/service.py", "--only", "5", "--repeat", "1", "--small-count", "2",
                           "--redis-url", REDIS_URL, "--port", str(port), "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 small conversions: 1 worker / 2 workers" in proc.stdout

    report = json.loads(out.read_text())
    [figure] = report["figures"]
    assert figure["number"] == 5 and figure["verdict"] in ("met", "not met") and figure["value"] > 0
    batches = report["raw"]["batches"]
    assert [b["workers"] for b in batches] == [1, 2]
    assert all(0 < b["busy_seconds"] <= b["seconds"] * b["workers"] for b in batches)
    conversions = [c for b in batches for c in b["conversions"]]
    assert len(conversions) == 4 and {c["state"] for c in conversions} == {"SUCCEEDED"}
    assert len({c["input_digest"] for c in conversions}) == 4  # distinct images: no cache could serve one

    database = re.search(r"scratch database (nitroconv_bench_\w+)", proc.stderr)
    assert database is not None and not _database_exists(database.group(1))
    assert Redis.from_url(REDIS_URL).dbsize() == 0
    assert _ours() == []
    # SO_REUSEADDR: connections the bench closed may linger in TIME_WAIT; only a listener may not remain.
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))  # the API let go of its port
    # The registry the bench started for its images (on a free port, not the demo's 5000) is gone too.
    started = re.search(r"registry on 127\.0\.0\.1:(\d+) \(pid (\d+)", proc.stderr)
    assert started is not None, proc.stderr[-3000:]
    assert not psutil.pid_exists(int(started.group(2)))
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", int(started.group(1))))


def test_the_whole_system_bench_runs_with_real_workers_and_ends_every_build() -> None:
    """bench/system_load.py, briefly: real workers convert what 8 clients submit; every build ends SUCCEEDED, and
    identical submissions in flight were served by one conversion (what keeps the workers up with the API)."""
    port = _free_port()
    proc = subprocess.run([sys.executable, "bench/system_load.py", "--workers", "1", "--clients", "8", "--accounts",
                           "2", "--seconds", "3", "--warmup", "1", "--rate", "40", "--drain-timeout", "120",
                           "--redis-url", REDIS_URL, "--port", str(port)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "whole system (1 workers converting) at 8 keep-alive clients over 2 accounts" in proc.stdout, proc.stdout
    builds = re.search(r"builds: SUCCEEDED (\d+); of the SUCCEEDED, (\d+) name the conversion they reused, (\d+) of "
                       r"them served by an identical build in flight", proc.stdout)
    assert builds is not None, proc.stdout  # no other end state: nothing failed, nothing left unfinished
    succeeded, reused, served = (int(g) for g in builds.groups())
    assert succeeded > 40 and reused == succeeded - 1, proc.stdout  # only the first was converted afresh
    assert 0 < served < reused, proc.stdout
    assert Redis.from_url(REDIS_URL).dbsize() == 0
    assert _ours() == []


def _ours() -> list[str]:
    """Processes still running with the bench's Redis DB in their environment (its API and workers)."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("NITROCONV_REDIS_URL") == REDIS_URL:
                found.append(" ".join(proc.cmdline()))
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found
