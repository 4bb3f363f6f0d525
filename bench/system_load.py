"""Figure 4 for the whole system: the API's submissions while real Celery workers on the same machine convert
what is submitted, and drain it.

api_load.py measures the API alone (a SQL drain stands in for the workers). Here the stack is the service's
own (`_stack.py`: a scratch database, a Redis DB, the API under gunicorn, `celery worker` processes with
deploy/up.sh's flags, `NITROCONV_WORKERS` of them sharing one state dir), and a registry of the bench's own holds
the input, a small image (`_small.py`). Every tenant submits the same request, converted once first so the worker
has it (what a CI pipeline re-submitting its image does). Then the same phases as api_load.py with the same
64 keep-alive clients: saturated (ab, closed loop) for the throughput, paced (h2load, 300/s offered) for the
latency, and afterwards the time the workers take to bring every build to an end.

    .venv/bin/python bench/system_load.py [--workers 2] [--clients 64] [--accounts 8] [--seconds 20] [--rate 300]
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

import _cpu  # noqa: E402
from _load import SUBMIT, Tenant, make_tenants, percentiles, request, run_ab, run_paced  # noqa: E402
from _registry import loopback_registry  # noqa: E402
from _small import push_small_images  # noqa: E402
from _stack import ADMIN_EMAIL, scratch_stack  # noqa: E402

UNFINISHED = ("QUEUED", "PULLING", "BUILDING", "MEASURING", "PUSHING")


def _log(message: str) -> None:
    print(f"[system_load] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Ending:
    seconds: float  # from the end of the offered load until no build was unfinished
    states: dict[str, int]
    reused: int  # SUCCEEDED builds that name what they reused (an earlier conversion or an identical one)
    served: int  # of those, builds served by an identical build in flight (they never had an attempt of their own)
    unfinished: int


def _states(database_url: str) -> tuple[dict[str, int], int, int]:
    from sqlalchemy import text

    from common.store.engine import engine_for

    with engine_for(database_url).connect() as conn:
        states: dict[str, int] = {str(state): int(count) for state, count in conn.execute(text(
            "SELECT conversion_state, count(*) FROM builds GROUP BY conversion_state"))}
        reused: int = conn.execute(text(
            "SELECT count(*) FROM builds WHERE conversion_state = 'SUCCEEDED' AND reused_from IS NOT NULL")).scalar_one()
        served: int = conn.execute(text(
            "SELECT count(DISTINCT build_id) FROM build_events WHERE machine = 'conversion' "
            "AND to_state = 'SUCCEEDED' AND reason LIKE 'served by the identical build %'")).scalar_one()
    return states, int(reused), int(served)


def _wait_ended(database_url: str, timeout: float) -> Ending:
    started = time.monotonic()
    while True:
        states, reused, served = _states(database_url)
        unfinished = sum(states.get(s, 0) for s in UNFINISHED)
        if unfinished == 0 or time.monotonic() - started > timeout:
            return Ending(time.monotonic() - started, states, reused, served, unfinished)
        time.sleep(0.25)


def _prime(conn: http.client.HTTPConnection, tenant: Tenant, timeout: float = 300) -> str:
    """One submission converted to the end: the workers' cache then holds the request every client sends."""
    auth = {"Authorization": f"Bearer {tenant.token}"}
    status, build = request(conn, "POST", SUBMIT, json.loads(tenant.body_file.read_text()), auth)
    assert status == 200, build
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, build = request(conn, "GET", f"/v1/builds/{build['build_id']}", headers=auth)
        state = build["conversion"]["state"]
        if state not in UNFINISHED:
            return str(state)
        time.sleep(0.2)
    return "timed out"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=2, help="`celery worker -c 1` processes, as NITROCONV_WORKERS")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--accounts", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--rate", type=float, default=300.0)
    parser.add_argument("--port", type=int, default=18183)
    parser.add_argument("--redis-url", default=os.environ.get("NITROCONV_BENCH_REDIS", "redis://127.0.0.1:6379/15"))
    parser.add_argument("--registry", default=None, metavar="HOST:PORT")
    parser.add_argument("--drain-timeout", type=float, default=300.0)
    args = parser.parse_args()

    state_root = Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state").resolve()
    root = Path(tempfile.mkdtemp(prefix="nitroconv-system-"))
    # As api_load.py: nothing is refused for the quota, so every answer counts (the default quota is 50).
    os.environ["NITROCONV_MAX_QUEUED_PER_ACCOUNT"] = "1000000"
    run_id = secrets.token_hex(3)
    with ExitStack() as stack:
        registry = stack.enter_context(loopback_registry(state_root / "bench" / "registry", args.registry, _log))
        [input_ref] = push_small_images(registry, f"bench/system-{run_id}", ["in"], salt=run_id)
        service = stack.enter_context(scratch_stack(root, registry, args.redis_url, args.port, _log))
        for i in range(args.workers):
            service.start_worker(f"system-w{i}", root / "worker")
        conn = http.client.HTTPConnection("127.0.0.1", args.port, timeout=30)
        tenants = make_tenants(conn, ADMIN_EMAIL, service.admin_password, max(1, min(args.accounts, args.clients)),
                               root, input_ref=input_ref, output_ref=f"{registry}/bench/system-{run_id}:out")
        primed = _prime(conn, tenants[0])
        if primed != "SUCCEEDED":
            print(f"whole system: the first conversion ended {primed}; logs in {root}")
            return 1
        if args.warmup > 0:
            run_ab(args.port, tenants, args.clients, args.warmup, root, "warmup")
        _wait_ended(service.database_url, args.drain_timeout)
        before = _cpu.snapshot()
        run = run_ab(args.port, tenants, args.clients, args.seconds, root, "run")
        saturated_cpu = _cpu.by_role(before, _cpu.snapshot())
        saturated_end = _wait_ended(service.database_url, args.drain_timeout)
        paced = run_paced(args.port, tenants, args.clients, args.rate, args.seconds, root)
        paced_end = _wait_ended(service.database_url, args.drain_timeout)
    if not os.environ.get("NITROCONV_BENCH_KEEP"):
        shutil.rmtree(root, ignore_errors=True)  # kept only when the run broke off (the logs are in it)

    lat = run.latencies_ms
    rate = len(lat) / run.wall if run.wall else float("nan")
    p50, p99, _ = percentiles(lat)
    paced_p50, paced_p99, _ = percentiles(paced.latencies_ms)
    drained = not saturated_end.unfinished and not paced_end.unfinished
    ok_rate = rate >= 300 and not run.failed and not run.non_2xx and drained
    ok_p99 = paced_p99 <= 150 and not paced.non_2xx and not paced.missing and drained
    print(f"whole system ({args.workers} workers converting) at {args.clients} keep-alive clients over "
          f"{len(tenants)} accounts: {rate:.0f}/s at most [target >=300/s] {'met' if ok_rate else 'NOT MET'}; "
          f"at {paced.offered:.0f}/s p50={paced_p50:.0f}ms p99={paced_p99:.0f}ms [target p99<=150ms] "
          f"{'met' if ok_p99 else 'NOT MET'}")
    print(f"  saturated: requests={len(lat)} non_2xx={run.non_2xx} failed={run.failed} p50={p50:.0f}ms "
          f"p99={p99:.0f}ms; the workers ended them all {saturated_end.seconds:.1f}s after the load stopped "
          f"(unfinished then: {saturated_end.unfinished})")
    print(f"  paced: achieved {paced.achieved:.0f}/s, requests={len(paced.latencies_ms)} non_2xx={paced.non_2xx} "
          f"not completed={paced.missing}; ended {paced_end.seconds:.1f}s after the load stopped "
          f"(unfinished then: {paced_end.unfinished})")
    states = ", ".join(f"{k} {v}" for k, v in sorted(paced_end.states.items()))
    print(f"  builds: {states}; of the SUCCEEDED, {paced_end.reused} name the conversion they reused, "
          f"{paced_end.served} of them served by an identical build in flight")
    if lat:
        print("  CPU per submission while saturated: " + ", ".join(
            f"{role} {1000 * cpu / len(lat):.2f} ms" for role, cpu in saturated_cpu.items() if cpu > 0.05))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
