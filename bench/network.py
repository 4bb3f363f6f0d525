"""Issue 17's figures: ingress through the vsock path against direct loopback, and egress throughput, in the emulator.

    .venv/bin/python bench/network.py [--requests 400] [--concurrency 8] [--egress-mib 32] [--egress-rounds 3]
                                      [--skip-transparent] [--registry HOST:PORT] [--json FILE]

Two busybox images (deploy/sample_image.py's base layer plus a script) are converted with `convert-local --network`
(the downloader once per egress mode) and booted with `nitroconv run-local` in QEMU's nitro-enclave machine; everything after the conversions runs in a
network namespace of the bench's own (loopback, and one non-loopback address standing for "a host on the
network"), so nothing it listens on or dials is seen by the rest of the machine.

- **Ingress**: busybox `httpd` in the enclave, published with `run-local --publish 127.0.0.1:0:8080` (the launcher's
  TCP listener, vsock to netd, the app on the enclave's loopback), against the same busybox `httpd` on this host's
  loopback. N small GETs (HTTP/1.0, a new connection each, as a load balancer's health checks and most short
  clients): one at a time (latency p50/p99, requests/s), then `--concurrency` at once (requests/s). Before it
  serves, the enclave also times 50 busybox wgets from an httpd on its own loopback (no vsock).
- **Egress**: the enclave's busybox `wget` downloads `--egress-mib` from a busybox `httpd` on that address,
  through egressd's HTTP proxy (`http_proxy`, proxy mode) and through the transparent redirect (transparent mode),
  each an EIF of its own (the mode is part of the measured policy); against the same `wget` on this host, and the
  same download from an `httpd` on the enclave's own loopback (both ends emulated, no vsock: what TCG alone
  allows). The enclave times its downloads with /proc/uptime (10 ms), the host with its monotonic clock.

Figures are printed, not judged. Prints a skip line and exits 0 without the emulator or without root (network
namespaces); exits 1 when a figure could not be measured.
"""
from __future__ import annotations

import argparse
import ctypes
import gzip
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(Path(__file__).resolve().parent)]

from _registry import loopback_registry  # noqa: E402

from common.registry.client import RegistryClient  # noqa: E402
from common.registry.digest import Digest  # noqa: E402
from common.registry.reference import parse_reference  # noqa: E402
from common.settings import Settings  # noqa: E402
from deploy.sample_image import base_layer  # noqa: E402

BUSYBOX = "/bin/busybox"
APP_PORT = 8080
# The non-loopback address and the bulk server's port exist only in the bench's namespace.
BULK_ADDR = "10.254.17.2"
BULK_PORT = 18080
INDEX = b"hello from the enclave\n"
BOOT_SECONDS = 300.0
LOOPBACK_PATH = "enclave loopback (no vsock)"
VCPUS = 2  # run-local's default, and the fewest a Nitro enclave on an x86 instance gets
CLONE_NEWNET = 0x40000000

# Before serving, IN_ENCLAVE_GETS busybox wgets one at a time from an httpd on the enclave's own loopback: the
# requests' cost on the emulated CPU with no vsock in the way (a process start each included). One line: the
# failures, /proc/uptime before and after. One line of shell: argv items cannot hold newlines.
INGRESS_APP = ("mkdir -p /www && printf 'hello from the enclave\\n' > /www/index.html "
               "&& httpd -p 127.0.0.1:8081 -h /www && sleep 1; f=0; i=0; t0=$(cut -d' ' -f1 /proc/uptime); "
               "while [ $i -lt %(gets)d ]; do wget -q -Y off -O /dev/null http://127.0.0.1:8081/ || f=$((f + 1)); "
               "i=$((i + 1)); done; t1=$(cut -d' ' -f1 /proc/uptime); echo \"P inside 1 rc=$f $t0 $t1\"; "
               f"echo P serving && exec httpd -f -p {APP_PORT} -h /www")
