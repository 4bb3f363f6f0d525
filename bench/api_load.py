"""API submission throughput and latency: 64 concurrent clients POSTing conversions to the real stack.

Starts its own API under gunicorn (same config as `make up`) on a scratch database and Redis DB, with no
workers consuming, so the figure is the API's: auth, the rate limit, validation, sealing, the quota check,
the Postgres insert and commit, and the Redis publish.

How it is measured: a closed loop. Each of `--clients` keep-alive connections sends its next submission
as soon as the previous answer arrives, for `--seconds` after a `--warmup`. The clients are ApacheBench
(`ab`, C, event-driven) processes, one per account, so the load generator costs little of the 2 cores it
shares with the API, Postgres and Redis; its CPU time is printed. Throughput is completed 202s per second;
p50/p99 are over every request of the measured window. In a closed loop, Little's law ties the two:
mean latency = clients / throughput, so 300/s with 64 clients means a 213 ms mean.

The clients are spread over `--accounts` tenants (each with its own token and app): one tenant's
submissions serialise on its quota lock, which is per account by design. Builds pile up QUEUED (nothing
consumes them), so the per-account quota is raised for the run; the rate limiter stays on (at a limit
the run cannot reach) so its Redis round trip is part of the figure.

    .venv/bin/python bench/api_load.py [--clients 64] [--seconds 20] [--accounts 8]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import re
import resource
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
SUBMIT = "/v1/builds/convert-app/nitro-enclaves"


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, (json.loads(data) if data else {})


@dataclass(frozen=True)
class Tenant:
    token: str
    body_file: Path


def _tenants(conn: http.client.HTTPConnection, email: str, password: str, count: int, scratch: Path) -> list[Tenant]:
    """`count` accounts of the bench user, each with a token scoped to it and an app."""
    basic = base64.b64encode(f"{email}:{password}".encode()).decode()
    status, auth = _request(conn, "POST", "/v1/sys/auth", headers={"Authorization": f"Basic {basic}"})
    assert status == 200, auth
    base = {"Authorization": f"Bearer {auth['access_token']}"}
    tenants = []
    for i in range(count):
        status, account = _request(conn, "POST", "/v1/accounts", {"name": f"bench-{i}"}, base)
        assert status in (200, 201), account
        status, session = _request(conn, "POST", f"/v1/sys/session/select_account/{account['acct_id']}",
                                   headers=base)
        assert status == 200, session
        token = session["access_token"]
        status, app = _request(conn, "POST", "/v1/apps", {"name": "bench"}, {"Authorization": f"Bearer {token}"})
        assert status == 201, app
        body = {"request": {"app_id": app["app_id"],
                            "input_image": {"name": "127.0.0.1:5000/bench/in:1",
                                            "auth_config": {"username": "u", "password": "p"}},
                            "output_image": {"name": "127.0.0.1:5000/bench/out:1"},
                            "converter_options": {"env_vars": ["A=1"]}},
                "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 1024}}
        body_file = scratch / f"body-{i}.json"
        body_file.write_text(json.dumps(body))
        tenants.append(Tenant(token, body_file))
    return tenants


@dataclass
class Run:
    latencies_ms: list[float]
    failed: int
    non_2xx: int
    wall: float
    client_cpu: float


def _ab(port: int, tenants: list[Tenant], clients: int, seconds: float, scratch: Path, tag: str) -> Run:
    """Run one `ab` per tenant at once, `clients` connections in all; every request's time from -g."""
    per = [clients // len(tenants) + (1 if i < clients % len(tenants) else 0) for i in range(len(tenants))]
    procs = []
    started = time.monotonic()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    for i, (tenant, n) in enumerate(zip(tenants, per, strict=True)):
        if n == 0:
            continue
        gnuplot = scratch / f"{tag}-{i}.tsv"
        cmd = ["ab", "-q", "-k", "-c", str(n), "-t", str(seconds), "-n", "100000000", "-s", "30",
               "-g", str(gnuplot), "-p", str(tenant.body_file), "-T", "application/json",
               "-H", f"Authorization: Bearer {tenant.token}", f"http://127.0.0.1:{port}{SUBMIT}"]
        procs.append((subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), gnuplot))
    latencies: list[float] = []
    failed = non_2xx = 0
    for proc, gnuplot in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"ab failed: {out[-2000:]}")
        failed += int(m.group(1)) if (m := re.search(r"Failed requests:\s+(\d+)", out)) else 0
        non_2xx += int(m.group(1)) if (m := re.search(r"Non-2xx responses:\s+(\d+)", out)) else 0
        rows = gnuplot.read_text().splitlines()[1:]
        latencies.extend(float(row.split("\t")[4]) for row in rows if row)
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return Run(sorted(latencies), failed, non_2xx, wall, cpu)


