"""The loopback registry a benchmark pushes its images to, started for the run and stopped at its end.

Without an address, a plain-HTTP `docker-registry` of the bench's own on a free 127.0.0.1 port: no
clash with the demo stack's registry (`make up`, 127.0.0.1:5000) or another engineer's. Its storage
stays in the bench's state dir between runs, so a rerun only HEADs the blobs it already has. Given an
address where a registry already answers, that one is used and left running: it is not the bench's.
"""
from __future__ import annotations

import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

REGISTRY_BIN = "/usr/bin/docker-registry"
READY_SECONDS = 20.0
STOP_SECONDS = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def answers(addr: str) -> bool:
    try:
        with urllib.request.urlopen(f"http://{addr}/v2/", timeout=2) as response:
            return bool(response.status == 200)
    except urllib.error.HTTPError as exc:
        return exc.code == 401
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(STOP_SECONDS)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def loopback_registry(state: Path, addr: str | None, log: Callable[[str], None]) -> Iterator[str]:
    """Yields the registry's HOST:PORT. The one started here (storage under `state`) is stopped on the way out,
    whatever ends the run."""
    if addr is not None and answers(addr):
        log(f"using the registry already answering on {addr} (left running)")
        yield addr
        return
    addr = addr or f"127.0.0.1:{free_port()}"
    state.mkdir(parents=True, exist_ok=True)
    config = state / "config.yml"
    config.write_text("version: 0.1\nlog: {level: warn}\n"
                      f"storage:\n  filesystem: {{rootdirectory: {state.resolve() / 'data'}}}\n  delete: {{enabled: true}}\n"
                      f"http: {{addr: {addr}}}\n")
    log_path = state / "registry.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen([REGISTRY_BIN, "serve", str(config)], stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + READY_SECONDS
        while not answers(addr):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise OSError(f"the bench's registry did not start on {addr} (status {proc.poll()}); see {log_path}")
            time.sleep(0.1)
        log(f"registry on {addr} (pid {proc.pid}, stopped at the end)")
        yield addr
    finally:
        _stop(proc)