IN_ENCLAVE_GETS = 50
# One line per download: what, round, wget's status, /proc/uptime before and after. The same download from an
# httpd inside the enclave first ("loopback"): both ends on the emulated CPU, no vsock, what TCG alone costs.
# busybox wget ignores no_proxy: -Y off keeps that one off the proxy.
EGRESS_APP = """n=$1
fetch() {
  i=1
  while [ $i -le $n ]; do
    t0=$(cut -d' ' -f1 /proc/uptime)
    wget -q -O /dev/null $3 "$2"
    rc=$?
    t1=$(cut -d' ' -f1 /proc/uptime)
    echo "P $1 $i rc=$rc $t0 $t1"
    i=$((i + 1))
  done
}
mkdir -p /tmp/www && head -c %(bytes)d /dev/zero > /tmp/www/bulk
httpd -p 127.0.0.1:%(port)d -h /tmp/www && sleep 1
fetch loopback http://127.0.0.1:%(port)d/bulk "-Y off"
rm -f /tmp/www/bulk
fetch egress http://%(addr)s:%(port)d/bulk
"""

_PUBLISHED = re.compile(r"(\d+\.\d+\.\d+\.\d+):(\d+) -> enclave port (\d+)")
_ROUND_LINE = re.compile(r"P ([a-z]+) (\d+) rc=(\d+) ([0-9.]+) ([0-9.]+)")


# ---- pure: figures and the report ---------------------------------------------------------------------------

def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0–100) by linear interpolation between order statistics (numpy's default)."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q / 100
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass
class Requests:
    """N requests, one at a time (latencies) or concurrently (wall time only counts)."""
    count: int = 0
    failed: int = 0
    seconds: float = float("nan")
    latencies: list[float] = field(default_factory=list)  # seconds, one-at-a-time runs only

    @property
    def per_second(self) -> float:
        return (self.count - self.failed) / self.seconds if self.seconds > 0 else float("nan")

    def ms(self, q: float) -> float:
        return percentile(self.latencies, q) * 1000


@dataclass
class IngressFigures:
    path: str
    serial: Requests = field(default_factory=Requests)
    concurrent: Requests = field(default_factory=Requests)
    concurrency: int = 1
    error: str = ""
    inside_seconds: float | None = None  # IN_ENCLAVE_GETS wgets inside the enclave, all of them


@dataclass
class EgressFigures:
    path: str
    mib: float = 0.0
    seconds: list[float] = field(default_factory=list)
    error: str = ""

    @property
    def mb_per_second(self) -> float:
        """MB/s (10^6 bytes) of the median download."""
        if not self.seconds:
            return float("nan")
        median = statistics.median(self.seconds)
        return self.mib * (1 << 20) / 1e6 / median if median > 0 else float("nan")


def published_port(line: str, port: int) -> int | None:
    """The host port of the launcher's `… HOST:BOUND -> enclave port PORT` line, if this is that line."""
    found = _PUBLISHED.search(line)
    if found is None or int(found.group(3)) != port:
        return None
    return int(found.group(2))


def egress_rounds(lines: Sequence[str], kind: str) -> tuple[list[float], list[str]]:
    """The enclave's download times (seconds) and a description of each failed round, from its `P KIND` lines."""
    seconds: list[float] = []
    failures: list[str] = []
    for line in lines:
        found = _ROUND_LINE.search(line)
        if found is None or found.group(1) != kind:
            continue
        n, rc, t0, t1 = int(found.group(2)), int(found.group(3)), float(found.group(4)), float(found.group(5))
        if rc != 0:
            failures.append(f"round {n}: wget exited {rc}")
        else:
            seconds.append(t1 - t0)
    return seconds, failures


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.1f}x" if b > 0 and a == a and b == b else "-"


