"""API submission throughput and latency: 64 concurrent clients POSTing conversions to the real stack.

Starts its own API under gunicorn (same config as `make up`) on a scratch database and Redis DB, with no
workers consuming, so the figure is the API's: validation, sealing, the Postgres insert, the commit and
the Redis publish. Prints submissions/s, p50/p99 latency and the error count.

    .venv/bin/python bench/api_load.py [--clients 64] [--seconds 20]
"""
from __future__ import annotations

import argparse
import base64
import http.client
import json
import multiprocessing as mp
import os
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None,
             headers: dict[str, str] | None = None) -> tuple[int, dict]:
    payload = json.dumps(body).encode() if body is not None else None
    conn.request(method, path, body=payload, headers={"Content-Type": "application/json", **(headers or {})})
    resp = conn.getresponse()
    data = resp.read()
    return resp.status, (json.loads(data) if data else {})


def _client(host: str, port: int, token: str, app_id: str, threads: int, seconds: float, warmup: float,
            queue: mp.Queue) -> None:
    import threading

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    start = time.monotonic() + warmup
    stop = start + seconds
    body = {"request": {"app_id": app_id, "input_image": {"name": "127.0.0.1:5000/bench/in:1",
                                                           "auth_config": {"username": "u", "password": "p"}},
                        "output_image": {"name": "127.0.0.1:5000/bench/out:1"},
                        "converter_options": {"env_vars": ["A=1"]}},
            "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 1024}}
    headers = {"Authorization": f"Bearer {token}"}

    def loop() -> None:
        conn = http.client.HTTPConnection(host, port, timeout=30)
        mine: list[float] = []
        while (now := time.monotonic()) < stop:
            try:
                status, _ = _request(conn, "POST", "/v1/builds/convert-app/nitro-enclaves", body, headers)
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(host, port, timeout=30)
                status = -1
                with lock:
                    errors.append(type(exc).__name__)
            elapsed = time.monotonic() - now
            if now >= start:
                if status == 202:
                    mine.append(elapsed)
                elif status != -1:
                    with lock:
                        errors.append(str(status))
        with lock:
            latencies.extend(mine)

    pool = [threading.Thread(target=loop) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    queue.put((latencies, errors))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--processes", type=int, default=4, help="client processes (the clients' GIL is not the API's)")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--port", type=int, default=18181)
    parser.add_argument("--api-processes", type=int, default=None)
    args = parser.parse_args()

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
           "NITROCONV_SECRET_KEY": secrets.token_urlsafe(32)}
    if args.api_processes:
        env["NITROCONV_API_PROCESSES"] = str(args.api_processes)
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
        basic = base64.b64encode(f"bench@example.test:{password}".encode()).decode()
        status, token = _request(conn, "POST", "/v1/sys/auth", headers={"Authorization": f"Basic {basic}"})
        assert status == 200, token
        headers = {"Authorization": f"Bearer {token['access_token']}"}
        status, app = _request(conn, "POST", "/v1/apps", {"name": "bench"}, headers)
        assert status == 201, app

        queue: mp.Queue = mp.Queue()
        per = max(1, args.clients // args.processes)
        procs = [mp.Process(target=_client, args=("127.0.0.1", args.port, token["access_token"], app["app_id"],
                                                  per, args.seconds, args.warmup, queue))
                 for _ in range(args.processes)]
        for p in procs:
            p.start()
        latencies: list[float] = []
        errors: list[str] = []
        for _ in procs:
            lat, err = queue.get()
            latencies.extend(lat)
            errors.extend(err)
        for p in procs:
            p.join()
    finally:
        gunicorn.send_signal(signal.SIGTERM)
        gunicorn.wait(timeout=60)
        drop_database(db_url)
        from redis import Redis

        Redis.from_url(redis_url).flushdb()

    latencies.sort()
    p50 = statistics.median(latencies) * 1000 if latencies else float("nan")
    p99 = latencies[int(len(latencies) * 0.99) - 1] * 1000 if latencies else float("nan")
    print(f"api submissions: clients={per * args.processes} duration={args.seconds:.0f}s "
          f"accepted={len(latencies)} rate={len(latencies) / args.seconds:.0f}/s "
          f"p50={p50:.1f}ms p99={p99:.1f}ms errors={len(errors)} (cpus={os.cpu_count()})")
    if errors:
        print(f"  error kinds: {sorted(set(errors))[:10]}")
    return 0 if not errors else 1


if __name__ == "__main__":
    raise SystemExit(main())
