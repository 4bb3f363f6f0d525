"""One enclave in the emulator, as both its users run it: QEMU's `nitro-enclave` machine, the vsock back-end
beside it, and the parent's answer to the enclave's ready heartbeat.

`nitroconv run-local` (worker/emulator/enclave.py, the emulated `nitro-cli run-enclave`) and the conversion's
boot check (worker/pipeline/emulatorboot.py) each read QEMU's console their own way; everything else — the
argv, the sandbox, the back-end's start-up, the heartbeat, the order things stop in — is here, once:

    session = EmulatorSession(qemu=..., eif=..., memory_mib=...)
    try:
        qemu = session.start()        # heartbeat listening, back-end up, QEMU running (console on its stdout)
        ...                           # read qemu.stdout / qemu.stderr
    finally:
        code = session.close()        # QEMU, then the back-end; the socket dir removed when it was ours

The guest may be hostile: no network, no disk, no monitor, and QEMU's seccomp sandbox. A QEMU built without
seccomp refuses `-sandbox`; whether the session may then run it anyway is the session's `sandbox` policy:
SANDBOX_REQUIRED (the default; the boot check, which boots images from anyone) refuses to start it,
SANDBOX_PREFERRED (run-local: the user's own image on the user's machine) runs it and says so.
"""

from __future__ import annotations

import functools
import logging
import os
import selectors
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common.errors import EmulatorNoSandbox, EmulatorUnavailable

log = logging.getLogger(__name__)

BACKEND_MODULE = "worker.emulator"
# The parent side of the heartbeat (nitro-cli's): the enclave connects to the parent's port 9000, sends
# 0xB7 and waits for it back.
HEARTBEAT_PORT = 9000
HEARTBEAT_BYTE = 0xB7
# Any CID but 0-2 (reserved) and 3 (the parent): each session has its own back-end, so sessions running
# side by side on one host never share a CID space.
DEFAULT_GUEST_CID = 16
BACKEND_READY_SECONDS = 20.0
HEARTBEAT_READ_SECONDS = 10.0
SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"
# The emulated CPU: everything TCG offers (a program built for a recent x86-64 level runs, as on a Nitro host),
# but without the "fast string" hints. With them the kernel and libc copy and clear memory with `rep movsb` /
# `rep stosb`, which TCG runs a byte at a time; without them they use word-sized loops. No instruction goes
# away (the hints only steer a choice between equivalent routines), and unpacking a large initramfs is the
# boot's longest step (bench/README.md, emulator_boot.py).
CPU = "max,erms=off,fsrm=off"
# QEMU's EIF loader copies the kernel and the ramdisks into temporary files ($TMPDIR) before loading them; on a
# tmpfs that is a memory copy rather than a disk file's writeback. Used when it has room for twice the EIF
# (a container's /dev/shm is often 64 MiB); QEMU unlinks the files once loaded.
LOADER_TMPFS = Path("/dev/shm")
SANDBOX_REQUIRED = "required"
SANDBOX_PREFERRED = "preferred"
SANDBOX_POLICIES = (SANDBOX_REQUIRED, SANDBOX_PREFERRED)
_KEEP_LOG = 4000


def loader_tmpdir(eif_size: int, tmpfs: Path | None = None) -> Path | None:
    """A new private directory on `tmpfs` for QEMU's loader to write the EIF's sections into, or None when
    the tmpfs is absent, not writable, or has no room for twice `eif_size` bytes (QEMU then uses $TMPDIR)."""
    tmpfs = LOADER_TMPFS if tmpfs is None else tmpfs
    try:
        st = os.statvfs(tmpfs)
        if st.f_bavail * st.f_frsize < 2 * eif_size or not os.access(tmpfs, os.W_OK | os.X_OK):
            return None
        return Path(tempfile.mkdtemp(prefix="ncvs-loader-", dir=tmpfs))
    except OSError:
        return None


def has_sandbox(qemu: str) -> bool:
    """Whether this QEMU accepts `-sandbox on` (it needs seccomp built in; -help lists the option either way).
    Asked once per binary: the link `make emulator` maintains may be pointed at another build meanwhile."""
    try:
        real = os.path.realpath(qemu)
        st = os.stat(real)
    except OSError:
        return False
    return _probe_sandbox(real, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=8)