def report(ingress: Sequence[IngressFigures], egress: Sequence[EgressFigures]) -> str:
    lines = [f"  {'ingress (small GETs)':34} {'p50':>9} {'p99':>9} {'req/s 1':>9} {'req/s C':>9}"]
    direct = next((f for f in ingress if f.path.startswith("direct") and not f.error), None)
    for f in ingress:
        if f.error:
            lines.append(f"  {f.path:34} FAILED: {f.error}")
            continue
        lines.append(f"  {f.path:34} {f.serial.ms(50):7.2f}ms {f.serial.ms(99):7.2f}ms {f.serial.per_second:9.0f} "
                     f"{f.concurrent.per_second:9.0f}" + (f"   ({f.serial.failed + f.concurrent.failed} failed)"
                                                        if f.serial.failed + f.concurrent.failed else ""))
    for f in ingress:
        if direct is not None and f is not direct and not f.error:
            lines.append(f"  {f.path}: adds {f.serial.ms(50) - direct.serial.ms(50):+.2f} ms at p50, "
                         f"{f.serial.ms(99) - direct.serial.ms(99):+.2f} ms at p99; requests/s "
                         f"{_ratio(direct.serial.per_second, f.serial.per_second)} fewer one at a time, "
                         f"{_ratio(direct.concurrent.per_second, f.concurrent.per_second)} fewer at "
                         f"{f.concurrency} at once")
        if f.inside_seconds is not None:
            each = f.inside_seconds / IN_ENCLAVE_GETS * 1000
            lines.append(f"  inside the enclave: {IN_ENCLAVE_GETS} busybox wget -> httpd on its loopback one at a time, "
                         f"{each:.1f} ms each (mean, a process start each included; no vsock)")
    lines.append(f"  {'egress (bulk download)':34} {'size':>9} {'median':>9} {'MB/s':>9} {'rounds':>9}")
    base = next((e for e in egress if e.path.startswith("direct") and not e.error), None)
    inside = next((e for e in egress if e.path == LOOPBACK_PATH and not e.error), None)
    for e in egress:
        if e.error:
            lines.append(f"  {e.path:34} FAILED: {e.error}")
            continue
        median = statistics.median(e.seconds)
        notes = [f"{_ratio(base.mb_per_second, e.mb_per_second)} slower"] if base and e is not base else []
        if inside is not None and e not in (base, inside):
            notes.append(f"{e.mb_per_second / inside.mb_per_second:.2f}x the enclave's loopback")
        extra = f"   ({'; '.join(notes)})" if notes else ""
        lines.append(f"  {e.path:34} {e.mib:6.0f}MiB {median:8.2f}s {e.mb_per_second:9.1f} "
                     f"{len(e.seconds):9d}{extra}")
    lines.append("  ingress: one new connection per GET; p50/p99 and req/s 1 one at a time, req/s C concurrently; "
                 "egress: MB/s = 10^6 bytes/s of the median round")
    return "\n".join(lines)


# ---- the images ------------------------------------------------------------------------------------------

def _tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(files.items()):
            info = tarfile.TarInfo(name)
            info.mtime, info.mode, info.size = 1_700_000_000, 0o755, len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def push_image(registry: str, repository: str, tag: str, entrypoint: list[str], files: dict[str, bytes]) -> str:
    """busybox plus `files`, with `entrypoint`; returns its reference (plain HTTP)."""
    layers = [base_layer(), _tar(files)]
    blobs = [gzip.compress(t, mtime=0) for t in layers]
    config = json.dumps({
        "architecture": "amd64", "os": "linux",
        "config": {"Entrypoint": entrypoint, "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"]},
        "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}" for t in layers]},
    }, sort_keys=True).encode()
    media_type = "application/vnd.oci.image.manifest.v1+json"
    manifest = {
        "schemaVersion": 2, "mediaType": media_type,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": str(Digest.of(config)),
                   "size": len(config)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": str(Digest.of(b)),
                    "size": len(b)} for b in blobs],
    }
    ref = parse_reference(f"{registry}/{repository}:{tag}")
    with RegistryClient.for_reference(ref, insecure=True) as client:
        for blob in (*blobs, config):
            client.upload_blob(ref.repository, Digest.of(blob), len(blob), partial(io.BytesIO, blob))
        client.put_manifest(ref.repository, tag, media_type, json.dumps(manifest).encode())
    return f"{registry}/{repository}:{tag}"


def _log(message: str) -> None:
    print(f"  .. {message}", file=sys.stderr, flush=True)


def _state_root() -> Path:
    return Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state")


def _nitroconv() -> str:
    return str(Path(sys.executable).parent / "nitroconv")


