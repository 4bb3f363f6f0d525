"""Boot check in the emulator: QEMU's nitro-enclave machine loads the EIF, our vsock backend beside it.

What it adds to the plain boot (worker/pipeline/bootcheck.py): QEMU's own EIF loader accepts the file
(header, sections, CRC); QEMU measures the EIF itself and its NSM device serves the PCRs, which our init
reads from /dev/nsm and prints (`nitroconv-init: pcr <n> <hex>`), so PCR0/1/2 (and 8 when signed) are
computed by code that is not ours and compared with the Build's; and the init's "enclave ready"
heartbeat travels over real vsock to the parent side here, which echoes it as nitro-cli does.

The vsock device is vhost-user: `python -m worker.emulator` (the backend) serves it and maps the
guest's connection to the parent's port P onto the Unix socket `<uds>_P`, where this module listens.
"""
from __future__ import annotations

import functools
import importlib.util
import logging
import os
import re
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import BootCheckFailed, BootCheckNoHeartbeat, BootCheckPcrMismatch, BootCheckUnavailable
from worker.pipeline.bootcheck import (
    DEFAULT_SETTLE,
    DEFAULT_TIMEOUT,
    INIT_PREFIX,
    MARK_NO_NSM,
    MARK_NSM_ERROR,
    MARK_PCR,
    MODE_EMULATOR,
    MODE_PLAIN,
    QEMU,
    BootResult,
    ConsoleParser,
    _end,
    _watch,
    boot_eif,
    clean_line,
    memory_for,
)

if TYPE_CHECKING:
    from common.settings import Settings

log = logging.getLogger(__name__)

# The init's PCR lines (worker/runtime/init.c, mirrored in bootcheck.py): MARK_PCR once per register it read
# from the NSM, MARK_NO_NSM / MARK_NSM_ERROR when it could not (no /dev/nsm, or a request the NSM refused).
_PCR_LINE = re.compile(r"(\d{1,2}) ([0-9a-fA-F]{96})")

# The parent side of the heartbeat (nitro-cli's): the enclave connects to the parent's port 9000,
# sends 0xB7 and waits for it back.
HEARTBEAT_PORT = 9000
HEARTBEAT_BYTE = 0xB7
_HEARTBEAT_READ_TIMEOUT = 10.0
# Any CID but 0-2 (reserved) and 3 (the parent): each check has its own backend, so checks running
# side by side on one host never share a CID space.
GUEST_CID = 16

# The nitro-enclave machine does not always end on the init's reset: once the program's exit line is in, the
# verdict is final, and only this long is left for the kernel's last lines.
AFTER_EXIT = 0.5
BACKEND_MODULE = "worker.emulator"
_BACKEND_READY_TIMEOUT = 20.0
_KEEP_LOG = 4000

AUTO = "auto"
MODES = (AUTO, MODE_EMULATOR, MODE_PLAIN)