def _cpu_seconds(pids: list[int]) -> float:
    """User+system CPU of these processes so far (those that exited meanwhile count as 0)."""
    import psutil

    total = 0.0
    for pid in pids:
        try:
            times = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        total += times.user + times.system
    return total


def _py_spy(out: Path, pids: list[int], seconds: float) -> list[subprocess.Popen[bytes]]:
    out.mkdir(parents=True, exist_ok=True)
    spy = Path(sys.executable).parent / "py-spy"
    return [subprocess.Popen([str(spy), "record", "--gil", "--nonblocking", "-r", "200", "-d", str(int(seconds)),
                              "-f", "raw", "-o", str(out / f"api-{pid}.txt"), "-p", str(pid)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for pid in pids]


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
    parser.add_argument("--py-spy", type=Path, default=None, metavar="DIR",
                        help="profile the API workers (GIL holders, raw stacks) during the run into DIR")
    args = parser.parse_args()
    if shutil.which("ab") is None:
        print("api submissions: skipped, `ab` (apache2-utils) is not installed; run deploy/apt-deps.sh")
        return 1

    from common.accounts import ensure_admin
    from common.db import create_database_if_missing, drop_database, engine_for, migrate, session_scope

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
    try:
        conn = None
        for _ in range(150):
            try:
                conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=5)
                if _request(conn, "GET", "/healthz")[0] == 200:
                    break
            except OSError:
                time.sleep(0.2)
        assert conn is not None
        tenants = _tenants(conn, "bench@example.test", password, max(1, min(args.accounts, args.clients)), state)
        if args.warmup > 0:
            _ab(args.port, tenants, args.clients, args.warmup, state, "warmup")
        api_pids, pg_pids = _server_pids(gunicorn.pid, db_url)  # the pools are warm after the warm-up
        api_cpu, pg_cpu = _cpu_seconds(api_pids), _cpu_seconds(pg_pids)
        spies = _py_spy(args.py_spy, api_pids[1:], args.seconds) if args.py_spy else []
        run = _ab(args.port, tenants, args.clients, args.seconds, state, "run")
        for spy in spies:
            spy.wait(timeout=30)
        api_cpu, pg_cpu = _cpu_seconds(api_pids) - api_cpu, _cpu_seconds(pg_pids) - pg_cpu
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(timeout=60)
        drop_database(db_url)
        from redis import Redis

        Redis.from_url(redis_url).flushdb()
        shutil.rmtree(state, ignore_errors=True)

    lat = run.latencies_ms
    ok = len(lat) - run.failed - run.non_2xx
    rate = len(lat) / run.wall if run.wall else float("nan")
    p50 = statistics.median(lat) if lat else float("nan")
    p99 = lat[max(0, -(-len(lat) * 99 // 100) - 1)] if lat else float("nan")
    mean = statistics.fmean(lat) if lat else float("nan")
    print(f"api submissions (closed loop, {args.clients} keep-alive clients over {len(tenants)} accounts, ab): "
          f"{rate:.0f}/s p50={p50:.0f}ms p99={p99:.0f}ms mean={mean:.0f}ms "
          f"[targets: >=300/s, p99<=150ms]")
    print(f"  requests={len(lat)} accepted={ok} non_2xx={run.non_2xx} failed={run.failed} "
          f"window={run.wall:.1f}s; Little's law check: clients/rate={1000 * args.clients / rate:.0f}ms "
          f"vs mean {mean:.0f}ms; load generator CPU {run.client_cpu:.1f}s of {run.wall * (os.cpu_count() or 1):.0f}s "
          f"({os.cpu_count()} cpus, shared with the API, Postgres and Redis)")
    if lat:
        # Per submission, whatever else the shared machine runs: the cost the throughput figure rests on.
        print(f"  CPU per submission: API {1000 * api_cpu / len(lat):.2f} ms, Postgres backends "
              f"{1000 * pg_cpu / len(lat):.2f} ms, load generator {1000 * run.client_cpu / len(lat):.2f} ms; "
              f"machine load average {os.getloadavg()[0]:.1f}")
    return 0 if not (run.failed or run.non_2xx) else 1


if __name__ == "__main__":
    raise SystemExit(main())