def _env() -> dict[str, str]:
    root = _state_root()
    return {**os.environ, "NITROCONV_STATE_DIR": str(root),
            "NITROCONV_BLOBS_DIR": os.environ.get("NITROCONV_BLOBS_DIR") or str(root / "blobs"),
            "NITROCONV_RUNTIME_DIR": os.environ.get("NITROCONV_RUNTIME_DIR") or str(root / "runtime")}


def convert(ref: str, registry: str, network: dict[str, object], eif: Path) -> None:
    argv = [_nitroconv(), "convert-local", "--input", ref, "--output", f"{ref}-enclave", "--insecure-registry",
            registry, "--scratch", str(eif.parent), "--network", json.dumps(network), "--eif-out", str(eif)]
    done = subprocess.run(argv, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"convert-local exited {done.returncode}: {done.stderr.strip()[-1500:]}")


# ---- the namespace and the servers ----------------------------------------------------------------------

@contextmanager
def private_network(name: str) -> Iterator[None]:
    """Moves this process into a new network namespace (loopback up, an interface holding BULK_ADDR);
    children started afterwards are in it too. The namespace is deleted on the way out."""
    def ip(*args: str) -> None:
        subprocess.run(["ip", *args], check=True, capture_output=True)

    ip("netns", "add", name)
    try:
        ip("-n", name, "link", "set", "lo", "up")
        # A veth pair with both ends in the namespace: the address is local, as a dummy interface's would be
        # (this machine's kernel has no dummy driver).
        ip("-n", name, "link", "add", "nb0", "type", "veth", "peer", "name", "nb1")
        ip("-n", name, "addr", "add", f"{BULK_ADDR}/24", "dev", "nb0")
        ip("-n", name, "link", "set", "nb0", "up")
        ip("-n", name, "link", "set", "nb1", "up")
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), f"setns {name}")
        finally:
            os.close(fd)
        yield
    finally:
        subprocess.run(["ip", "netns", "del", name], check=False, capture_output=True)


@contextmanager
def busybox_httpd(address: str, root: Path) -> Iterator[None]:
    proc = subprocess.Popen([BUSYBOX, "httpd", "-f", "-p", address, "-h", str(root)], stdin=subprocess.DEVNULL)
    try:
        host, port = address.rsplit(":", 1)
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"busybox httpd on {address} did not start (status {proc.poll()})") from None
                time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait()


# ---- the clients ----------------------------------------------------------------------------------------

def get(port: int) -> float:
    """One GET / on a new connection to 127.0.0.1:port: its seconds from connect to the server's close."""
    start = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    seconds = time.perf_counter() - start
    if not data.startswith(b"HTTP/1.") or b" 200 " not in data.split(b"\r\n", 1)[0] or not data.endswith(INDEX):
        raise OSError(f"unexpected answer {data[:80]!r}")
    return seconds


def serial(port: int, count: int) -> Requests:
    r = Requests(count=count)
    start = time.perf_counter()
    for _ in range(count):
        try:
            r.latencies.append(get(port))
        except OSError:
            r.failed += 1
    r.seconds = time.perf_counter() - start
    return r


def concurrent(port: int, count: int, clients: int) -> Requests:
    r = Requests(count=count)
    left = iter(range(count))
    lock = threading.Lock()

    def client() -> None:
        while True:
            with lock:
                if next(left, None) is None:
                    return
            try:
                get(port)
            except OSError:
                with lock:
                    r.failed += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    r.seconds = time.perf_counter() - start
    return r


def measure_ingress(path: str, port: int, count: int, clients: int) -> IngressFigures:
    figures = IngressFigures(path, concurrency=clients)
    serial(port, min(20, count))  # warm-up: first connections, page cache, the relay's threads
    figures.serial = serial(port, count)
    figures.concurrent = concurrent(port, count, clients)
    if figures.serial.failed == count:
        figures.error = "every request failed"
    return figures


def wget_seconds(url: str) -> float:
    start = time.perf_counter()
    subprocess.run([BUSYBOX, "wget", "-q", "-O", "/dev/null", url], check=True, timeout=600)
    return time.perf_counter() - start


# ---- the enclave runs -----------------------------------------------------------------------------------