def _probe_sandbox(qemu: str, mtime_ns: int, size: int) -> bool:
    # Options are parsed in order, so `-sandbox on -version` fails there or prints the version.
    try:
        done = subprocess.run([qemu, "-sandbox", "on", "-version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def qemu_argv(*, qemu: str, eif: Path | str, vhost_socket: Path | str, memory_mib: int, cpu_count: int = 1,
              name: str | None = None, sandbox: bool = True) -> list[str]:
    """QEMU's nitro-enclave machine loading the EIF itself (header, sections, CRC and PCRs checked by its
    loader), its vsock served over `vhost_socket`, software emulation (nested KVM is not to be had here),
    only the serial console on stdout, and a reset (the init's end) ends QEMU. The machine allocates its
    RAM as a shared memfd itself, as vhost-user needs."""
    argv = [
        qemu,
        "-machine", "nitro-enclave,vsock=vsock0" + (f",id={name}" if name else ""),
        "-accel", "tcg",
        "-cpu", CPU,
        "-smp", str(cpu_count),
        "-m", str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-chardev", f"socket,id=vsock0,path={vhost_socket}",
        "-kernel", str(eif),
        # Appended to the EIF's cmdline, not measured. The AWS cmdline's reboot=k needs a keyboard
        # controller this machine lacks, and the kernel then resets in a way -no-reboot does not catch: it
        # boots again (deploy/emulator/README.md). reboot=t makes it a triple fault, which ends QEMU.
        # printk.time=1: kernel lines carry a timestamp even from a kernel built without CONFIG_PRINTK_TIME (the
        # dev kernel), so a warning printed while the program runs is never read as the program's output.
        "-append", "reboot=t printk.time=1",
    ]
    if sandbox:
        argv += ["-sandbox", SANDBOX]
    return argv


class HeartbeatListener:
    """The parent's port 9000 (the back-end's `<uds>_9000`): reads one byte per connection, echoes it when it
    is 0xB7, counts it and records when the first came. `report`, when given, is told each outcome in a line
    (from the listener's own thread)."""

    def __init__(self, path: Path, report: Callable[[str], None] | None = None) -> None:
        self.path = path
        self.report = report
        self.received_at: float | None = None
        self.count = 0
        self.wrong: list[int] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        if path.is_socket():
            path.unlink()  # a stale socket of an earlier run
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, name="heartbeat", daemon=True)

    def start(self) -> HeartbeatListener:
        self._thread.start()
        return self

    @property
    def came(self) -> bool:
        return self.received_at is not None

    def _say(self, line: str) -> None:
        if self.report is not None:
            self.report(line)

    def _serve(self) -> None:
        with selectors.DefaultSelector() as sel:
            sel.register(self._sock, selectors.EVENT_READ)
            while not self._stop.is_set():
                if not sel.select(0.2):
                    continue
                try:
                    conn, _ = self._sock.accept()
                except OSError:
                    return
                with conn:
                    self._answer(conn)

    def _answer(self, conn: socket.socket) -> None:
        conn.settimeout(HEARTBEAT_READ_SECONDS)
        try:
            data = conn.recv(1)
            if data == bytes([HEARTBEAT_BYTE]):
                if self.received_at is None:
                    self.received_at = time.monotonic()
                self.count += 1
                conn.sendall(data)
                self._say("heartbeat received: the enclave booted")
            elif data:
                self.wrong.append(data[0])
                self._say(f"refused a heartbeat of {data!r} (expected {bytes([HEARTBEAT_BYTE])!r})")
        except OSError as exc:
            self._say(f"heartbeat failed: {exc}")

    def close(self) -> None:
        """Stop listening (connections to the port are refused from now on)."""
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.close()


