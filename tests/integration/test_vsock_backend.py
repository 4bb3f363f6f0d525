"""The vhost-user-vsock back-end (`python -m worker.emulator`) driven over its real socket by a test front-end
playing QEMU and the guest (tests/fixtures/vhost_frontend.py): negotiation, streams both ways, credit flow
control, RST, half-close, many streams, bad messages, and how the process ends."""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.vhost_frontend import (
    CREDIT_UPDATE,
    REQUEST,
    RST,
    RW,
    SHUTDOWN,
    Frontend,
    Guest,
    Packet,
)

CID = 7


@pytest.fixture
def backend(tmp_path: Path):
    vhost = tmp_path / "vhost.sock"
    uds = tmp_path / "vsock"
    proc = subprocess.Popen([sys.executable, "-m", "worker.emulator", "--vhost-socket", str(vhost), "--uds", str(uds),
                             "--guest-cid", str(CID), "-v"], stderr=subprocess.PIPE, text=True)
    yield proc, vhost, uds
    if proc.poll() is None:
        proc.kill()
    proc.wait(10)
    if proc.stderr:
        proc.stderr.close()


def _up(backend) -> tuple[Frontend, Guest]:
    proc, vhost, uds = backend
    fe = Frontend(str(vhost))
    assert fe.negotiate() == CID
    assert fe.set_mem_table() == 0
    return fe, Guest(fe, CID)