class RunLocal:
    """`nitroconv run-local EIF [--publish …]`, its output (stdout and stderr) read as it comes."""

    def __init__(self, eif: Path, publish: list[str]) -> None:
        argv = [_nitroconv(), "run-local", str(eif), "--cpu-count", str(VCPUS),
                *(x for p in publish for x in ("--publish", p))]
        self.proc = subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.lines: list[str] = []
        self.port: int | None = None
        self.serving = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            port = published_port(line, APP_PORT)
            if port is not None:
                self.port = port
            if "P serving" in line:
                self.serving.set()

    def tail(self) -> str:
        return "\n".join(self.lines[-15:])

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.stop()
            raise RuntimeError(f"run-local did not end within {timeout:.0f}s: {self.tail()}") from None
        self.reader.join(5)
        return code

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def enclave_ingress(eif: Path, count: int, clients: int) -> IngressFigures:
    run = RunLocal(eif, [f"127.0.0.1:0:{APP_PORT}"])
    try:
        if not run.serving.wait(BOOT_SECONDS) or run.port is None:
            return IngressFigures("enclave (--publish, vsock)", error=f"not serving: {run.tail()}")
        deadline = time.monotonic() + 60
        while True:  # httpd listens a moment after the line that precedes its exec
            try:
                get(run.port)
                break
            except OSError as exc:
                if time.monotonic() > deadline:
                    return IngressFigures("enclave (--publish, vsock)", error=f"no answer: {exc}: {run.tail()}")
                time.sleep(0.2)
        _log(f"enclave httpd answers on 127.0.0.1:{run.port}")
        figures = measure_ingress("enclave (--publish, vsock)", run.port, count, clients)
        inside, failures = egress_rounds(run.lines, "inside")
        figures.inside_seconds = inside[0] if inside and not failures else None
        return figures
    finally:
        run.stop()


def enclave_egress(path: str, eif: Path, mib: float) -> tuple[EgressFigures, EgressFigures]:
    """(the downloads inside the enclave, those through its egress) of one boot of the downloader."""
    run = RunLocal(eif, [])
    try:
        code = run.wait(BOOT_SECONDS + 600)
    finally:
        run.stop()  # on Ctrl-C or SIGTERM: the enclave is in a session of its own, the signal did not reach it
    found = []
    for kind, label in (("loopback", LOOPBACK_PATH), ("egress", path)):
        figures = EgressFigures(label, mib=mib)
        figures.seconds, failures = egress_rounds(run.lines, kind)
        if failures or not figures.seconds:
            figures.error = "; ".join(failures) or f"no download finished (run-local exited {code}): {run.tail()}"
        found.append(figures)
    return found[0], found[1]


# ---- main -----------------------------------------------------------------------------------------------

@dataclass
class Eifs:
    ingress: Path
    egress: dict[str, Path]


