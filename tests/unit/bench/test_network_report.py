"""bench/network.py's pure parts: percentiles, the lines it reads from run-local, and its table."""
from __future__ import annotations

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))  # the bench imports its helpers flat

from bench.network import (  # noqa: E402
    EgressFigures,
    IngressFigures,
    Requests,
    egress_rounds,
    percentile,
    published_port,
    report,
)


def test_percentile_interpolates_between_order_statistics() -> None:
    values = [5.0, 1.0, 4.0, 2.0, 3.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 50) == 3.0
    assert percentile(values, 100) == 5.0
    assert percentile(values, 99) == 4.96
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))


def test_published_port_reads_the_launchers_line_for_that_port_only() -> None:
    line = "nitroconv-run: ingress: 127.0.0.1:41234 -> enclave port 8080\n"
    assert published_port(line, 8080) == 41234
    assert published_port(line, 9090) is None
    assert published_port("P serving", 8080) is None


def test_egress_rounds_times_each_download_and_names_the_failed_ones() -> None:
    lines = ["[    1.2] init: starting", "P loopback 1 rc=0 9.00 9.50", "P egress 1 rc=0 10.50 12.75",
             "noise P egress 2 rc=1 12.80 12.81", "P egress 3 rc=0 12.90 14.90"]
    seconds, failures = egress_rounds(lines, "egress")
    assert seconds == [2.25, 2.0]
    assert failures == ["round 2: wget exited 1"]
    assert egress_rounds(lines, "loopback") == ([0.5], [])


def test_report_compares_each_path_with_the_direct_one() -> None:
    direct = IngressFigures("direct (host loopback)", concurrency=8,
                            serial=Requests(count=4, seconds=0.004, latencies=[0.001] * 4),
                            concurrent=Requests(count=4, seconds=0.002))
    enclave = IngressFigures("enclave (--publish, vsock)", concurrency=8,
                             serial=Requests(count=4, failed=1, seconds=0.03, latencies=[0.01] * 3),
                             concurrent=Requests(count=4, seconds=0.01), inside_seconds=0.4)
    broken = IngressFigures("other", error="not serving")
    egress = [EgressFigures("direct (host wget)", mib=32, seconds=[0.1, 0.2, 0.3]),
              EgressFigures("enclave loopback (no vsock)", mib=32, seconds=[2.0, 2.0]),
              EgressFigures("enclave proxy (http_proxy)", mib=32, seconds=[4.0, 3.0, 5.0]),
              EgressFigures("enclave transparent (REDIRECT)", mib=32, error="round 1: wget exited 1")]
    lines = report([direct, enclave, broken], egress).splitlines()
    assert lines[1].split()[-4:] == ["1.00ms", "1.00ms", "1000", "2000"]
    assert lines[2].split()[-6:] == ["10.00ms", "10.00ms", "100", "400", "(1", "failed)"]
    assert lines[3].endswith("FAILED: not serving")
    assert lines[4] == ("  enclave (--publish, vsock): adds +9.00 ms at p50, +9.00 ms at p99; requests/s 10.0x fewer "
                        "one at a time, 5.0x fewer at 8 at once")
    assert lines[5] == ("  inside the enclave: 50 busybox wget -> httpd on its loopback one at a time, 8.0 ms each "
                        "(mean, a process start each included; no vsock)")
    assert lines[7].split()[-4:] == ["32MiB", "0.20s", "167.8", "3"]
    assert lines[8].split()[-5:] == ["2.00s", "16.8", "2", "(10.0x", "slower)"]
    assert lines[9].endswith("4.00s       8.4         3   (20.0x slower; 0.50x the enclave's loopback)")
    assert lines[10].endswith("FAILED: round 1: wget exited 1")
