"""Egress of a converted enclave at process level: the enclave's egressd (worker/runtime/egressd.c, the shipped
binary) in a network namespace with only loopback, the parent's egress service (egress.c) in another, and a
test host in a third, joined to the parent's by a veth pair. The vsock between enclave and parent is a Unix socket
here (egressd --parent-uds, egress --listen-uds); the emulator test takes the real vsock path. Names are the
parent's: its /etc/hosts, bind-mounted in its own mount namespace. Clients run in threads that entered the
enclave's namespace (setns), so they see exactly what a program in the enclave sees: loopback only."""
from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from common.enclave.egress import proxy_env
from common.enclave.network import parse_request
from tests.fixtures.devblobs import RUNTIME_SOURCES, make
from tests.fixtures.require import skip_or_fail

pytestmark = pytest.mark.integration

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
TAG = f"nco{os.getpid() % 100000}"
SUBNET = f"10.{200 + os.getpid() % 50}.{os.getpid() // 50 % 250}"
HOST_A = f"{SUBNET}.2"  # the allowed services
HOST_B = f"{SUBNET}.3"  # a denied address
SUBNET6 = f"fd00:{os.getpid() % 65536:x}"
HOST_6 = f"{SUBNET6}::2"  # the allowed service over IPv6 (proxy mode only: the enclave kernel has no IPv6 NAT)
HOSTS = (f"{HOST_A} allowed.test api.allowed.test www.allowed.test\n"
         f"{HOST_6} six.allowed.test\n"
         f"{HOST_B} denied.test evil.allowed.test\n")


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns {path}")
    finally:
        os.close(fd)


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


class Netns:
    """A named network namespace and a pool of threads living in it."""

    def __init__(self, name: str) -> None:
        self.name = name
        ip("netns", "add", name)
        ip("-n", name, "link", "set", "lo", "up")
        self.pool = ThreadPoolExecutor(max_workers=64, initializer=_setns, initargs=(f"/run/netns/{name}",))

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30) -> Any:
        return self.pool.submit(fn, *args).result(timeout=timeout)

    def close(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True)


class EchoHttp(socketserver.BaseRequestHandler):
    """Answers one request with where it arrived and what was asked; the body never comes back in logs."""

    def handle(self) -> None:
        sock: socket.socket = self.request
        sock.settimeout(10)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(4096)
            if not chunk:
                return
            head += chunk
        first = head.split(b"\r\n", 1)[0].decode()
        local = sock.getsockname()
        body = f"{local[0]}:{local[1]} {first}".encode()
        sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))


class ThreadedServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class ThreadedServer6(ThreadedServer):
    address_family = socket.AF_INET6


@dataclass
class Lab:
    root: Path
    parent_ns: Netns
    svc_ns: Netns
    egressd: Path
    egress: Path
    parent_sock: Path
    parent_log: Path
    servers: list[ThreadedServer] = field(default_factory=list)
    held: list[socket.socket] = field(default_factory=list)

    def start_parent(self, sock: Path, log: Path, *args: str) -> subprocess.Popen[bytes]:
        hosts, resolv = self.root / "hosts", self.root / "resolv.conf"
        script = (f'mount --bind "{hosts}" /etc/hosts && mount --bind "{resolv}" /etc/resolv.conf && '
                  f'exec "{self.egress}" --listen-uds "{sock}" "$@"')
        proc = subprocess.Popen(["ip", "netns", "exec", self.parent_ns.name, "sh", "-c", script, "egress", *args],
                                stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        # Its "listening on" line comes after listen(); the socket file appears at bind(), when a connect is still
        # refused.
        def ready() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"the parent service exited ({proc.returncode}): {log.read_text()}")
            return f"listening on unix socket {sock}" in log.read_text(errors="replace")

        _wait_for(ready, f"the parent's socket {sock}")
        return proc