# --- pure: console and PCRs ------------------------------------------------------------------------
class EmulatorConsoleParser(ConsoleParser):
    """The console parser that also keeps the init's PCR lines.

    Only lines before the launch count, and the first value per register: once the image's program
    runs it can print anything, and a forged PCR line must not hide a mismatch.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pcrs: dict[int, str] = {}
        self.bad_pcr_lines: list[str] = []
        self.nsm_problems: list[str] = []

    def feed(self, raw: str) -> None:
        if not self.launched:
            line = clean_line(raw)
            if line.startswith(MARK_PCR):
                parsed = parse_pcr_line(line)
                if parsed is None:
                    self.bad_pcr_lines.append(line)
                else:
                    self.pcrs.setdefault(*parsed)
            elif line.startswith((MARK_NO_NSM, MARK_NSM_ERROR)) and len(self.nsm_problems) < 4:
                self.nsm_problems.append(line[len(INIT_PREFIX):])
        super().feed(raw)


def parse_pcr_line(line: str) -> tuple[int, str] | None:
    """`nitroconv-init: pcr <n> <hex>` as (n, lowercase hex); None for anything else."""
    if not line.startswith(MARK_PCR):
        return None
    match = _PCR_LINE.fullmatch(line[len(MARK_PCR):].strip())
    if match is None:
        return None
    return int(match.group(1)), match.group(2).lower()


def pcr_name(index: int) -> str:
    return f"PCR{index}"


def expected_registers(registers: Mapping[str, object]) -> dict[str, str]:
    """The PCRs to hold the emulator to, from a `Measurements.registers()`-like map (HashAlgorithm dropped)."""
    return {name: str(value).lower() for name, value in registers.items()
            if name.startswith("PCR") and value is not None}


def compare_pcrs(expected: Mapping[str, str], reported: Mapping[int, str]) -> list[str]:
    """Each expected register the emulator did not report, or reported with another value (pure)."""
    problems = []
    for name, want in sorted(expected.items(), key=lambda item: int(item[0][3:])):
        got = reported.get(int(name[3:]))
        if got is None:
            problems.append(f"the init reported no {name} from the emulator's NSM")
        elif got != want.lower():
            problems.append(f"{name} measured by the emulator is {got}, the Build's is {want.lower()}")
    return problems


@dataclass(frozen=True)
class EmulatorVerdict:
    ok: bool
    reason: str
    error_code: str
    pcrs_match: bool


def judge(*, console_ok: bool, console_reason: str, expected: Mapping[str, str], reported: Mapping[int, str],
          heartbeat: bool, nsm_problems: Sequence[str] = ()) -> EmulatorVerdict:
    """The emulator check's verdict (pure): the entrypoint first (what an operator needs to fix first),
    then the PCRs (with what the init said about the NSM), then the heartbeat."""
    problems = compare_pcrs(expected, reported)
    if problems and nsm_problems:
        problems.append("the init said: " + "; ".join(nsm_problems))
    pcrs_match = not problems
    if not console_ok:
        return EmulatorVerdict(False, console_reason, BootCheckFailed.code, pcrs_match)
    if problems:
        return EmulatorVerdict(False, "PCRs differ from the Build's: " + "; ".join(problems),
                               BootCheckPcrMismatch.code, False)
    if not heartbeat:
        return EmulatorVerdict(False, f"the enclave sent no heartbeat to the parent (vsock port {HEARTBEAT_PORT}); "
                               + console_reason, BootCheckNoHeartbeat.code, True)
    return EmulatorVerdict(True, console_reason + "; PCRs equal the Build's; heartbeat received",
                           BootCheckFailed.code, True)


# --- choosing the mode -----------------------------------------------------------------------------
@dataclass(frozen=True)
class BootCheckPlan:
    """How a boot check runs: the mode asked for (`auto`, `emulator`, `plain`), the emulator's QEMU,
    the timeout. `backend` is the vsock backend's argv prefix (default: this Python's `-m worker.emulator`)."""

    timeout: float = DEFAULT_TIMEOUT
    mode: str = AUTO
    emulator_qemu: Path = Path(".state/emulator/qemu-system-x86_64")
    plain_qemu: str = QEMU
    backend: tuple[str, ...] = field(default_factory=lambda: (sys.executable, "-m", BACKEND_MODULE))

    @classmethod
    def from_settings(cls, settings: Settings, *, timeout: float | None = None) -> BootCheckPlan:
        return cls(timeout=float(settings.boot_check_timeout if timeout is None else timeout),
                   mode=settings.boot_check_mode, emulator_qemu=settings.emulator_qemu)


def emulator_missing(plan: BootCheckPlan) -> str | None:
    """Why the emulator cannot run here (None when it can)."""
    if not os.access(plan.emulator_qemu, os.X_OK):
        return f"no emulator at {plan.emulator_qemu} (make setup builds it)"
    if plan.backend[1:3] == ("-m", BACKEND_MODULE) and importlib.util.find_spec(BACKEND_MODULE) is None:
        return f"the vsock backend ({BACKEND_MODULE}) is not installed"
    return None


def choose_mode(plan: BootCheckPlan) -> tuple[str, str | None]:
    """(mode to boot in, why `auto` fell back to plain or None). `emulator` asked for and missing raises."""
    if plan.mode not in MODES:
        raise BootCheckUnavailable(f"unknown boot check mode {plan.mode!r}", details={"mode": plan.mode})
    if plan.mode == MODE_PLAIN:
        return MODE_PLAIN, None
    missing = emulator_missing(plan)
    if missing is None:
        return MODE_EMULATOR, None
    if plan.mode == MODE_EMULATOR:
        raise BootCheckUnavailable(f"boot check mode emulator: {missing}", details={"mode": plan.mode})
    return MODE_PLAIN, missing


def run_boot_check(eif_path: Path, *, plan: BootCheckPlan, expected: Mapping[str, str],
                   scratch: Path | None = None, settle: float = DEFAULT_SETTLE) -> BootResult:
    """The boot check as the pipeline and `nitroconv boot-check` run it: in the emulator when the plan
    allows and it is here, else the plain boot (a fallback under `auto` is logged and recorded)."""
    mode, fallback = choose_mode(plan)
    if mode == MODE_EMULATOR:
        return boot_eif_emulated(eif_path, expected=expected, timeout=plan.timeout, settle=settle,
                                 qemu=str(plan.emulator_qemu), backend=plan.backend)
    if fallback is not None:
        log.warning("boot check: booting plain QEMU, not the emulator: %s", fallback)
    result = boot_eif(eif_path, timeout=plan.timeout, scratch=scratch, settle=settle, qemu=plan.plain_qemu)
    return replace(result, fallback_reason=fallback)


# --- the boot --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _has_sandbox(qemu: str) -> bool:
    # A QEMU built without seccomp (the emulator's minimal build) refuses -sandbox, though -help lists it;
    # options are parsed in order, so `-sandbox on -version` fails there or prints the version.
    try:
        done = subprocess.run([qemu, "-sandbox", "on", "-version"], capture_output=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


def emulator_command(*, eif: Path, vhost_socket: Path, memory_mib: int, qemu: str,
                     sandbox: bool = True) -> list[str]:
    """The QEMU argv: the nitro-enclave machine loading `eif` itself, its vsock served over `vhost_socket`,
    TCG (nested KVM is not to be had), the serial console on stdout, a reset ends QEMU.

    The nitro-enclave machine shares guest memory (memfd) with the vhost-user backend by itself. The
    guest may be hostile: no network, no disk, no monitor, QEMU's seccomp sandbox when it has one.
    """
    argv = [
        qemu,
        "-machine", "nitro-enclave,vsock=vsock0",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-chardev", f"socket,id=vsock0,path={vhost_socket}",
        "-kernel", str(eif),
    ]
    if sandbox:
        argv += ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"]
    return argv


class HeartbeatListener:
    """The parent's port 9000: accepts the enclave's connections (via the backend's `<uds>_9000`), reads
    one byte, echoes it when it is 0xB7, and records when that happened.

    Runs in a thread of its own so the console loop stays the plain boot's.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.received_at: float | None = None
        self.wrong: list[int] = []
        self._stop = threading.Event()
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.bind(str(path))
        self._sock.listen(4)
        self._thread = threading.Thread(target=self._serve, name="heartbeat", daemon=True)

    def start(self) -> HeartbeatListener:
        self._thread.start()
        return self

    @property
    def came(self) -> bool:
        return self.received_at is not None

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
        conn.settimeout(_HEARTBEAT_READ_TIMEOUT)
        try:
            data = conn.recv(1)
            if data == bytes([HEARTBEAT_BYTE]):
                if self.received_at is None:
                    self.received_at = time.monotonic()
                conn.sendall(data)
            elif data:
                self.wrong.append(data[0])
        except OSError:
            return

    def close(self) -> None:
        """Stop listening (connections to the port are refused from now on)."""
        self._sock.close()
        self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
        self.close()


@dataclass
class _Backend:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def tail(self) -> str:
        try:
            data = self.log_path.read_bytes()[-_KEEP_LOG:]
        except OSError:
            return ""
        return " ".join(data.decode("utf-8", "replace").split())[-500:]


def _start_backend(backend: Sequence[str], *, vhost_socket: Path, uds: Path, log_path: Path) -> _Backend:
    argv = [*backend, "--vhost-socket", str(vhost_socket), "--uds", str(uds), "--guest-cid", str(GUEST_CID)]
    with log_path.open("wb") as out:
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            raise BootCheckUnavailable(f"cannot start the vsock backend: {exc.strerror or exc}",
                                       details={"backend": argv[:3]}) from exc
    started = _Backend(proc, log_path)
    deadline = time.monotonic() + _BACKEND_READY_TIMEOUT
    while not vhost_socket.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            _end(proc)
            raise BootCheckUnavailable(
                f"the vsock backend did not come up (status {proc.returncode}): {started.tail()}",
                details={"backend": argv[:3]})
        time.sleep(0.05)
    return started


def _socket_dir() -> Path:
    # Unix socket paths are limited to 107 bytes: a short private dir under the system temp dir, not scratch.
    return Path(tempfile.mkdtemp(prefix="ncvs-"))


def boot_eif_emulated(
    eif_path: Path,
    *,
    expected: Mapping[str, str],
    timeout: float = DEFAULT_TIMEOUT,
    memory_mib: int | None = None,
    settle: float = DEFAULT_SETTLE,
    qemu: str,
    backend: Sequence[str] = (sys.executable, "-m", BACKEND_MODULE),
    answer_heartbeat: bool = True,
) -> BootResult:
    """Boot `eif_path` in the emulator and judge it: the entrypoint starts (as in the plain boot), the
    PCRs the init read from the emulator's NSM equal `expected` (`{"PCR0": hex, …}`), the heartbeat came.

    `answer_heartbeat=False` leaves the parent's port 9000 closed (how a parent that never answers
    looks to the enclave; the tests' way to see the check fail for it).
    Raises `BootCheckUnavailable` when the emulator or its backend cannot be started at all.
    """
    eif_path = Path(eif_path)
    memory = memory_mib or memory_for(eif_path.stat().st_size)
    sockets = _socket_dir()
    vhost_socket, uds = sockets / "vhost.sock", sockets / "vsock"
    heartbeat = HeartbeatListener(Path(f"{uds}_{HEARTBEAT_PORT}"))
    if answer_heartbeat:
        heartbeat.start()
    else:
        heartbeat.close()
    parser = EmulatorConsoleParser()
    started = time.monotonic()
    proc: subprocess.Popen[bytes] | None = None
    backend_proc: _Backend | None = None
    try:
        backend_proc = _start_backend(backend, vhost_socket=vhost_socket, uds=uds, log_path=sockets / "backend.log")
        argv = emulator_command(eif=eif_path.resolve(), vhost_socket=vhost_socket, memory_mib=memory, qemu=qemu,
                                sandbox=_has_sandbox(qemu))
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True, close_fds=True)
        except OSError as exc:
            raise BootCheckUnavailable(f"cannot start {qemu}: {exc.strerror or exc}", details={"qemu": qemu}) from exc
        try:
            watch = _watch(proc, parser, started=started, timeout=timeout, settle=settle, after_exit=AFTER_EXIT)
        finally:
            code = _end(proc)
    finally:
        heartbeat.stop()
        backend_tail = ""
        if backend_proc is not None:
            _end(backend_proc.proc)
            backend_tail = backend_proc.tail()
        shutil.rmtree(sockets, ignore_errors=True)
    seconds = time.monotonic() - started
    console = parser.verdict()
    console_reason = console.reason
    if not console.ok:
        if watch.timed_out:
            console_reason += f" (timed out after {timeout:g}s)"
        elif not console.init_started and code != 0:
            detail = " ".join(watch.stderr.split())[:500]
            console_reason += f" (qemu exited with status {code}{': ' + detail if detail else ''})"
            if backend_tail:
                console_reason += f" (vsock backend: {backend_tail})"
    if parser.bad_pcr_lines:
        console_reason += f" ({len(parser.bad_pcr_lines)} malformed PCR line(s))"
    verdict = judge(console_ok=console.ok, console_reason=console_reason, expected=expected,
                    reported=parser.pcrs, heartbeat=heartbeat.came, nsm_problems=parser.nsm_problems)
    return BootResult(
        ok=verdict.ok,
        seconds=seconds,
        console_tail=console.console_tail,
        program_output=console.program_output,
        exit_status=console.exit_status,
        reason=verdict.reason,
        exec_seconds=watch.exec_seconds,
        mode=MODE_EMULATOR,
        pcrs={pcr_name(i): parser.pcrs[i] for i in sorted(parser.pcrs)},
        pcrs_match=verdict.pcrs_match,
        heartbeat=heartbeat.came,
        error_code=verdict.error_code,
    )