def build_eifs(registry: str, work: Path, rounds: int, mib: int, modes: list[str]) -> Eifs:
    tag = secrets.token_hex(4)
    web = push_image(registry, "bench/network-web", tag,
                     ["/bin/sh", "-c", INGRESS_APP % {"gets": IN_ENCLAVE_GETS}], {})
    script = (EGRESS_APP % {"addr": BULK_ADDR, "port": BULK_PORT, "bytes": mib << 20}).encode()
    dl = push_image(registry, "bench/network-egress", tag, ["/bin/sh", "/app.sh", str(rounds)], {"app.sh": script})
    eifs = Eifs(work / "web.eif", {})
    convert(web, registry, {"ingress": [{"port": APP_PORT}], "egress": {"mode": "none"}}, eifs.ingress)
    for mode in modes:
        eifs.egress[mode] = work / f"egress-{mode}.eif"
        convert(dl, registry, {"ingress": [], "egress": {"mode": mode, "allow": [{"cidr": f"{BULK_ADDR}/32"}]}},
                eifs.egress[mode])
    return eifs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--registry", help="use the registry answering here (default: one of the bench's own)")
    parser.add_argument("--requests", type=int, default=400, help="GETs per ingress run")
    parser.add_argument("--concurrency", type=int, default=8, help="clients of the concurrent ingress run")
    parser.add_argument("--egress-mib", type=int, default=32, help="size of the bulk download")
    parser.add_argument("--egress-rounds", type=int, default=3, help="downloads per egress path")
    parser.add_argument("--skip-transparent", action="store_true", help="egress through the proxy only")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    qemu = Settings.from_env(os.environ).emulator_qemu
    if not os.access(qemu, os.X_OK):
        print(f"network: skipped, no emulator at {qemu} (make emulator builds QEMU's nitro-enclave machine)")
        return 0
    if os.geteuid() != 0:
        print("network: skipped, the bench's network namespace needs root")
        return 0
    if not os.access(BUSYBOX, os.X_OK):
        print(f"network: skipped, no {BUSYBOX} (Debian package busybox-static)")
        return 0
    state = _state_root() / "bench"
    state.mkdir(parents=True, exist_ok=True)
    # SIGTERM unwinds like Ctrl-C: the enclaves, the servers and the namespace are taken down on the way out.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    load = os.getloadavg()  # the figures are only as quiet as the machine
    modes = ["proxy"] if args.skip_transparent else ["proxy", "transparent"]
    work = Path(tempfile.mkdtemp(prefix="network-", dir=state))
    ingress: list[IngressFigures] = []
    egress: list[EgressFigures] = []
    try:
        _log("converting the ingress and egress images")
        with loopback_registry(state / "registry", args.registry, _log) as registry:
            eifs = build_eifs(registry, work, args.egress_rounds, args.egress_mib, modes)
        www = work / "www"
        www.mkdir()
        (www / "index.html").write_bytes(INDEX)
        with (www / "bulk").open("wb") as out:
            chunk = os.urandom(1 << 20)
            for _ in range(args.egress_mib):
                out.write(chunk)
        with private_network(f"nb{os.getpid()}"):
            with busybox_httpd(f"{BULK_ADDR}:{BULK_PORT}", www):
                direct_port = BULK_PORT + 1
                with busybox_httpd(f"127.0.0.1:{direct_port}", www):
                    _log("ingress: direct loopback")
                    ingress.append(measure_ingress("direct (host loopback)", direct_port, args.requests,
                                                   args.concurrency))
                _log("ingress: booting the enclave")
                ingress.append(enclave_ingress(eifs.ingress, args.requests, args.concurrency))
                _log("egress: direct")
                url = f"http://{BULK_ADDR}:{BULK_PORT}/bulk"
                egress.append(EgressFigures("direct (host wget)", mib=args.egress_mib,
                                            seconds=[wget_seconds(url) for _ in range(args.egress_rounds)]))
                inside = EgressFigures(LOOPBACK_PATH, mib=args.egress_mib)
                egress.append(inside)
                for mode in modes:
                    _log(f"egress: {mode}, booting the enclave")
                    path = "enclave proxy (http_proxy)" if mode == "proxy" else "enclave transparent (REDIRECT)"
                    loopback, through = enclave_egress(path, eifs.egress[mode], args.egress_mib)
                    egress.append(through)
                    # Each boot downloads inside the enclave too; one row holds them all.
                    inside.seconds += loopback.seconds
                    inside.error = inside.error or loopback.error
    except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
        print(f"network: could not run: {exc}", file=sys.stderr)
        if ingress or egress:
            print(report(ingress, egress))
        return 1
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"network, in the emulator (QEMU nitro-enclave machine, TCG, {VCPUS} vCPUs); {args.requests} GETs, "
          f"{args.egress_rounds} x {args.egress_mib} MiB; load average {load[0]:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, on {os.cpu_count()} CPUs:")
    print(report(ingress, egress), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({
            "ingress": [{**asdict(f), "p50_ms": f.serial.ms(50), "p99_ms": f.serial.ms(99),
                         "serial_per_second": f.serial.per_second, "concurrent_per_second": f.concurrent.per_second}
                        for f in ingress],
            "egress": [{**asdict(f), "mb_per_second": f.mb_per_second} for f in egress]}, indent=2))
    return 0 if all(not f.error for f in ingress) and all(not f.error for f in egress) else 1


if __name__ == "__main__":
    raise SystemExit(main())