def _listener(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(128)
    s.settimeout(10)
    return s


def _finish(proc: subprocess.Popen, fe: Frontend, guest: Guest) -> str:
    guest.close()
    fe.close()
    assert proc.wait(10) == 0
    err = proc.stderr.read()
    assert "Traceback" not in err, err
    return err


def test_negotiation_and_config(backend):
    proc, vhost, uds = backend
    fe = Frontend(str(vhost))
    # Features as QEMU reads them; GET_CONFIG carries the guest CID.
    assert fe.negotiate() == CID
    assert fe.reply_ack
    assert not vhost.exists(), "the vhost socket is one front-end's only: unlinked once accepted"
    assert uds.exists()
    assert fe.set_mem_table() == 0
    # A well-formed request the back-end will not do is refused with a failed ack, and the session goes on.
    assert fe.acked(8, struct.pack("<II", 0, 100)) != 0  # queue size not a power of two
    assert fe.acked(8, struct.pack("<II", 5, 128)) != 0  # no queue 5
    assert fe.acked(25, struct.pack("<III", 0, 8, 0) + bytes(8)) != 0  # SET_CONFIG: the CID is read-only
    assert fe.acked(2, struct.pack("<Q", 1 << 29)) != 0  # a feature never offered
    guest = Guest(fe, CID)
    # GET_VRING_BASE stops a ring and returns where the back-end stopped.
    fe.send(11, struct.pack("<II", 1, 0))
    assert struct.unpack("<II", fe.recv(11)) == (1, 0)
    err = _finish(proc, fe, guest)
    assert "front-end disconnected" in err
    assert not uds.exists(), "the host socket is removed at exit"


def test_guest_to_host_stream_and_heartbeat_echo(backend, tmp_path):
    proc, _, uds = backend
    fe, guest = _up(backend)
    srv = _listener(Path(f"{uds}_9000"))
    got = {}

    def echo():
        conn, _ = srv.accept()
        with conn:
            b = conn.recv(1)
            got["byte"] = b
            conn.sendall(b)
            data = b""
            while chunk := conn.recv(65536):
                data += chunk
            got["rest"] = data
            conn.sendall(b"bye")

    t = threading.Thread(target=echo)
    t.start()
    c = guest.connect(9000)
    assert c.state == "established"
    guest.write(c, b"\xb7")
    assert guest.read(c, 1) == b"\xb7"
    payload = os.urandom(300_000)
    guest.write(c, payload, split=True)  # header and payload in separate descriptors
    guest.shutdown(c, 2)  # half-close: the guest will send no more, still reads
    assert guest.read_all(c) == b"bye"
    t.join(10)
    assert got == {"byte": b"\xb7", "rest": payload}
    # The host closed after our SHUTDOWN(SEND): both directions are done, the back-end resets the stream.
    guest.wait(c, lambda: c.state == "reset")
    # A guest connection to CID 2 (the host) goes to the same place.
    t = threading.Thread(target=lambda: srv.accept()[0].close())
    t.start()
    c2 = guest.connect(9000, cid=2)
    assert c2.state == "established"
    t.join(10)
    srv.close()
    _finish(proc, fe, guest)


def test_rst_for_a_port_without_listener_and_other_cids(backend):
    proc, _, uds = backend
    fe, guest = _up(backend)
    assert guest.connect(4242).state == "reset"
    assert guest.connect(9000, cid=9).state == "reset", "sibling CIDs are not reachable"
    # A packet for a stream that does not exist is answered with RST.
    guest.send_packet(Packet(CID, 3, 777, 9000, RW, payload=b"x"))
    p = guest.orphans.get(timeout=5)
    assert (p.op, p.src_port, p.dst_port) == (RST, 9000, 777)
    err = _finish(proc, fe, guest)
    assert "4242" in err


def test_host_to_guest_connect(backend):
    proc, _, uds = backend
    fe, guest = _up(backend)
    accepted = guest.listen(5005)
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.settimeout(10)
    h.connect(str(uds))
    h.sendall(b"CONNECT 5005\nearly")  # bytes right behind the line reach the guest first
    c = accepted.get(timeout=10)
    line = b""
    while not line.endswith(b"\n"):
        line += h.recv(1)
    assert line.startswith(b"OK ") and int(line[3:]) >= 1 << 30
    assert guest.read(c, 5) == b"early"
    h.sendall(b"hello guest")
    buf = b""
    while len(buf) < 11:
        buf += guest.read(c, 100)
    assert buf == b"hello guest"
    guest.write(c, b"hello host")
    assert h.recv(100) == b"hello host"
    h.shutdown(socket.SHUT_WR)  # host half-close: the guest sees SHUTDOWN(SEND), can still write
    guest.wait(c, lambda: c.peer_shut & 2)
    guest.write(c, b"late reply")
    assert h.recv(100) == b"late reply"
    guest.shutdown(c, 3)
    guest.wait(c, lambda: c.state == "reset")
    assert h.recv(100) == b""
    h.close()
    # No listener on the guest's port: the host connection is closed without OK.
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.settimeout(10)
    h.connect(str(uds))
    h.sendall(b"CONNECT 6006\n")
    assert h.recv(100) == b""
    h.close()
    # A malformed line is refused the same way.
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.settimeout(10)
    h.connect(str(uds))
    h.sendall(b"HELLO 1\n")
    assert h.recv(100) == b""
    h.close()
    _finish(proc, fe, guest)


def test_credit_flow_control_slow_readers(backend):
    proc, _, uds = backend
    fe, guest = _up(backend)
    guest.buf_alloc = 32 * 1024
    guest.auto_credit = False
    # Host -> guest: the guest advertises 32 KiB and consumes nothing; the back-end must stop there.
    accepted = guest.listen(7000)
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.connect(str(uds))
    h.sendall(b"CONNECT 7000\n")
    c = accepted.get(timeout=10)
    assert h.recv(64).startswith(b"OK ")
    blob = os.urandom(1 << 20)
    sender = threading.Thread(target=lambda: (h.sendall(blob), h.shutdown(socket.SHUT_WR)))
    sender.start()
    guest.wait(c, lambda: c.rx_cnt == 32 * 1024)
    time.sleep(0.5)
    assert c.rx_cnt == 32 * 1024, "back-end sent beyond the guest's credit"  # (also asserted per packet)
    assert sender.is_alive(), "the host writer should be held back, not buffered without bound"
    # Consuming and announcing the credit lets the rest through, in order.
    got = bytearray()
    while True:
        data = guest.read(c, 1 << 20)
        if not data:
            break
        got += data
        guest._reply(c, CREDIT_UPDATE)
    assert bytes(got) == blob
    sender.join(10)
    h.close()

    # Guest -> host: the host reads slowly; the guest must be held to the back-end's buf_alloc window.
    srv = _listener(Path(f"{uds}_7001"))
    c = guest.connect(7001)
    conn, _ = srv.accept()
    window = c.peer_buf_alloc
    assert 0 < window <= 1 << 20
    data = os.urandom(3 * window)
    writer = threading.Thread(target=guest.write, args=(c, data))
    writer.start()
    time.sleep(0.5)
    assert writer.is_alive(), "the guest should be out of credit while the host reads nothing"
    assert c.tx_cnt - c.peer_fwd_cnt <= window
    received = bytearray()
    conn.settimeout(10)
    while len(received) < len(data):
        received += conn.recv(4096)
        time.sleep(0.0005)
    writer.join(10)
    assert bytes(received) == data
    # A guest ignoring the credit gets its stream reset instead of unbounded buffering.
    # (the host reads nothing more; the kernel's socket buffers take some, then the back-end's window fills)
    sent = 0
    chunk = os.urandom(16384)
    while c.state != "reset" and sent < 64 << 20:
        guest.send_packet(Packet(CID, 3, c.local_port, 7001, RW, 0, 32768, 0, chunk))
        sent += len(chunk)
    guest.wait(c, lambda: c.state == "reset")
    assert sent < 16 << 20, sent
    conn.close()
    srv.close()
    _finish(proc, fe, guest)


def test_many_concurrent_streams(backend):
    proc, _, uds = backend
    fe, guest = _up(backend)
    srv = _listener(Path(f"{uds}_8000"))
    n = 60

    def serve():
        conns = [srv.accept()[0] for _ in range(n)]
        for conn in conns:
            threading.Thread(target=_echo_upper, args=(conn,), daemon=True).start()

    t = threading.Thread(target=serve)
    t.start()
    streams = [guest.connect(8000) for _ in range(n)]
    assert all(c.state == "established" for c in streams)
    payloads = [os.urandom(5000 + 997 * i) for i in range(n)]
    writers = [threading.Thread(target=lambda c=c, p=p: (guest.write(c, p), guest.shutdown(c, 2)))
               for c, p in zip(streams, payloads, strict=True)]
    for w in writers:
        w.start()
    for c, p in zip(streams, payloads, strict=True):
        assert guest.read_all(c, timeout=60) == p.upper()
    for w in writers:
        w.join(10)
    t.join(10)
    srv.close()
    _finish(proc, fe, guest)


def _echo_upper(conn: socket.socket) -> None:
    with conn:
        while chunk := conn.recv(65536):
            conn.sendall(chunk.upper())


def test_guest_rst_and_request_reset(backend):
    proc, _, uds = backend
    fe, guest = _up(backend)
    srv = _listener(Path(f"{uds}_8100"))
    c = guest.connect(8100)
    conn, _ = srv.accept()
    guest._reply(c, RST)  # the guest aborts: the host sees the connection end
    conn.settimeout(10)
    assert conn.recv(10) == b""
    conn.close()
    # Credit request is answered with a credit update.
    c = guest.connect(8100)
    srv.accept()[0].close()
    guest.wait(c, lambda: c.peer_shut & 2 or c.state == "reset")
    guest._reply(c, SHUTDOWN, 3)
    guest.wait(c, lambda: c.state == "reset")
    _finish(proc, fe, guest)


def test_sigterm_stops_cleanly(backend):
    proc, _, uds = backend
    fe, guest = _up(backend)
    srv = _listener(Path(f"{uds}_8200"))
    c = guest.connect(8200)
    conn, _ = srv.accept()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    conn.settimeout(10)
    assert conn.recv(10) == b"", "open streams are closed on the host side"
    guest.wait(c, lambda: c.state == "reset")  # and reset on the guest side
    assert not uds.exists()
    err = proc.stderr.read()
    assert "SIGTERM" in err and "Traceback" not in err
    guest.close()
    fe.close()
    srv.close()


@pytest.mark.parametrize("raw, code", [
    (struct.pack("<III", 1, 0x2, 0), "vhost_user_malformed_message"),  # protocol version 2
    (struct.pack("<III", 1, 0x1, 1 << 20), "vhost_user_malformed_message"),  # a 1 MiB payload
    (struct.pack("<III", 8, 0x1, 2) + b"\0\0", "vhost_user_malformed_message"),  # SET_VRING_NUM cut short
    (struct.pack("<III", 77, 0x1, 0), "vhost_user_unsupported_request"),
])
def test_malformed_message_refused_cleanly(backend, raw, code):
    proc, vhost, uds = backend
    fe = Frontend(str(vhost))
    fe.negotiate()
    fe.sock.sendall(raw)
    assert proc.wait(10) == 1
    err = proc.stderr.read()
    assert code in err and "Traceback" not in err, err
    assert not uds.exists()
    fe.close()


def test_usage_errors(tmp_path):
    r = subprocess.run([sys.executable, "-m", "worker.emulator", "--vhost-socket", str(tmp_path / "v"), "--uds",
                        str(tmp_path / "u"), "--guest-cid", "2"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "--guest-cid must be at least 3" in r.stderr
    r = subprocess.run([sys.executable, "-m", "worker.emulator", "--vhost-socket", str(tmp_path / "no/such/v"),
                        "--uds", str(tmp_path / "u")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and "vsock_listen_failed" in r.stderr


def test_request_before_rings_waits_for_buffers(backend):
    """A host CONNECT before the guest posted receive buffers is delivered once it does."""
    proc, _, uds = backend
    fe = Frontend(str(backend[1]))
    fe.negotiate()
    fe.set_mem_table()
    h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    h.settimeout(10)
    h.connect(str(uds))
    h.sendall(b"CONNECT 5100\n")
    time.sleep(0.2)
    guest = Guest(fe, CID, listen=(5100,))
    c = guest.listening[5100].get(timeout=10)
    assert h.recv(64).startswith(b"OK ")
    assert any(p.op == REQUEST and p.dst_port == 5100 for p in guest.received)
    assert c.state == "established"
    h.close()
    _finish(proc, fe, guest)


def test_guest_pointing_outside_its_memory_breaks_only_the_queue(backend):
    proc, _, uds = backend
    fe, guest = _up(backend)
    with guest.lock:
        guest.tx.add([(0xDEAD_0000_0000, 64, False)])
        guest.tx.notify()
    # The back-end lives on: it still answers the front-end, and leaves cleanly when it goes.
    time.sleep(1)
    assert proc.poll() is None
    assert len(fe.call(1)) == 8
    err = _finish(proc, fe, guest)
    assert "queue 1 disabled" in err and "outside guest memory" in err