def _wait_for(cond: Callable[[], bool], what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def nxdomain_server(sock: socket.socket) -> None:
    """The parent's DNS: every name not in its /etc/hosts does not exist."""
    while True:
        try:
            query, peer = sock.recvfrom(4096)
        except OSError:
            return
        if len(query) >= 12:
            sock.sendto(query[:2] + b"\x81\x83" + query[4:6] + b"\0" * 6 + query[12:], peer)


def _slow_peer(listener: socket.socket, held: list[socket.socket]) -> None:
    """Accepts and then neither reads nor writes: a peer that stalls whoever waits on it."""
    while True:
        try:
            conn, _ = listener.accept()
        except OSError:
            return
        held.append(conn)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        skip_or_fail("network namespaces need root and iproute2")
    root = tmp_path_factory.mktemp("egress")
    out = root / "bin"
    make(RUNTIME_SOURCES, f"OUT={out}", f"{out}/egressd", f"{out}/egress")
    (root / "hosts").write_text("127.0.0.1 localhost\n" + HOSTS)
    (root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    parent_ns, svc_ns = Netns(f"{TAG}-par"), Netns(f"{TAG}-svc")
    lab = Lab(root, parent_ns, svc_ns, out / "egressd", out / "egress", root / "parent.sock", root / "parent.log")
    procs = []
    try:
        ip("link", "add", f"{TAG}-p", "netns", parent_ns.name, "type", "veth", "peer", "name", f"{TAG}-s",
            "netns", svc_ns.name)
        ip("-n", parent_ns.name, "addr", "add", f"{SUBNET}.1/24", "dev", f"{TAG}-p")
        ip("-n", parent_ns.name, "addr", "add", f"{SUBNET6}::1/64", "dev", f"{TAG}-p", "nodad")
        ip("-n", parent_ns.name, "link", "set", f"{TAG}-p", "up")
        ip("-n", svc_ns.name, "addr", "add", f"{HOST_A}/24", "dev", f"{TAG}-s")
        ip("-n", svc_ns.name, "addr", "add", f"{HOST_B}/24", "dev", f"{TAG}-s")
        ip("-n", svc_ns.name, "addr", "add", f"{HOST_6}/64", "dev", f"{TAG}-s", "nodad")
        ip("-n", svc_ns.name, "link", "set", f"{TAG}-s", "up")
        server6 = svc_ns.call(ThreadedServer6, (HOST_6, 8080), EchoHttp)
        lab.servers.append(server6)
        threading.Thread(target=server6.serve_forever, daemon=True).start()
        for host, port in ((HOST_A, 8080), (HOST_A, 8081), (HOST_B, 8080)):
            server = svc_ns.call(ThreadedServer, (host, port), EchoHttp)
            lab.servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        slow = svc_ns.call(socket.create_server, (HOST_A, 9009))
        threading.Thread(target=_slow_peer, args=(slow, lab.held), daemon=True).start()
        resolver = parent_ns.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        resolver.bind(("127.0.0.1", 53))
        threading.Thread(target=nxdomain_server, args=(resolver,), daemon=True).start()
        procs.append(lab.start_parent(lab.parent_sock, lab.parent_log))
        yield lab
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(10)
        for server in lab.servers:
            server.shutdown()
            server.server_close()
        for held in lab.held:
            held.close()
        parent_ns.close()
        svc_ns.close()


@dataclass
class Enclave:
    ns: Netns
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")


_counter = iter(range(1000))


@pytest.fixture
def enclave(lab: Lab, tmp_path: Path) -> Iterator[Callable[..., Enclave]]:
    started: list[Enclave] = []

    def start(policy: dict[str, Any], parent_sock: Path | None = None) -> Enclave:
        n = next(_counter)
        path = tmp_path / f"network-{n}.json"
        path.write_text(json.dumps({"egress": policy, "hostname": "app", "ingress": []}, sort_keys=True,
                                   separators=(",", ":")))
        ns = Netns(f"{TAG}-enc{n}")
        log = tmp_path / f"egressd-{n}.log"
        proc = subprocess.Popen(["ip", "netns", "exec", ns.name, str(lab.egressd), "--policy", str(path),
                                 "--parent-uds", str(parent_sock or lab.parent_sock), "--foreground"],
                                stdout=subprocess.DEVNULL, stderr=log.open("wb"))
        enc = Enclave(ns, proc, log)
        started.append(enc)
        if policy["mode"] != "none":
            _wait_for(lambda: ns.call(_listening, 3128), "egressd's proxy")
        return enc

    yield start
    for enc in started:
        if enc.proc.poll() is None:
            enc.proc.terminate()
            enc.proc.wait(10)
        enc.ns.close()


# ---- clients (run in the enclave's namespace) -----------------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _read_all(sock: socket.socket) -> bytes:
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def _response(raw: bytes) -> tuple[int, str]:
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body.decode(errors="replace")


def proxy_get(url: str) -> tuple[int, str]:
    """An absolute-form request through the proxy, as a program with HTTP_PROXY sends one."""
    with socket.create_connection(("127.0.0.1", 3128), timeout=15) as sock:
        host = url.split("/")[2] if "://" in url else "somewhere"
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: {host}\r\nProxy-Connection: keep-alive\r\n\r\n".encode())
        return _response(_read_all(sock))


def proxy_connect(host: str, port: int, path: str = "/") -> tuple[int, str]:
    """A CONNECT tunnel (what HTTPS_PROXY makes), then one plain request through it."""
    with socket.create_connection(("127.0.0.1", 3128), timeout=15) as sock:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = sock.recv(1)
            if not chunk:
                break
            head += chunk
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            return status, _read_all(sock).decode(errors="replace")
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
        return _response(_read_all(sock))


def dns(name: str, qtype: int = 1, tcp: bool = False) -> tuple[int, list[str]]:
    """One query to the stub at 127.0.0.1:53: its RCODE and the A/AAAA addresses answered."""
    query = struct.pack("!HHHHHH", 0x4242, 0x0100, 1, 0, 0, 0)
    query += b"".join(bytes([len(label)]) + label.encode() for label in name.split(".")) + b"\0"
    query += struct.pack("!HH", qtype, 1)
    if tcp:
        with socket.create_connection(("127.0.0.1", 53), timeout=15) as sock:
            sock.sendall(struct.pack("!H", len(query)) + query)
            size = struct.unpack("!H", sock.recv(2))[0]
            answer = b""
            while len(answer) < size:
                answer += sock.recv(size - len(answer))
    else:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(15)
            sock.sendto(query, ("127.0.0.1", 53))
            answer = sock.recv(4096)
    ident, flags, qd, an = struct.unpack("!HHHH", answer[:8])
    assert ident == 0x4242 and flags & 0x8000 and qd == 1
    pos = len(query)
    addrs = []
    for _ in range(an):
        rtype, _cls, _ttl, rdlen = struct.unpack("!HHIH", answer[pos + 2:pos + 12])
        rdata = answer[pos + 12:pos + 12 + rdlen]
        addrs.append(socket.inet_ntop(socket.AF_INET if rtype == 1 else socket.AF_INET6, rdata))
        pos += 12 + rdlen
    return flags & 0xF, addrs


def direct(host: str, port: int) -> str:
    """A program's own TCP connection (transparent mode): the body, or the error's name."""
    try:
        with socket.create_connection((host, port), timeout=15) as sock:
            sock.sendall(f"GET /direct HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
            raw = _read_all(sock)
    except OSError as exc:
        return type(exc).__name__
    return _response(raw)[1] if raw else "EOF"


NOERROR, SERVFAIL, NXDOMAIN = 0, 2, 3

POLICY = {
    "mode": "proxy",
    "allow": [{"host": "allowed.test", "ports": [8080]}, {"host": "*.allowed.test"},
              {"cidr": f"{HOST_A}/32", "ports": ["8081-8082"]}],
    "deny": [{"host": "api.allowed.test"}, {"cidr": f"{HOST_B}/32"}],
}


# ---- a converted busybox program (also booted in the emulator: tests/e2e/test_egress_emulator.py) ----

# busybox nc, not wget (Debian's static busybox wget crashes); the proxy's address comes from the http_proxy the
# converter put in the environment.
BUSYBOX_PROXY_SCRIPT = f"""
p=${{http_proxy#http://}}
get() {{ printf 'GET %s HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' "$1" | nc -w 20 ${{p%:*}} ${{p##*:}} | tr -d '\\r'; }}
echo "P by-name $(get http://allowed.test:8080/by-name | tail -n 1)"
echo "P by-address $(get http://{HOST_A}:8081/by-address | tail -n 1)"
echo "P denied-name $(get http://denied.test:8080/ | head -n 1)"
echo "P denied-address $(get http://{HOST_B}:8080/ | head -n 1)"
nslookup allowed.test 127.0.0.1 >/dev/null 2>&1; echo "P dns-allowed rc=$?"
nslookup denied.test 127.0.0.1 >/dev/null 2>&1; echo "P dns-denied rc=$?"
"""
BUSYBOX_TRANSPARENT_SCRIPT = f"""
get() {{ printf 'GET %s HTTP/1.0\\r\\n\\r\\n' "$3" | nc -w 20 $1 $2 | tr -d '\\r' | tail -n 1; }}
nslookup allowed.test 127.0.0.1 >/dev/null 2>&1; echo "P dns-allowed rc=$?"
echo "P by-name $(get {HOST_A} 8080 /by-name)"
echo "P by-address $(get {HOST_A} 8081 /by-address)"
echo "P denied-address [$(get {HOST_B} 8080 /)]"
nslookup denied.test 127.0.0.1 >/dev/null 2>&1; echo "P dns-denied rc=$?"
echo "P proxy-env [$http_proxy]"
"""
BUSYBOX_POLICY = {"allow": [{"host": "allowed.test", "ports": [8080]}, {"cidr": f"{HOST_A}/32", "ports": [8081]}],
          "deny": [{"cidr": f"{HOST_B}/32"}]}

def check_program_lines(got: dict[str, str], mode: str, context: str) -> None:
    """What the busybox program above printed, in either mode: allowed by name and by address, refused the rest."""
    assert got.get("by-name") == f"{HOST_A}:8080 GET /by-name HTTP/1.0", context
    assert got.get("by-address") == f"{HOST_A}:8081 GET /by-address HTTP/1.0", context
    assert got.get("dns-allowed") == "rc=0" and got.get("dns-denied") != "rc=0", context
    if mode == "proxy":
        assert got.get("denied-name") == got.get("denied-address") == "HTTP/1.1 403 Forbidden", context
    else:
        assert got.get("denied-address") == "[]" and got.get("proxy-env") == "[]", context


# ---- the tests ----------------------------------------------------------------------------------------------


def test_parent_protocol(lab: Lab) -> None:
    """The parent service on its own: R and C lines, and what it refuses."""

    def ask(line: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(15)
            sock.connect(str(lab.parent_sock))
            sock.sendall(line)
            return _read_all(sock) if not line.startswith(b"C ") else sock.recv(64)

    assert ask(b"R allowed.test\n") == f"A {HOST_A}\n".encode()
    assert ask(b"R no-such-name.test\n") == b"ERR dns\n"
    assert ask(f"C {HOST_A} 8080\n".encode()) == b"OK\n"
    assert ask(f"C {HOST_A} 7\n".encode()) == b"ERR refused\n"
    assert ask(b"C allowed.test 8080 extra\n") == b"ERR refused\n"
    assert ask(b"X what\n") == b"ERR refused\n"
    assert ask(b"R " + b"a" * 400 + b"\n") == b"ERR refused\n"


def test_proxy_mode(lab: Lab, enclave: Callable[..., Enclave]) -> None:
    enc = enclave(POLICY)
    call = enc.ns.call
    # By name: a CONNECT tunnel and an absolute-form request, to the address the parent's names give.
    status, body = call(proxy_connect, "allowed.test", 8080, "/secret-path")
    assert (status, body) == (200, f"{HOST_A}:8080 GET /secret-path HTTP/1.1")
    assert call(proxy_get, "http://allowed.test:8080/x?y=1") == (200, f"{HOST_A}:8080 GET /x?y=1 HTTP/1.1")
    assert call(proxy_connect, "www.allowed.test", 8081)[0] == 200  # the wildcard, any port
    # By address: a cidr rule, or the name the address was resolved for.
    assert call(proxy_connect, HOST_A, 8081)[0] == 200
    assert call(proxy_connect, HOST_A, 8080)[0] == 200  # allowed.test resolved to it above
    # Refused: a port the rules do not give, a denied name (deny wins over the wildcard), a name with no rule,
    # a name the parent maps into a denied cidr, a denied address; a name that does not resolve.
    assert call(proxy_connect, "allowed.test", 9999)[0] == 403
    assert call(proxy_connect, "api.allowed.test", 8080)[0] == 403
    assert call(proxy_connect, "denied.test", 8080)[0] == 403
    assert call(proxy_connect, "evil.allowed.test", 8080)[0] == 403
    assert call(proxy_connect, HOST_B, 8080)[0] == 403
    assert call(proxy_get, f"http://{HOST_B}:8080/")[0] == 403
    assert call(proxy_connect, "nothing.allowed.test", 8080)[0] == 502
    # The parent may refuse too (nothing listens there): the program gets a 502, not a hang.
    assert call(proxy_connect, HOST_A, 8082)[0] == 502
    assert call(proxy_get, "/origin-form-is-for-servers")[0] == 400
    # A line per connection on both sides, with what was decided and the bytes; never a payload.
    log = enc.text()
    assert "allowed.test port 9999: refused by policy" in log and f"{HOST_B} port 8080: refused by policy" in log
    assert "bytes out" in log
    parent = lab.parent_log.read_text()
    assert f"connect {HOST_A} port 8080 ({HOST_A}): open" in parent and "bytes in" in parent
    assert f"connect {HOST_B}" not in parent  # refused in the enclave: never asked for
    assert "secret-path" not in log + parent


def test_dns_stub(lab: Lab, enclave: Callable[..., Enclave]) -> None:
    enc = enclave(POLICY)
    call = enc.ns.call
    assert call(dns, "allowed.test") == (NOERROR, [HOST_A])
    assert call(dns, "ALLOWED.test", 1, True) == (NOERROR, [HOST_A])  # over TCP, any case
    assert call(dns, "www.allowed.test") == (NOERROR, [HOST_A])
    assert call(dns, "allowed.test", 28) == (NOERROR, [])  # AAAA: no data (IPv6 goes by name, via the proxy)
    assert call(dns, "denied.test") == (NXDOMAIN, [])
    assert call(dns, "api.allowed.test") == (NXDOMAIN, [])
    assert call(dns, "evil.allowed.test") == (NXDOMAIN, [])  # the parent's answer lies in a denied cidr
    assert call(dns, "denied.test", 28) == (NXDOMAIN, [])
    assert call(dns, "nothing.allowed.test") == (NXDOMAIN, [])
    assert call(dns, "example.com", 1, True) == (NXDOMAIN, [])


def test_transparent_mode(lab: Lab, enclave: Callable[..., Enclave]) -> None:
    enc = enclave({**POLICY, "mode": "transparent"})
    if "transparent egress is off" in enc.text():
        skip_or_fail(f"this kernel cannot take the nat rule: {enc.text()}")
    call = enc.ns.call
    # An address nobody resolved and no cidr rule gives: reset.
    assert call(direct, HOST_A, 8080) == "ConnectionResetError"
    # By name: resolve through the stub, then connect to what it answered.
    assert call(dns, "allowed.test") == (NOERROR, [HOST_A])
    assert call(direct, HOST_A, 8080) == f"{HOST_A}:8080 GET /direct HTTP/1.1"
    # By address (a cidr rule); refused: a denied address, a port no rule gives.
    assert call(direct, HOST_A, 8081) == f"{HOST_A}:8081 GET /direct HTTP/1.1"
    assert call(direct, HOST_B, 8080) == "ConnectionResetError"
    assert call(direct, HOST_A, 9999) == "ConnectionResetError"
    assert call(dns, "denied.test") == (NXDOMAIN, [])
    # Loopback stays loopback: the rule leaves 127.0.0.0/8 alone (the program's own ports, the stub, the proxy).
    assert call(proxy_connect, "allowed.test", 8080)[0] == 200
    assert "transparent" in enc.text() and f"{HOST_B} port 8080: refused by policy" in enc.text()


def test_default_deny_keeps_the_parent_itself_out_of_reach(lab: Lab, enclave: Callable[..., Enclave]) -> None:
    # A service on the parent's own loopback, which egress (leaving from the parent) would otherwise reach.
    server = lab.parent_ns.call(ThreadedServer, ("127.0.0.1", 0), EchoHttp)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        enc = enclave(parse_request({"egress": {"mode": "proxy"}})["egress"])  # what a request saying nothing gets
        call = enc.ns.call
        assert call(proxy_connect, HOST_A, 8080)[0] == 200  # everything else stays allowed
        assert call(proxy_connect, "127.0.0.1", port)[0] == 403
        assert call(proxy_connect, "localhost", port)[0] == 403  # a name the parent maps there, too
        assert call(proxy_connect, "169.254.169.254", 80)[0] == 403  # the instance metadata service
        assert f"connect 127.0.0.1 port {port}" not in lab.parent_log.read_text()  # refused before the parent
        # A request that says `deny` itself replaces the default: then the parent's loopback answers.
        opened = enclave(parse_request({"egress": {"mode": "proxy", "deny": []}})["egress"])
        assert opened.ns.call(proxy_connect, "127.0.0.1", port) == (200, f"127.0.0.1:{port} GET / HTTP/1.1")
    finally:
        server.shutdown()
        server.server_close()


def test_storm_and_slow_peers(lab: Lab, enclave: Callable[..., Enclave]) -> None:
    enc = enclave({"mode": "proxy", "allow": [{"cidr": f"{SUBNET}.0/24"}], "deny": []})

    def hold_slow_tunnel() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", 3128), timeout=15)
        sock.sendall(f"CONNECT {HOST_A}:9009 HTTP/1.1\r\n\r\n".encode())
        assert sock.recv(64).startswith(b"HTTP/1.1 200")
        sock.setblocking(False)
        try:  # fill every buffer on the way: the peer never reads
            while True:
                sock.send(b"x" * 65536)
        except BlockingIOError:
            pass
        return sock

    def hold_silent_client() -> socket.socket:
        return socket.create_connection(("127.0.0.1", 3128), timeout=15)  # sends no request head

    held = [enc.ns.call(hold_slow_tunnel) for _ in range(20)] + [enc.ns.call(hold_silent_client) for _ in range(20)]
    try:
        # 300 tunnels at once, 48 at a time, while those stall: every one gets through.
        futures = [enc.ns.pool.submit(proxy_connect, HOST_A, 8080, f"/storm/{i}") for i in range(300)]
        results = [f.result(timeout=120) for f in futures]
        assert all(status == 200 for status, _ in results), [r for r in results if r[0] != 200][:3]
        start = time.monotonic()
        assert enc.ns.call(proxy_connect, HOST_A, 8080)[0] == 200
        assert enc.ns.call(dns, "allowed.test") == (NOERROR, [HOST_A])
        assert time.monotonic() - start < 5
    finally:
        for sock in held:
            sock.close()


def test_parent_dying_does_not_hang_the_program(lab: Lab, enclave: Callable[..., Enclave], tmp_path: Path) -> None:
    sock, log = tmp_path / "parent2.sock", tmp_path / "parent2.log"
    parent = lab.start_parent(sock, log)
    enc = enclave({"mode": "proxy", "allow": [{"host": "*.test"}, {"cidr": f"{SUBNET}.0/24"}], "deny": []},
                  parent_sock=sock)

    def open_tunnel() -> socket.socket:
        s = socket.create_connection(("127.0.0.1", 3128), timeout=15)
        s.sendall(f"CONNECT {HOST_A}:9009 HTTP/1.1\r\n\r\n".encode())
        assert s.recv(64).startswith(b"HTTP/1.1 200")
        return s

    tunnel = enc.ns.call(open_tunnel)
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(10)
        start = time.monotonic()
        tunnel.settimeout(10)
        try:
            assert tunnel.recv(64) == b""  # the tunnel ends...
        except ConnectionResetError:
            pass
        assert enc.ns.call(proxy_connect, "allowed.test", 8080)[0] == 502  # ...new ones fail at once
        assert enc.ns.call(dns, "www.allowed.test") == (SERVFAIL, [])
        assert time.monotonic() - start < 5
    finally:
        tunnel.close()


@pytest.mark.parametrize("text", ['{"egress":{"mode":"none","allow":[],"deny":[]}}',
                                  '{"egress":{"mode":"proxy","allow":[{"host":"a.test","port":[1]}]}}',
                                  '{"egress":{"mode":"proxy","allow":[{"cidr":"10.0.0.0/33"}]}}',
                                  '{"egress":{"mode":"sideways"}}'])
def test_no_egress_without_a_readable_policy(lab: Lab, tmp_path: Path, text: str) -> None:
    """Mode none, or a policy egressd cannot read in full (an unknown key, a bad cidr, an unknown mode): no
    listener at all, so nothing leaves; the program's connections fail at once rather than hang."""
    path = tmp_path / "network.json"
    path.write_text(text)
    ns = Netns(f"{TAG}-none{next(_counter)}")
    try:
        done = subprocess.run(["ip", "netns", "exec", ns.name, str(lab.egressd), "--policy", str(path),
                               "--parent-uds", str(lab.parent_sock)], capture_output=True, text=True, timeout=30)
        assert done.returncode == 0
        assert ("mode none" in done.stderr) if "none" in text else ("refused" in done.stderr), done.stderr
        assert not ns.call(_listening, 3128) and not ns.call(_listening, 53)
    finally:
        ns.close()


@pytest.mark.parametrize("mode", ["proxy", "transparent"])
def test_busybox_program_with_the_converters_environment(lab: Lab, enclave: Callable[..., Enclave],
                                                         mode: str) -> None:
    """The program the emulator test boots, here in the enclave's namespace: the environment is what the converter
    gives a build of this mode (common.enclave.egress.proxy_env), names come from the stub, connections are plain
    busybox ones."""
    busybox = shutil.which("busybox")
    if busybox is None:
        skip_or_fail("busybox is not installed (Debian package busybox-static)")
    network = {"egress": {"mode": mode, **BUSYBOX_POLICY}}
    enc = enclave(network["egress"])
    if mode == "transparent" and "transparent egress is off" in enc.text():
        skip_or_fail(f"this kernel cannot take the nat rule: {enc.text()}")
    env = ["PATH=/usr/bin:/bin", *proxy_env(network)]
    script = BUSYBOX_PROXY_SCRIPT if mode == "proxy" else BUSYBOX_TRANSPARENT_SCRIPT
    done = subprocess.run(["ip", "netns", "exec", enc.ns.name, "env", "-i", *env, busybox, "sh", "-c", script],
                          capture_output=True, text=True, timeout=120)
    got = dict(line[2:].split(" ", 1) for line in done.stdout.splitlines() if line.startswith("P "))
    check_program_lines(got, mode, done.stdout + done.stderr + enc.text())


def test_ipv6_by_name_and_address_and_mapped_ipv4_meets_the_ipv4_rules(lab: Lab, enclave: Callable[..., Enclave]) -> None:
    """IPv6 leaves through the proxy (by name or address); an IPv4-mapped IPv6 address is the IPv4 address to the
    policy, so it cannot slip past an IPv4 deny rule."""
    enc = enclave({"mode": "proxy", "allow": [{"cidr": "::/0"}, {"cidr": "0.0.0.0/0"}],
                   "deny": [{"cidr": f"{HOST_B}/32"}]})
    call = enc.ns.call
    assert call(proxy_connect, "six.allowed.test", 8080) == (200, f"{HOST_6}:8080 GET / HTTP/1.1")
    assert call(proxy_connect, f"[{HOST_6}]", 8080)[0] == 200
    assert call(proxy_get, f"http://[{HOST_6}]:8080/v6") == (200, f"{HOST_6}:8080 GET /v6 HTTP/1.1")
    assert call(proxy_connect, f"[::ffff:{HOST_B}]", 8080)[0] == 403
    assert call(proxy_connect, f"[::ffff:{HOST_A}]", 8080)[0] == 200
    assert call(dns, "six.allowed.test") == (NXDOMAIN, [])  # no IPv4 address: the stub has nothing to give


def test_a_parent_that_hangs_costs_a_timeout_not_a_wedge(lab: Lab, enclave: Callable[..., Enclave],
                                                         tmp_path: Path) -> None:
    """A parent that accepts and never answers: each request ends in 502/SERVFAIL after egressd's own timeout
    (10 s), in parallel, and the proxy keeps accepting meanwhile."""
    path = tmp_path / "hung.sock"
    hung = socket.socket(socket.AF_UNIX)
    hung.bind(str(path))
    hung.listen(512)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        hung.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(hung.accept()[0])
            except OSError:
                continue

    threading.Thread(target=accept, daemon=True).start()
    enc = enclave({"mode": "proxy", "allow": [{"host": "*.test"}, {"cidr": "0.0.0.0/0"}], "deny": []},
                  parent_sock=path)
    try:
        start = time.monotonic()
        futures = [enc.ns.pool.submit(proxy_connect, HOST_A, 8080) for _ in range(20)]
        futures += [enc.ns.pool.submit(dns, f"n{i}.allowed.test") for i in range(5)]
        assert enc.ns.call(_listening, 3128)  # still accepting while those wait
        results = [f.result(timeout=60) for f in futures]
        assert results[:20] == [(502, "nitroconv egress: parent unreachable\n")] * 20
        assert results[20:] == [(SERVFAIL, [])] * 5
        assert time.monotonic() - start < 25
    finally:
        stop.set()
        hung.close()
        for s in held:
            s.close()


def test_parent_applies_the_launch_json_policy_to_whoever_asks(lab: Lab, tmp_path: Path) -> None:
    """A program that gains root in the enclave can skip egressd and talk to port 9002 itself: the parent holds it to
    the same policy, read from launch.json's "network" (the rest of launch.json is not its business)."""
    launch = {"eif": "/enclave/app.eif", "cpu_count": 2, "memory_mib": 512,
              "network": {"egress": {"mode": "proxy", **POLICY}, "hostname": "app", "ingress": [8080]}}
    (tmp_path / "launch.json").write_text(json.dumps(launch, indent=2))
    sock, log = tmp_path / "strict.sock", tmp_path / "strict.log"
    parent = lab.start_parent(sock, log, "--policy", str(tmp_path / "launch.json"))

    def ask(line: bytes) -> bytes:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(15)
            s.connect(str(sock))
            s.sendall(line)
            return s.recv(256)

    try:
        assert ask(f"C {HOST_A} 8080\n".encode()) == b"ERR refused\n"  # no cidr rule, and nobody resolved it yet
        assert ask(b"R api.allowed.test\n") == b"ERR dns\n"  # denied by name
        assert ask(b"R evil.allowed.test\n") == b"A\n"  # its address is in a denied cidr
        assert ask(b"R allowed.test\n") == f"A {HOST_A}\n".encode()
        assert ask(f"C {HOST_A} 8080\n".encode()) == b"OK\n"  # now by the name it was resolved for
        assert ask(f"C {HOST_A} 8081\n".encode()) == b"OK\n"  # the cidr rule
        assert ask(f"C {HOST_A} 9999\n".encode()) == b"ERR refused\n"
        assert ask(f"C {HOST_B} 8080\n".encode()) == b"ERR refused\n"
        assert ask(b"C denied.test 8080\n") == b"ERR refused\n"
        assert ask(b"C www.allowed.test 8080\n") == b"OK\n"
        assert "enforcing the egress policy" in log.read_text()
    finally:
        parent.terminate()
        parent.wait(10)
