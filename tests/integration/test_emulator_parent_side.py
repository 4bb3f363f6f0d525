"""The parent side of the emulator boot check over real Unix sockets: the heartbeat listener and the backend start-up."""
from __future__ import annotations

import shutil
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.errors import BootCheckUnavailable
from worker.pipeline.emulatorboot import HEARTBEAT_BYTE, HEARTBEAT_PORT, HeartbeatListener, _start_backend

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


def test_a_backend_that_exits_before_listening_is_unavailable_with_its_output(short_dir: Path) -> None:
    backend = (sys.executable, "-c", "import sys; print('nitroconv-vsock: bad_usage: no such option'); sys.exit(2)")
    with pytest.raises(BootCheckUnavailable, match=r"did not come up \(status 2\).*bad_usage") as info:
        _start_backend(backend, vhost_socket=short_dir / "vhost.sock", uds=short_dir / "vsock",
                       log_path=short_dir / "backend.log")
    assert info.value.code == "boot_check_unavailable"


def test_a_missing_backend_program_is_unavailable(short_dir: Path) -> None:
    with pytest.raises(BootCheckUnavailable, match="cannot start the vsock backend"):
        _start_backend((str(short_dir / "no-such-backend"),), vhost_socket=short_dir / "v", uds=short_dir / "u",
                       log_path=short_dir / "backend.log")