class BackendProcess:
    """The vsock back-end (`python -m worker.emulator`) as a child in its own session, started by start()
    and returned once it listens (its vhost-user socket appears only then)."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path | None) -> None:
        self.proc = proc
        self.log_path = log_path

    @classmethod
    def start(cls, argv_prefix: Sequence[str], *, vhost_socket: Path, uds: Path, guest_cid: int,
              log_path: Path | None = None, quiet: bool = False, env: Mapping[str, str] | None = None,
              timeout: float = BACKEND_READY_SECONDS) -> BackendProcess:
        """Raises EmulatorUnavailable when it cannot be started, exits, or does not listen in time.
        With `log_path` its output goes there (and tail() reads it back); else to our stderr."""
        argv = [*argv_prefix, "--vhost-socket", str(vhost_socket), "--uds", str(uds), "--guest-cid", str(guest_cid),
                *(["--quiet"] if quiet else [])]
        out = log_path.open("wb") if log_path is not None else None
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT if out else None,
                                    start_new_session=True, close_fds=True, env=_child_env(env))
        except OSError as exc:
            raise EmulatorUnavailable(f"cannot start the vsock back-end: {exc.strerror or exc}",
                                      details={"backend": argv[:3]}) from exc
        finally:
            if out is not None:
                out.close()
        started = cls(proc, log_path)
        deadline = time.monotonic() + timeout
        while not vhost_socket.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                started.stop(grace=0)
                tail = started.tail()
                raise EmulatorUnavailable(f"the vsock back-end did not come up (status {proc.returncode})"
                                          + (f": {tail}" if tail else ""), details={"backend": argv[:3]})
            time.sleep(0.02)
        return started

    def tail(self) -> str:
        """The end of its output, on one line (when it went to a log)."""
        if self.log_path is None:
            return ""
        try:
            data = self.log_path.read_bytes()[-_KEEP_LOG:]
        except OSError:
            return ""
        return " ".join(data.decode("utf-8", "replace").split())[-500:]

    def stop(self, grace: float) -> int:
        return stop_process(self.proc, grace)


def _child_env(extra: Mapping[str, str] | None) -> dict[str, str] | None:
    return {**os.environ, **extra} if extra else None


def stop_process(proc: subprocess.Popen[bytes], grace: float) -> int:
    """Ends a child that leads its own process group: SIGTERM and up to `grace` seconds to go (none: SIGKILL
    at once), then SIGKILL to the group, even if the leader already exited (its zombie holds the group id).
    Returns its exit status; its pipes are closed. A child already waited for is left alone."""
    if proc.returncode is None:
        if grace > 0:
            proc.terminate()
            try:
                proc.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    code = proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return code


class EmulatorSession:
    """One emulated enclave: its socket dir, the heartbeat listener, the vsock back-end, QEMU.

    `workdir`/`uds` place the sockets (run-local's launcher serves port 9001 on `<uds>_9001`); without a
    `workdir` a private short dir under /tmp is made and removed at close (Unix socket paths are limited to
    107 bytes, whatever TMPDIR says). `backend_log` sends the back-end's output to `<workdir>/backend.log`
    (see `backend_tail()`) instead of our stderr. `env` is extra environment for the processes the session
    starts; `defer()` registers more clean-up (anything a caller starts beside the enclave) run at close.
    `sandbox` is the policy for a QEMU without seccomp (the module's docstring); `unsandboxed` says, once
    argv() ran, why this one runs without.
    """

    def __init__(self, *, qemu: str, eif: Path, memory_mib: int, cpu_count: int = 1,
                 guest_cid: int = DEFAULT_GUEST_CID, name: str | None = None, workdir: Path | None = None,
                 uds: Path | None = None, backend: Sequence[str] = (sys.executable, "-m", BACKEND_MODULE),
                 backend_log: bool = False, quiet: bool = False, answer_heartbeat: bool = True,
                 heartbeat_report: Callable[[str], None] | None = None, sandbox: str = SANDBOX_REQUIRED,
                 env: Mapping[str, str] | None = None) -> None:
        if sandbox not in SANDBOX_POLICIES:
            raise ValueError(f"sandbox policy {sandbox!r} is not one of {SANDBOX_POLICIES}")
        self.qemu = qemu
        self.eif = Path(eif)
        self.memory_mib = memory_mib
        self.cpu_count = cpu_count
        self.guest_cid = guest_cid
        self.name = name
        self.backend_argv = tuple(backend)
        self.backend_log = backend_log
        self.quiet = quiet
        self.answer_heartbeat = answer_heartbeat
        self.heartbeat_report = heartbeat_report
        self.sandbox = sandbox
        # Why QEMU runs without the sandbox (SANDBOX_PREFERRED and a QEMU without seccomp); None while it is
        # sandboxed or not yet decided (argv()).
        self.unsandboxed: str | None = None
        self.env: dict[str, str] = dict(env or {})
        self._own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="ncvs-", dir="/tmp")) if workdir is None else Path(workdir)
        self.uds = Path(uds) if uds is not None else self.workdir / "vsock"
        self.vhost_socket = self.workdir / "vhost.sock"
        self.heartbeat: HeartbeatListener | None = None
        self.backend: BackendProcess | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._deferred: list[Callable[[], object]] = []
        self._closed = False
        self._backend_tail = ""
        # Where QEMU's loader writes the EIF's sections (loader_tmpdir()), when the session made one.
        self.loader_dir: Path | None = None

    @property
    def heartbeats(self) -> int:
        return self.heartbeat.count if self.heartbeat is not None else 0

    @property
    def heartbeat_came(self) -> bool:
        return self.heartbeat is not None and self.heartbeat.came

    @staticmethod
    def refusal(qemu: str, sandbox: str = SANDBOX_REQUIRED) -> str | None:
        """Why a session with this `sandbox` policy will not run `qemu` (None when it will): the one rule on
        running without seccomp, which callers that would rather choose another QEMU ask first. A QEMU that
        cannot be run at all is not refused here: starting it fails, and says so."""
        if sandbox == SANDBOX_REQUIRED and os.access(qemu, os.X_OK) and not has_sandbox(str(qemu)):
            return f"{qemu} refuses -sandbox (built without seccomp); it is not run unsandboxed"
        return None

    def argv(self) -> list[str]:
        """QEMU's argv for this session, with `-sandbox` whenever this QEMU has one. Raises EmulatorNoSandbox
        when it has none and the policy is SANDBOX_REQUIRED."""
        refused = self.refusal(self.qemu, self.sandbox)
        if refused is not None:
            raise EmulatorNoSandbox(refused, details={"qemu": self.qemu})
        # Required, it is asked for whatever the probe said: a QEMU without seccomp then refuses to start.
        sandboxed = self.sandbox == SANDBOX_REQUIRED or has_sandbox(self.qemu)
        self.unsandboxed = None if sandboxed else f"{self.qemu} has no seccomp sandbox (-sandbox refused)"
        return qemu_argv(qemu=self.qemu, eif=self.eif.resolve(), vhost_socket=self.vhost_socket,
                         memory_mib=self.memory_mib, cpu_count=self.cpu_count, name=self.name, sandbox=sandboxed)

    def defer(self, cleanup: Callable[[], object]) -> None:
        """Runs `cleanup` at close(), after QEMU and before the back-end stop (last registered, first run)."""
        self._deferred.append(cleanup)

    def start(self) -> subprocess.Popen[bytes]:
        """The heartbeat listener (or its port left closed: `answer_heartbeat=False`), the back-end, then QEMU
        with its console on a stdout pipe and its messages on a stderr pipe. Raises EmulatorUnavailable when
        the back-end or QEMU cannot be started (EmulatorNoSandbox: the policy forbids this QEMU, before
        anything starts); close() is still the caller's to call."""
        argv = self.argv()
        self.heartbeat = HeartbeatListener(Path(f"{self.uds}_{HEARTBEAT_PORT}"), self.heartbeat_report)
        if self.answer_heartbeat:
            self.heartbeat.start()
        else:
            self.heartbeat.close()
        self.backend = BackendProcess.start(self.backend_argv, vhost_socket=self.vhost_socket, uds=self.uds,
                                            guest_cid=self.guest_cid, quiet=self.quiet, env=self.env,
                                            log_path=self.workdir / "backend.log" if self.backend_log else None)
        qemu_env = dict(self.env)
        if "TMPDIR" not in qemu_env:
            try:
                self.loader_dir = loader_tmpdir(self.eif.stat().st_size)
            except OSError:  # no EIF: QEMU says so
                self.loader_dir = None
            if self.loader_dir is not None:
                qemu_env["TMPDIR"] = str(self.loader_dir)
        try:
            self.process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                            stderr=subprocess.PIPE, start_new_session=True, close_fds=True,
                                            env=_child_env(qemu_env))
        except OSError as exc:
            raise EmulatorUnavailable(f"cannot start {self.qemu}: {exc.strerror or exc}",
                                      details={"qemu": self.qemu}) from exc
        return self.process

    def stop_qemu(self, grace: float = 0.0) -> int | None:
        """Ends QEMU (SIGTERM and `grace` seconds first when grace > 0); its exit status, None if never started."""
        if self.process is None:
            return None
        return stop_process(self.process, grace)

    def backend_tail(self) -> str:
        """The end of the back-end's log (with `backend_log`), also after close()."""
        if self.backend is not None and not self._closed:
            return self.backend.tail()
        return self._backend_tail

    def close(self, grace: float = 0.0) -> int | None:
        """Stops everything, QEMU first (the back-end then sees its front-end go and exits by itself), then
        what defer() registered, the heartbeat listener and the back-end. Returns QEMU's exit status."""
        if self._closed:
            return self.process.returncode if self.process is not None else None
        self._closed = True
        code = None
        try:
            code = self.stop_qemu(grace)
            while self._deferred:
                try:
                    self._deferred.pop()()
                except Exception:  # one failed clean-up must not leave the rest running
                    log.exception("emulator session clean-up failed")
            if self.heartbeat is not None:
                self.heartbeat.stop()
            if self.backend is not None:
                # Without its front-end, or on SIGTERM, it exits 0 by itself; a moment, then the group is killed.
                self.backend.stop(grace=max(grace, 1.0))
                self._backend_tail = self.backend.tail()
        finally:
            if self.loader_dir is not None:  # what a QEMU killed while loading left there
                shutil.rmtree(self.loader_dir, ignore_errors=True)
            if self._own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)
        return code

    def __enter__(self) -> EmulatorSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
