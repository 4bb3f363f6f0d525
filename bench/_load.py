"""The load generation api_load.py and system_load.py share: tenants, ApacheBench's closed loop, h2load's paced
offer, percentiles and the CPU of processes (how each works: bench/README.md, api_load.py)."""
from __future__ import annotations

import base64
import http.client
import json
import re
import resource
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

SUBMIT = "/v1/builds/convert-app/nitro-enclaves"


def request(conn: http.client.HTTPConnection, method: str, path: str, body: object = None,
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


def make_tenants(conn: http.client.HTTPConnection, email: str, password: str, count: int, scratch: Path, *,
            input_ref: str = "127.0.0.1:5000/bench/in:1", output_ref: str = "127.0.0.1:5000/bench/out:1"
            ) -> list[Tenant]:
    """`count` accounts of the bench user, each with a session (signed in once per account) selecting it, and
    an app. A session has one selected account (CCM): select_account moves the session that calls it."""
    basic = base64.b64encode(f"{email}:{password}".encode()).decode()
    tenants = []
    for i in range(count):
        status, auth = request(conn, "POST", "/v1/sys/auth", headers={"Authorization": f"Basic {basic}"})
        assert status == 200, auth
        token = auth["access_token"]
        base = {"Authorization": f"Bearer {token}"}
        status, account = request(conn, "POST", "/v1/accounts", {"name": f"bench-{i}"}, base)
        assert status == 200, account
        status, session = request(conn, "POST", f"/v1/sys/session/select_account/{account['acct_id']}",
                                   headers=base)
        assert status == 200, session
        status, app = request(conn, "POST", "/v1/apps", {"name": "bench"}, base)
        assert status == 200, app
        body = {"request": {"app_id": app["app_id"],
                            "input_image": {"name": input_ref,
                                            "auth_config": {"username": "u", "password": "p"}},
                            "output_image": {"name": output_ref},
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


def run_ab(port: int, tenants: list[Tenant], clients: int, seconds: float, scratch: Path, tag: str) -> Run:
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


@dataclass
class Paced:
    latencies_ms: list[float]
    non_2xx: int
    offered: float  # requests per second asked for
    achieved: float  # completed per second over the window
    missing: int  # requests h2load did not complete (refused, timed out)


def run_paced(port: int, tenants: list[Tenant], clients: int, rate: float, seconds: float, scratch: Path) -> Paced:
    """`clients` keep-alive connections that each send one submission every clients/rate seconds (h2load --rps,
    one process per connection, started evenly spread over one period so arrivals are even, not in bursts)."""
    per_client = rate / clients
    count = max(1, round(per_client * seconds))
    procs = []
    for i in range(clients):
        tenant = tenants[i % len(tenants)]
        log = scratch / f"paced-{i}.tsv"
        procs.append((subprocess.Popen(
            ["h2load", "--h1", "-c", "1", "-n", str(count), f"--rps={per_client}", "-T", "30", "--log-file", str(log),
             "-d", str(tenant.body_file), "-H", "Content-Type: application/json",
             "-H", f"Authorization: Bearer {tenant.token}", f"http://127.0.0.1:{port}{SUBMIT}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True), log))
        time.sleep(1 / rate)
    rows: list[tuple[int, int, int]] = []
    for proc, log in procs:
        out, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"h2load failed: {out[-2000:]}")
        rows += [(int(a), int(b), int(c)) for a, b, c in (line.split("\t")[:3] for line in log.read_text().splitlines())]
    if not rows:
        return Paced([], 0, rate, 0.0, clients * count)
    window = (max(start + took for start, _, took in rows) - min(start for start, _, _ in rows)) / 1e6
    return Paced(sorted(took / 1000 for _, _, took in rows), sum(1 for _, status, _ in rows if not 200 <= status < 300),
                 rate, len(rows) / window if window > 0 else float("nan"), clients * count - len(rows))


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    """(p50, p99, mean) of sorted latencies; NaN when there are none."""
    if not latencies:
        return float("nan"), float("nan"), float("nan")
    return (statistics.median(latencies), latencies[max(0, -(-len(latencies) * 99 // 100) - 1)],
            statistics.fmean(latencies))


def cpu_seconds(pids: list[int]) -> float:
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
