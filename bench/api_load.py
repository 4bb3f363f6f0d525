"""API submission throughput and latency: 64 concurrent clients POSTing conversions to the real stack.

Starts its own API under gunicorn (same config as `make up`) on a scratch database and Redis DB, with no
workers consuming, so the figure is the API's: auth, the rate limit, validation, sealing, the quota check,
the Postgres insert and commit, and the Redis publish.

Two phases, the same 64 keep-alive clients and request each time:
  - saturated, for the throughput: a closed loop. Each client sends its next submission as soon as the
    previous answer arrives, for `--seconds` after a `--warmup`. The clients are ApacheBench (`ab`, C,
    event-driven) processes, one per account, so the load generator costs little of the 2 cores it shares
    with the API, Postgres and Redis; its CPU time is printed. Throughput is completed 200s per second.
    Its latencies are printed too, but say little on their own: in a closed loop Little's law makes the mean
    clients / throughput, whatever the service does (300/s with 64 clients is a 213 ms mean).
  - paced, for the latency at the target rate: each client sends one submission every clients / `--rate`
    seconds (h2load --rps, one process per connection, started spread over one period), so the API is
    offered `--rate` (300/s) and a slow answer does not slow the offer down; p50/p99 over every request.

The clients are spread over `--accounts` tenants (each with its own token and app): one tenant's
submissions serialise on its quota lock, which is per account by design. No worker runs, so a drain stands in
for them: every 100 ms one UPDATE moves the bench's QUEUED builds to CANCELLED (its Postgres backend is counted
with the API's). Without it each account piled up ~1,000 QUEUED builds in a run and every quota check counted
them all, which no deployment does (its count stops at the quota, 50 by default; here raised so that nothing
is refused). The rate limiter stays on (at a limit the run cannot reach) so its Redis round trip is part of
the figure.

After the run it prints what a polling client costs the API, one call at a time: the list of an app's 20 builds
(`GET /v1/builds?app_id=…&limit=1000`, as bench/service.py polls) and one build (`GET /v1/builds/<id>`).

    .venv/bin/python bench/api_load.py [--clients 64] [--seconds 20] [--accounts 8] [--rate 300]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from _load import SUBMIT, Tenant, cpu_seconds, make_tenants, percentiles, request, run_ab, run_paced  # noqa: E402


@dataclass
class PollCost:
    builds: int
    list_cpu_ms: float
    list_wall_ms: float
    get_cpu_ms: float
    get_wall_ms: float


def _poll_cost(conn: http.client.HTTPConnection, tenant: Tenant, api_pids: list[int], builds: int = 20,
               calls: int = 200) -> PollCost:
    """What a polling client costs the API: `GET /v1/builds?app_id=…&limit=1000` over an app with `builds`
    builds (bench/service.py polls so), and `GET /v1/builds/<id>`; API CPU and wall time per call, one at a time."""
    auth = {"Authorization": f"Bearer {tenant.token}"}
    status, app = request(conn, "POST", "/v1/apps", {"name": "bench-poll"}, auth)
    assert status == 200, app
    body = json.loads(tenant.body_file.read_text())
    body["request"]["app_id"] = app["app_id"]
    for _ in range(builds):
        status, build = request(conn, "POST", SUBMIT, body, auth)
        assert status == 200, build
    per_call = []
    for path in (f"/v1/builds?app_id={app['app_id']}&limit=1000", f"/v1/builds/{build['build_id']}"):
        for _ in range(calls // 10):  # warm
            request(conn, "GET", path, headers=auth)
        cpu, started = cpu_seconds(api_pids), time.perf_counter()
        for _ in range(calls):
            status, answer = request(conn, "GET", path, headers=auth)
            assert status == 200, answer
        per_call += [1000 * (cpu_seconds(api_pids) - cpu) / calls, 1000 * (time.perf_counter() - started) / calls]
    return PollCost(builds, *per_call)


def _py_spy(out: Path, pids: list[int], seconds: float) -> list[subprocess.Popen[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    return [subprocess.Popen([str(spy), "record", "--gil", "--nonblocking", "-r", "200", "-d", str(int(seconds)),
                              "-f", "raw", "-o", str(out / f"api-{pid}.txt"), "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]


class _Drain:
    """What workers would do to the queue, at no cost to the API: QUEUED builds leave the unfinished states."""

    def __init__(self, db_url: str, every: float = 0.1) -> None:
        import psycopg2

        self._conn = psycopg2.connect(db_url)
        self._conn.autocommit = True
        self._every, self._stop = every, threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-drain", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        with self._conn.cursor() as cur:
            while not self._stop.wait(self._every):
                cur.execute("UPDATE builds SET conversion_state = 'CANCELLED' WHERE conversion_state = 'QUEUED'")

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        if not self._conn.closed:
            self._conn.close()


def _server_pids(gunicorn_pid: int, db_url: str) -> tuple[list[int], list[int]]:
    """(the API's processes, the Postgres backends serving the bench database)."""
    import psutil
    from sqlalchemy import create_engine, text
    from sqlalchemy.engine import make_url

    api = [gunicorn_pid, *(c.pid for c in psutil.Process(gunicorn_pid).children(recursive=True))]
    engine = create_engine(make_url(db_url).set(drivername="postgresql+psycopg2"))
    try:
        with engine.connect() as conn:
            backends = list(conn.execute(text("SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
                                              "AND pid <> pg_backend_pid()")).scalars())
    finally:
        engine.dispose()
    return api, backends


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=8, help="tenants the clients are spread over")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--port", type=int, default=18181)
    parser.add_argument("--api-processes", type=int, default=None)
    parser.add_argument("--api-threads", type=int, default=None)
    parser.add_argument("--rate", type=float, default=300.0,
                        help="submissions per second the paced phase offers (the throughput target)")
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="profile the API workers (GIL holders, raw stacks) during the run into DIR")
    args = parser.parse_args()
    for tool, package in (("ab", "apache2-utils"), ("h2load", "nghttp2-client")):
        if shutil.which(tool) is None:
            print(f"api submissions: skipped, `{tool}` ({package}) is not installed; run deploy/apt-deps.sh")
            return 1

    from common.store.accounts import ensure_admin
    from common.store.engine import (
        create_database_if_missing,
        drop_database,
        engine_for,
        migrate,
        session_scope,
    )

    pg = os.environ.get("NITROCONV_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
    db_url = f"{pg}/nitroconv_bench_{secrets.token_hex(3)}"
    redis_url = os.environ.get("NITROCONV_BENCH_REDIS", "redis://127.0.0.1:6379/10")
    state = Path(tempfile.mkdtemp(prefix="nitroconv-bench-"))
    (state / "pids").mkdir()
    (state / "logs").mkdir()
    password = secrets.token_urlsafe(12)
    create_database_if_missing(db_url)
    migrate(db_url)
    with session_scope(db_url) as session:
        ensure_admin(session, "bench@example.test", password)
    engine_for(db_url).dispose()
    env = {**os.environ, "NITROCONV_DATABASE_URL": db_url, "NITROCONV_REDIS_URL": redis_url,
           "NITROCONV_STATE_DIR": str(state), "NITROCONV_API_ADDR": f"127.0.0.1:{args.port}",
           "NITROCONV_SECRET_KEY": secrets.token_urlsafe(32),
           "NITROCONV_MAX_QUEUED_PER_ACCOUNT": "1000000", "NITROCONV_RATE_LIMIT_PER_MINUTE": "1000000000"}
    if args.api_processes:
        env["NITROCONV_API_PROCESSES"] = str(args.api_processes)
    if args.api_threads:
        env["NITROCONV_API_THREADS"] = str(args.api_threads)
    gunicorn = subprocess.Popen([str(Path(sys.executable).parent / "gunicorn"), "-c", "deploy/gunicorn.conf.py",
                                 "api.app:create_app()"], cwd=REPO, env=env)
    drain: _Drain | None = None
    try:
        conn = None
        for _ in range(150):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
                if request(conn, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert conn is not None
        tenants = make_tenants(conn, "bench@example.test", password, max(1, min(args.accounts, args.clients)), state)
        drain = _Drain(db_url)  # before the warm-up, so its backend is among those measured
        if args.warmup > 0:
            run_ab(args.port, tenants, args.clients, args.warmup, state, "warmup")
        api_pids, pg_pids = _server_pids(gunicorn.pid, db_url)  # the pools are warm after the warm-up
        api_cpu, pg_cpu = cpu_seconds(api_pids), cpu_seconds(pg_pids)
        spies = _py_spy(args.py_spy, api_pids[1:], args.seconds) if args.py_spy else []
        run = run_ab(args.port, tenants, args.clients, args.seconds, state, "run")
        for spy in spies:
            spy.wait(timeout=30)
        api_cpu, pg_cpu = cpu_seconds(api_pids) - api_cpu, cpu_seconds(pg_pids) - pg_cpu
        paced = run_paced(args.port, tenants, args.clients, args.rate, args.seconds, state)
        drain.close()
        poll = _poll_cost(http.client.HTTPConnection("127.0.0.1", args.port, timeout=30), tenants[0], api_pids)
    finally:
        if drain is not None:
            drain.close()
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(timeout=60)
        drop_database(db_url)
        from redis import Redis

        Redis.from_url(redis_url).flushdb()
        shutil.rmtree(state, ignore_errors=True)

    lat = run.latencies_ms
    ok = len(lat) - run.failed - run.non_2xx
    rate = len(lat) / run.wall if run.wall else float("nan")
    p50, p99, mean = percentiles(lat)
    paced_p50, paced_p99, _ = percentiles(paced.latencies_ms)
    print(f"api submissions at {args.clients} keep-alive clients over {len(tenants)} accounts: "
          f"{rate:.0f}/s at most [target >=300/s] {'met' if rate >= 300 else 'NOT MET'}; "
          f"at {paced.offered:.0f}/s p50={paced_p50:.0f}ms p99={paced_p99:.0f}ms [target p99<=150ms] "
          f"{'met' if paced_p99 <= 150 and not paced.non_2xx and not paced.missing else 'NOT MET'}")
    print(f"  paced (h2load, each client one submission every {1000 * args.clients / paced.offered:.0f}ms, evenly "
          f"spread): achieved {paced.achieved:.0f}/s, requests={len(paced.latencies_ms)} non_2xx={paced.non_2xx} "
          f"not completed={paced.missing}")
    print(f"  saturated (ab, closed loop: each client sends again as soon as answered): p50={p50:.0f}ms "
          f"p99={p99:.0f}ms mean={mean:.0f}ms")
    print(f"  requests={len(lat)} accepted={ok} non_2xx={run.non_2xx} failed={run.failed} "
          f"window={run.wall:.1f}s; Little's law check: clients/rate={1000 * args.clients / rate:.0f}ms "
          f"vs mean {mean:.0f}ms; load generator CPU {run.client_cpu:.1f}s of {run.wall * (os.cpu_count() or 1):.0f}s "
          f"({os.cpu_count()} cpus, shared with the API, Postgres and Redis)")
    if lat:
        # Per submission, whatever else the shared machine runs: the cost the throughput figure rests on.
        print(f"  CPU per submission: API {1000 * api_cpu / len(lat):.2f} ms, Postgres backends "
              f"{1000 * pg_cpu / len(lat):.2f} ms, load generator {1000 * run.client_cpu / len(lat):.2f} ms; "
              f"machine load average {os.getloadavg()[0]:.1f}")
    print(f"  a poller's calls (one at a time): list of {poll.builds} builds API CPU {poll.list_cpu_ms:.2f} ms "
          f"({poll.list_wall_ms:.1f} ms wall), one build API CPU {poll.get_cpu_ms:.2f} ms ({poll.get_wall_ms:.1f} ms wall)")
    return 0 if not (run.failed or run.non_2xx or paced.non_2xx or paced.missing) else 1


if __name__ == "__main__":
    raise SystemExit(main())
