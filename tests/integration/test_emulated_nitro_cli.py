"""The emulated `nitro-cli run-enclave` (worker/emulator/enclave.py, what run-local's launcher runs) with the real vsock
back-end and a stand-in for QEMU: the session's argv, the heartbeat answered, the console filtered, the program's
exit status returned, and nothing left running. (tests/e2e/test_run_local.py boots the real machine.)"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.repo import REPO

pytestmark = pytest.mark.integration

# Plays QEMU: answers the sandbox probe (as a build without seccomp with STANDIN_NO_SECCOMP), records its argv, connects to the vhost-user socket as QEMU does,
# sends the init's heartbeat straight to the parent's port 9000 (a real guest's goes over vsock), prints a
# console and ends as the machine does after the init's reset.
STANDIN = textwrap.dedent("""\
    import json, os, socket, sys
    argv = sys.argv[1:]
    if argv == ["-sandbox", "on", "-version"]:
        if os.environ.get("STANDIN_NO_SECCOMP"):
            print("qemu-system-x86_64: -sandbox on: There is no option group 'sandbox'", file=sys.stderr)
            sys.exit(1)
        print("QEMU emulator version 10.0.2")
        sys.exit(0)
    with open(os.environ["STANDIN_ARGV"], "w") as f:
        json.dump(argv, f)
    vhost = argv[argv.index("-chardev") + 1].split("path=", 1)[1]
    front = socket.socket(socket.AF_UNIX)
    front.connect(vhost)
    print("[    0.000000] Linux version 6.12", flush=True)
    print("nitroconv-init: start", flush=True)
    hb = socket.socket(socket.AF_UNIX)
    hb.connect(os.environ["STANDIN_HEARTBEAT"])
    hb.sendall(b"\\xb7")
    assert hb.recv(1) == b"\\xb7"
    print("nitroconv-init: heartbeat acknowledged", flush=True)
    print("hello from the program", flush=True)
    print("nitroconv-init: exit status=3", flush=True)
    """)


@pytest.fixture
def work() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="ncnc-", dir="/tmp"))  # Unix socket paths stay short
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _run_enclave(work: Path, **env_extra: str) -> tuple[subprocess.CompletedProcess[str], Path]:
    qemu = work / "qemu"
    qemu.write_text(f"#!{sys.executable}\n{STANDIN}")
    qemu.chmod(0o755)
    eif = work / "app.eif"
    eif.write_bytes(b"stand-in")
    recorded = work / "argv.json"
    env = {**os.environ, "STANDIN_ARGV": str(recorded), "STANDIN_HEARTBEAT": str(work / "vsock_9000"), **env_extra}
    done = subprocess.run([sys.executable, "-m", "worker.emulator.enclave", "--qemu", str(qemu), "--uds",
                           str(work / "vsock"), "--workdir", str(work), "--guest-cid", "21", "run-enclave",
                           "--eif-path", str(eif), "--cpu-count", "2", "--memory", "640"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    return done, eif


def test_run_enclave_answers_the_heartbeat_and_returns_the_programs_status(work: Path) -> None:
    done, eif = _run_enclave(work)
    recorded = work / "argv.json"
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hello from the program\n"  # no --console: the program's lines only
    assert "nitroconv-run-local: heartbeat received: the enclave booted" in done.stderr
    assert "nitroconv-run-local: the enclave's program exited with status 3" in done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    argv = json.loads(recorded.read_text())
    assert argv[argv.index("-machine") + 1].startswith("nitro-enclave,vsock=vsock0,id=nitroconv-")
    assert (argv[argv.index("-smp") + 1], argv[argv.index("-m") + 1]) == ("2", "640")
    assert argv[argv.index("-kernel") + 1] == str(eif)
    assert argv[argv.index("-append") + 1] == "reboot=t printk.time=1"
    assert argv[argv.index("-sandbox") + 1].startswith("on,"), "a QEMU with seccomp runs sandboxed"
    assert "WITHOUT QEMU's seccomp sandbox" not in done.stderr
    # The back-end stopped with the enclave; the sockets are gone.
    assert not (work / "vhost.sock").exists() and not (work / "vsock").exists()
    assert not (work / "vsock_9000").exists()


def test_run_enclave_runs_a_qemu_without_seccomp_and_says_so(work: Path) -> None:
    # The user's own image on the user's machine: run-local may run it unsandboxed (the boot check may not),
    # but not silently.
    done, _ = _run_enclave(work, STANDIN_NO_SECCOMP="1")
    assert done.returncode == 3, done.stderr
    assert done.stdout == "hello from the program\n"
    assert "nitroconv-run-local: warning: the enclave runs WITHOUT QEMU's seccomp sandbox: " in done.stderr
    assert "has no seccomp sandbox" in done.stderr
    assert "-sandbox" not in json.loads((work / "argv.json").read_text())
