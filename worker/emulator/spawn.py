"""Starting the vsock back-end as a child process and knowing when it is ready (for run-local and the boot check)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from common.errors import EmulatorUnavailable

READY_SECONDS = 15.0


def spawn_backend(vhost_socket: Path, uds: Path, guest_cid: int, *, timeout: float = READY_SECONDS,
                  stderr: int | None = None, quiet: bool = False) -> subprocess.Popen[bytes]:
    """`python -m worker.emulator …` in its own session, returned once it listens on `vhost_socket` (the
    socket appears only then). Raises EmulatorUnavailable when it exits or does not get there in time."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.emulator", "--vhost-socket", str(vhost_socket), "--uds", str(uds),
         "--guest-cid", str(guest_cid), *(["--quiet"] if quiet else [])],
        stdin=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    deadline = time.monotonic() + timeout
    while not vhost_socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            status = proc.poll()
            if status is None:
                proc.kill()
                proc.wait()
            raise EmulatorUnavailable(f"the vsock back-end did not start (status {proc.returncode})",
                                      details={"vhost_socket": str(vhost_socket)})
        time.sleep(0.02)
    return proc
