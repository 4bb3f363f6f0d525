"""The parent side of an emulated enclave (worker/emulator/session.py) over real Unix sockets and processes: the
heartbeat listener, the back-end's start-up, and how the boot check reports a back-end that does not come up."""
from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import BootCheckUnavailable, EmulatorUnavailable
from worker.emulator.session import (
    HEARTBEAT_BYTE,
    HEARTBEAT_PORT,
    BackendProcess,
    EmulatorSession,
    HeartbeatListener,
)
from worker.pipeline.emulatorboot import boot_eif_emulated

pytestmark = pytest.mark.integration


@pytest.fixture
def short_dir() -> Iterator[Path]:
    # Unix socket paths are limited to 107 bytes; pytest's tmp_path can be longer.
    path = Path(tempfile.mkdtemp(prefix="nchb-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _exchange(path: Path, payload: bytes) -> bytes:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(10)
        conn.connect(str(path))
        conn.sendall(payload)
        return conn.recv(16)


def test_heartbeat_is_echoed_and_recorded(short_dir: Path) -> None:
    listener = HeartbeatListener(short_dir / f"vsock_{HEARTBEAT_PORT}").start()
    try:
        assert not listener.came
        assert _exchange(listener.path, bytes([HEARTBEAT_BYTE])) == bytes([HEARTBEAT_BYTE])
        assert listener.came and listener.wrong == []
        # A second enclave connection (a retry) is answered too and changes nothing.
        first = listener.received_at
        assert _exchange(listener.path, bytes([HEARTBEAT_BYTE])) == bytes([HEARTBEAT_BYTE])
        assert listener.received_at == first
    finally:
        listener.stop()


def test_a_wrong_heartbeat_byte_is_not_echoed_nor_counted(short_dir: Path) -> None:
    listener = HeartbeatListener(short_dir / "hb").start()
    try:
        assert _exchange(listener.path, b"\x00") == b""  # closed without an answer
        assert not listener.came and listener.wrong == [0]
    finally:
        listener.stop()


def test_a_silent_connection_does_not_count(short_dir: Path) -> None:
    listener = HeartbeatListener(short_dir / "hb").start()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.connect(str(listener.path))
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(10)
            assert conn.recv(1) == b""
        assert not listener.came
    finally:
        listener.stop()


def test_heartbeat_outcomes_are_reported(short_dir: Path) -> None:
    said: list[str] = []
    listener = HeartbeatListener(short_dir / "hb", report=said.append).start()
    try:
        assert _exchange(listener.path, bytes([HEARTBEAT_BYTE])) == bytes([HEARTBEAT_BYTE])
        assert _exchange(listener.path, b"\x01") == b""
        assert _exchange(listener.path, bytes([HEARTBEAT_BYTE])) == bytes([HEARTBEAT_BYTE])
    finally:
        listener.stop()
    assert listener.count == 2
    assert said == ["heartbeat received: the enclave booted", "refused a heartbeat of b'\\x01' (expected b'\\xb7')",
                    "heartbeat received: the enclave booted"]
    assert not listener.path.exists()


BAD_BACKEND = (sys.executable, "-c", "import sys; print('nitroconv-vsock: bad_usage: no such option'); sys.exit(2)")


def test_a_backend_that_exits_before_listening_is_unavailable_with_its_output(short_dir: Path) -> None:
    with pytest.raises(EmulatorUnavailable, match=r"did not come up \(status 2\).*bad_usage") as info:
        BackendProcess.start(BAD_BACKEND, vhost_socket=short_dir / "vhost.sock", uds=short_dir / "vsock", guest_cid=16,
                             log_path=short_dir / "backend.log")
    assert info.value.code == "emulator_unavailable"


def test_a_missing_backend_program_is_unavailable(short_dir: Path) -> None:
    with pytest.raises(EmulatorUnavailable, match="cannot start the vsock back-end"):
        BackendProcess.start((str(short_dir / "no-such-backend"),), vhost_socket=short_dir / "v", uds=short_dir / "u",
                             guest_cid=16, log_path=short_dir / "backend.log")


def test_the_real_backend_comes_up_and_the_session_stops_it(short_dir: Path) -> None:
    session = EmulatorSession(qemu="unused", eif=short_dir / "app.eif", memory_mib=512, backend_log=True)
    session.backend = BackendProcess.start(session.backend_argv, vhost_socket=session.vhost_socket, uds=session.uds,
                                           guest_cid=session.guest_cid, log_path=session.workdir / "backend.log")
    assert session.vhost_socket.is_socket() and session.uds.is_socket()
    proc = session.backend.proc
    session.close()
    assert proc.returncode == 0, session.backend_tail()  # SIGTERM: the back-end's orderly stop
    assert "stopping on SIGTERM" in session.backend_tail()
    assert not session.workdir.exists(), "a session's own socket dir is removed"


def test_the_boot_check_reports_a_backend_that_does_not_come_up_as_unavailable(short_dir: Path) -> None:
    eif = short_dir / "app.eif"
    eif.write_bytes(b"\0" * 4096)
    before = set(Path("/tmp").glob("ncvs-*"))
    with pytest.raises(BootCheckUnavailable, match=r"did not come up \(status 2\).*bad_usage") as info:
        boot_eif_emulated(eif, expected={}, qemu=str(short_dir / "never-started"), backend=BAD_BACKEND, timeout=30)
    assert info.value.code == "boot_check_unavailable"
    assert set(Path("/tmp").glob("ncvs-*")) <= before, "the session's socket dir is removed"
