"""netd (worker/runtime/netd.c), the enclave side of ingress, as a process: its test build listens on Unix sockets
instead of vsock (`$NETD_TEST_DIR/vsock_P`), everything else is the enclave's code — the PROXY v2 header from the
parent checked and re-encoded, the app reached on 127.0.0.1:P, bytes relayed both ways with half-close, a
connection storm and a stalled peer that do not wedge other connections."""
from __future__ import annotations

import json
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.devblobs import RUNTIME_SOURCES, make

pytestmark = pytest.mark.integration

SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def pp2_tcp4(src: str, sport: int, dst: str, dport: int) -> bytes:
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return SIG + bytes([0x21, 0x11]) + struct.pack("!H", len(body)) + body


PP2_LOCAL = SIG + bytes([0x20, 0x00, 0, 0])


@pytest.fixture(scope="module")
def netd_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("netd-build")
    make(RUNTIME_SOURCES, f"OUT={out}", f"{out}/netd-test")
    return out / "netd-test"


class App:
    """A TCP server on 127.0.0.1 that records what each connection sent and echoes it upper-cased after EOF."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.received: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._one, args=(conn,), daemon=True).start()

    def _one(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            self.received.append(data)
            conn.sendall(data.upper())


@pytest.fixture
def app() -> Iterator[App]:
    a = App()
    yield a
    a.sock.close()


def start_netd(netd_bin: Path, tmp_path: Path, lines: str) -> subprocess.Popen[bytes]:
    conf = tmp_path / "netd.conf"
    conf.write_text(lines)
    log = (tmp_path / "netd.log").open("wb")
    proc = subprocess.Popen([str(netd_bin), str(conf)], env={"NETD_TEST_DIR": str(tmp_path)}, stderr=log)
    log.close()
    deadline = time.monotonic() + 10
    # bind() makes the socket file before listen(): netd says when it listens.
    while b"ingress on" not in (tmp_path / "netd.log").read_bytes():
        assert proc.poll() is None, (tmp_path / "netd.log").read_text()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return proc


def exchange(path: Path, payload: bytes, *, timeout: float = 10) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except ConnectionResetError:  # a refused connection may end in a reset rather than an EOF
            pass
        return out


@pytest.fixture
def netd(netd_bin: Path, tmp_path: Path, app: App) -> Iterator[tuple[Path, App]]:
    proc = start_netd(netd_bin, tmp_path, f"{app.port} 0\n")
    yield tmp_path / f"vsock_{app.port}", app
    proc.terminate()
    proc.wait(5)


def test_netd_relays_to_the_app_without_the_header(netd: tuple[Path, App]) -> None:
    path, app = netd
    assert exchange(path, pp2_tcp4("203.0.113.7", 40000, "10.0.0.1", 8080) + b"hello") == b"HELLO"
    assert app.received == [b"hello"]


def test_netd_gives_the_app_a_proxy_v2_header_when_asked(netd_bin: Path, tmp_path: Path, app: App) -> None:
    proc = start_netd(netd_bin, tmp_path, f"{app.port} 1\n")
    try:
        # A TLV the parent appended is dropped: the app gets the header netd encoded.
        header = pp2_tcp4("203.0.113.7", 40000, "10.0.0.1", 8080)
        with_tlv = header[:14] + struct.pack("!H", 12 + 4) + header[16:] + b"\x04\x00\x01Z"
        exchange(tmp_path / f"vsock_{app.port}", with_tlv + b"body")
        assert app.received == [header + b"body"]
        app.received.clear()
        exchange(tmp_path / f"vsock_{app.port}", PP2_LOCAL + b"x")
        assert app.received == [PP2_LOCAL + b"x"]
    finally:
        proc.terminate()
        proc.wait(5)


@pytest.mark.parametrize("preamble", [b"GET / HTTP/1.1\r\n\r\n", SIG + bytes([0x21, 0x11, 0x01, 0x00]) + b"x" * 300,
                                      SIG + bytes([0x23, 0x11, 0, 12]) + b"\0" * 12, SIG + bytes([0x21, 0x11, 0, 4]) + b"\0" * 4])
def test_netd_refuses_a_connection_without_a_valid_header(netd: tuple[Path, App], preamble: bytes) -> None:
    path, app = netd
    assert exchange(path, preamble) == b""
    time.sleep(0.2)
    assert app.received == []


def test_netd_closes_when_the_app_is_not_listening(netd_bin: Path, tmp_path: Path) -> None:
    free = socket.create_server(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()
    proc = start_netd(netd_bin, tmp_path, f"{port} 0\n")
    try:
        assert exchange(tmp_path / f"vsock_{port}", PP2_LOCAL + b"x") == b""
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(5)


def test_netd_large_transfer_both_ways(netd: tuple[Path, App]) -> None:
    path, app = netd
    payload = bytes(range(256)) * 8192  # 2 MiB, far more than the relay's buffers
    assert exchange(path, PP2_LOCAL + payload) == payload.upper()


def test_netd_storm_and_a_stalled_peer_do_not_wedge_it(netd: tuple[Path, App]) -> None:
    path, app = netd
    # A stalled client: sends a big request, never reads the answer.
    stalled = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stalled.connect(str(path))
    stalled.sendall(PP2_LOCAL + b"s" * (1 << 20))
    stalled.shutdown(socket.SHUT_WR)
    # Silent clients past the connection limit (256), kept open: the loop goes on, and once they have been
    # silent a while (2 s) new clients take their slots.
    idle = []
    deadline = time.monotonic() + 20
    for _ in range(300):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(5)
        while True:
            try:
                s.connect(str(path))
                break
            except BlockingIOError:  # the listen backlog is full for a moment: netd accepts in bursts
                assert time.monotonic() < deadline
                time.sleep(0.01)
        idle.append(s)
    time.sleep(2.5)
    assert b"connections open, refusing more" in (path.parent / "netd.log").read_bytes()
    # Others are served while the stalled one still holds its buffers and the silent ones stay connected.
    results = []

    def one(i: int) -> None:
        results.append(exchange(path, PP2_LOCAL + f"c{i}".encode()))

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert sorted(results) == sorted(f"C{i}".encode() for i in range(50))
    stalled.close()
    for s in idle:
        s.close()


# --- the parent side too: the launcher's published port, through a Unix-socket stand-in for vsock ---------------


@pytest.fixture(scope="module")
def launcher_bin(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("launcher-build")
    make(RUNTIME_SOURCES, f"OUT={out}", f"{out}/run")
    return out / "run"


def vsock_standin(base: Path, netd_dir: Path) -> socket.socket:
    """What the emulator's back-end does for a host connection (worker/emulator/vsock.py): read `CONNECT P`,
    answer `OK <n>`, then carry the stream to the guest's port P — here netd's Unix socket for P."""
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(base))
    server.listen(64)

    def pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def one(conn: socket.socket) -> None:
        line = b""
        while not line.endswith(b"\n"):
            line += conn.recv(1)
        port = int(line.split()[1])
        guest = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        guest.connect(str(netd_dir / f"vsock_{port}"))
        conn.sendall(b"OK 1234\n")
        threading.Thread(target=pipe, args=(conn, guest), daemon=True).start()
        threading.Thread(target=pipe, args=(guest, conn), daemon=True).start()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            threading.Thread(target=one, args=(conn,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return server


def test_published_port_reaches_the_app_with_the_clients_address(launcher_bin: Path, netd_bin: Path,
                                                                  tmp_path: Path, app: App) -> None:
    netd = start_netd(netd_bin, tmp_path, f"{app.port} 1\n")
    base = tmp_path / "vsock"
    standin = vsock_standin(base, tmp_path)
    launch = tmp_path / "launch.json"
    launch.write_text(json.dumps({"eif": "/e.eif", "cpu_count": 1, "memory_mib": 64, "network": {
        "egress": {"mode": "none", "allow": [], "deny": []}, "hostname": "h",
        "ingress": [{"port": app.port, "proxy_protocol": True}]}}))
    # The stand-in nitro-cli stays attached as the emulator's does, until it is stopped.
    nitro_cli = tmp_path / "nitro-cli"
    nitro_cli.write_text("#!/bin/sh\nexec sleep 60\n")
    nitro_cli.chmod(0o755)
    log = (tmp_path / "launcher.log").open("wb")
    proc = subprocess.Popen([str(launcher_bin)], stderr=log, env={
        "PATH": "/usr/bin:/bin", "NITROCONV_RUN_LAUNCH_JSON": str(launch), "NITROCONV_RUN_VSOCK_UDS": str(base),
        "NITROCONV_RUN_NITRO_CLI": str(nitro_cli), "NITROCONV_RUN_PUBLISH": f"127.0.0.1:0:{app.port}"})
    log.close()
    try:
        deadline = time.monotonic() + 10
        while b"-> enclave port" not in (text := (tmp_path / "launcher.log").read_bytes()):
            assert time.monotonic() < deadline and proc.poll() is None, text
            time.sleep(0.05)
        host_port = int(text.split(b"ingress: 127.0.0.1:")[1].split()[0])
        with socket.create_connection(("127.0.0.1", host_port), timeout=10) as client:
            client.sendall(b"ping")
            client.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := client.recv(100):
                answer += chunk
            client_addr = client.getsockname()
        # The app saw netd's PROXY v2 header naming this very client, then the bytes (and echoed both).
        expected = pp2_tcp4(client_addr[0], client_addr[1], "127.0.0.1", host_port) + b"ping"
        assert app.received == [expected]
        assert answer == expected.upper()
        time.sleep(0.3)
        lines = (tmp_path / "launcher.log").read_text().splitlines()
        assert any(f"from 127.0.0.1:{client_addr[1]}: closed, in=4 out={len(expected)}" in line
                   for line in lines), lines
    finally:
        proc.terminate()
        proc.wait(10)
        netd.terminate()
        netd.wait(5)
        standin.close()


def test_launcher_refuses_a_port_the_policy_does_not_publish(launcher_bin: Path, tmp_path: Path) -> None:
    launch = tmp_path / "launch.json"
    launch.write_text(json.dumps({"eif": "/e.eif", "cpu_count": 1, "memory_mib": 64,
                                  "network": {"ingress": [{"port": 8080, "proxy_protocol": False}]}}))
    for publish, why in (("127.0.0.1:0:9999", "port 9999 is not published"), ("x:1:8080", "IPv4"),
                         ("8080", "expected [IP:]HOSTPORT:PORT")):
        done = subprocess.run([str(launcher_bin)], capture_output=True, text=True, timeout=10, env={
            "PATH": "/usr/bin:/bin", "NITROCONV_RUN_LAUNCH_JSON": str(launch), "NITROCONV_RUN_VSOCK_UDS": "/tmp/x",
            "NITROCONV_RUN_NITRO_CLI": "/bin/true", "NITROCONV_RUN_PUBLISH": publish})
        assert done.returncode == 1 and why in done.stderr, done.stderr


def test_netd_a_parent_gone_mid_stream_ends_only_that_connection(netd_bin: Path, tmp_path: Path) -> None:
    # An app that holds its connection open and records when its peer went away.
    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    ended = threading.Event()

    def hold() -> None:
        conn, _ = server.accept()
        with conn:
            while conn.recv(65536):
                pass
        ended.set()

    threading.Thread(target=hold, daemon=True).start()
    proc = start_netd(netd_bin, tmp_path, f"{port} 0\n")
    try:
        parent = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        parent.connect(str(tmp_path / f"vsock_{port}"))
        parent.sendall(PP2_LOCAL + b"partial request")
        time.sleep(0.3)
        parent.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        parent.close()  # the parent dies: its side of the stream is gone
        assert ended.wait(10), "the app's connection was left open"
        assert proc.poll() is None
    finally:
        proc.terminate()
        proc.wait(5)
        server.close()
