"""Boot check: boot an EIF's own kernel, cmdline and ramdisks under QEMU and read the init's console markers."""
from __future__ import annotations

import math
import os
import re
import selectors
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

from common.errors import (
    BootCheckFailed,
    BootCheckNoHeartbeat,
    BootCheckPcrMismatch,
    BootCheckUnavailable,
    InvalidEif,
)

# The console markers of worker/runtime/init.c (its NCI_* defines); a unit test keeps the two in step.
INIT_PREFIX = "nitroconv-init: "
MARK_START = "nitroconv-init: start"
MARK_LAUNCH = "nitroconv-init: launch "
MARK_EXEC_OK = "nitroconv-init: exec ok "
MARK_EXEC_FAILED = "nitroconv-init: exec failed: "
MARK_EXIT = "nitroconv-init: exit "
MARK_FATAL = "nitroconv-init: fatal: "
# With the NSM (the emulator, a Nitro host): `pcr <n> <hex>` for PCR0, 1, 2 and 8, as the NSM reports them.
MARK_PCR = "nitroconv-init: pcr "
MARK_NO_NSM = "nitroconv-init: no nsm "
MARK_NSM_ERROR = "nitroconv-init: nsm error: "
C_MARKERS: Mapping[str, str] = {
    "NCI_PREFIX": INIT_PREFIX,
    "NCI_START": MARK_START,
    "NCI_LAUNCH": MARK_LAUNCH,
    "NCI_EXEC_OK": MARK_EXEC_OK,
    "NCI_EXEC_FAILED": MARK_EXEC_FAILED,
    "NCI_EXIT": MARK_EXIT,
    "NCI_FATAL": MARK_FATAL,
    "NCI_PCR": MARK_PCR,
    "NCI_NO_NSM": MARK_NO_NSM,
    "NCI_NSM_ERROR": MARK_NSM_ERROR,
}

# The exec shim (worker/runtime/shim.c) is what the init execs; it prints these notices and carries on,
# and prints anything else under its prefix only when it fails to start the program (then exits 126/127).
SHIM_PREFIX = "nitroconv-shim: "
SHIM_NOTICES = ("no run-time values ", "run-time values ignored ", "refused ")
# The daemons the shim starts before the program (worker/runtime/netup.h) print under their own prefixes; their
# lines are the converter's, not the program's output.
DAEMON_PREFIXES = ("nitroconv-egressd: ", "nitroconv-netd: ", "nitroconv-attestd: ")
SHIM_EXIT_CODES = (126, 127)

QEMU = "qemu-system-x86_64"
DEFAULT_TIMEOUT = 120.0
# How long a program that keeps running (a server) is watched after its exec, for its first output.
DEFAULT_SETTLE = 5.0
MIN_MEMORY_MIB = 512
# The initramfs is unpacked next to its packed copy: an enclave needs about 4x the EIF (nitro-cli#196).
EIF_MEMORY_FACTOR = 4
TAIL_LINES = 40
OUTPUT_LINES = 40
MAX_LINE_CHARS = 400
# A guest can print anything, for as long as the timeout lets it; only this much of a line is buffered.
MAX_LINE_BYTES = 4096
_STDERR_KEEP = 4000
_READ_SIZE = 1 << 16
_MIB = 1 << 20

_KERNEL_LINE = re.compile(r"\[\s*\d+\.\d+\]")
# Appended to the cmdline of the check's boot (not measured, console format only): kernel lines then carry the
# timestamp `_KERNEL_LINE` recognises even from a kernel built without CONFIG_PRINTK_TIME (the dev kernel). Without
# it, a warning the kernel prints while the program runs (on a loaded host the clocksource watchdog's "Long readout
# interval", hrtimer's "interrupt took") is indistinguishable from the program's own output.
CHECK_CMDLINE = "printk.time=1"
_KERNEL_PANIC = "Kernel panic - not syncing:"
_EXIT_STATUS = re.compile(r"(status|signal)=(\d+)")
# C0 controls and DEL (tab kept): a console line goes into JSON, Postgres (no NUL in jsonb) and terminals.
_CONTROLS = dict.fromkeys([*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F])


def clean_line(raw: str) -> str:
    """One console line as stored: control characters dropped, bounded length."""
    line = raw.translate(_CONTROLS)
    return line if len(line) <= MAX_LINE_CHARS else line[: MAX_LINE_CHARS - 1] + "…"


@dataclass(frozen=True)
class ConsoleVerdict:
    """What the console says about one boot; `exit_status` is negative for a signal, like Popen's."""

    ok: bool
    reason: str
    exit_status: int | None
    program_output: tuple[str, ...]
    console_tail: tuple[str, ...]
    init_started: bool
    decided: bool


class ConsoleParser:
    """Incremental, bounded reading of a serial console, line by line (pure: no clock, no I/O).

    The program's output is what it prints between the init's launch line and its exit line, kernel
    log lines and init lines excluded; the exec marker may come before or after the program's first
    lines, since the parent learns of the exec only when it happens. Lines the program prints that
    look like init lines cannot make a failed exec look like a success: nothing runs after a failed
    exec but the init itself.

    The init execs the exec shim, which execs the program: the init's exec marker is then the
    shim's, and a shim failure line (not one of its notices) followed by exit 126/127, with no
    program output in between, means the program never started.
    """

    def __init__(self, *, tail_lines: int = TAIL_LINES, output_lines: int = OUTPUT_LINES) -> None:
        self._tail: deque[str] = deque(maxlen=tail_lines)
        self._output: list[str] = []
        self._output_lines = output_lines
        self.started = False
        self.launched = False
        self.exec_ok = False
        self.exec_failure: str | None = None
        self.fatal: str | None = None
        self.panic: str | None = None
        self.exit_status: int | None = None
        self._shim_error: str | None = None
        self.shim_failure: str | None = None

    @property
    def decided(self) -> bool:
        """True once the console has shown how this boot ends (the rest is only output)."""
        return self.exec_ok or self.exec_failure is not None or self.fatal is not None or self.panic is not None

    def feed(self, raw: str) -> None:
        line = clean_line(raw)
        self._tail.append(line)
        if line.startswith(INIT_PREFIX):
            self._init_line(line)
            return
        if _KERNEL_PANIC in line and self.panic is None:
            self.panic = line.split(_KERNEL_PANIC, 1)[1].strip()
        if _KERNEL_LINE.match(line):
            return
        if line.startswith(DAEMON_PREFIXES):
            return
        if self.launched and self.exit_status is None and line.startswith(SHIM_PREFIX):
            # The converter's lines, not the program's output; a hostile program printing one can only
            # make its own start look failed.
            body = line[len(SHIM_PREFIX):]
            if not body.startswith(SHIM_NOTICES):
                self._shim_error = body
            return
        if self.launched and self.exit_status is None:
            self._shim_error = None  # the program ran and printed: whatever the shim said before, it started
            if len(self._output) < self._output_lines:
                self._output.append(line)

    def _init_line(self, line: str) -> None:
        if line == MARK_START:
            self.started = True
        elif line.startswith(MARK_LAUNCH):
            self.launched = True
        elif line.startswith(MARK_EXEC_OK):
            self.exec_ok = True
        elif line.startswith(MARK_EXEC_FAILED):
            if self.exec_failure is None:
                self.exec_failure = line[len(MARK_EXEC_FAILED):]
        elif line.startswith(MARK_FATAL):
            if self.fatal is None:
                self.fatal = line[len(MARK_FATAL):]
        elif line.startswith(MARK_EXIT) and self.exit_status is None and self.launched:
            match = _EXIT_STATUS.match(line[len(MARK_EXIT):])
            if match:
                number = int(match.group(2))
                self.exit_status = number if match.group(1) == "status" else -number
                if self.exit_status in SHIM_EXIT_CODES and self._shim_error is not None:
                    self.shim_failure = self._shim_error

    def verdict(self) -> ConsoleVerdict:
        return ConsoleVerdict(
            ok=self.exec_ok and self.shim_failure is None,
            reason=self._reason(),
            exit_status=self.exit_status,
            program_output=tuple(self._output),
            console_tail=tuple(self._tail),
            init_started=self.started,
            decided=self.decided,
        )

    def _reason(self) -> str:
        if self.exec_ok and self.shim_failure is not None:
            return f"the entrypoint did not start: {self.shim_failure} (status {self.exit_status})"
        if self.exec_ok:
            status = self.exit_status
            if status is None:
                return "entrypoint exec'd; still running when the check ended"
            if status < 0:
                return f"entrypoint exec'd; killed by signal {-status}"
            return f"entrypoint exec'd; exited with status {status}"
        if self.exec_failure is not None:
            return f"exec failed: {self.exec_failure}"
        if self.fatal is not None:
            return f"init failed: {self.fatal}"
        if self.panic is not None:
            return f"kernel panic: {self.panic}"
        if self.launched:
            return "init launched the entrypoint but never reported the exec"
        if self.started:
            return "init started but did not reach the entrypoint"
        return "the init never started"


def parse_console(lines: Iterable[str]) -> ConsoleVerdict:
    """Pure: the verdict for a whole console transcript."""
    parser = ConsoleParser()
    for line in lines:
        parser.feed(line)
    return parser.verdict()


class BootCheckJson(TypedDict):
    ok: bool
    seconds: float
    exec_seconds: float | None
    console_tail: list[str]
    program_output: list[str]
    exit_status: int | None
    reason: str
    mode: str
    fallback_reason: str | None
    pcrs: dict[str, str] | None
    pcrs_match: bool | None
    heartbeat: bool | None


# A failed check raises the error of its first failure (worker/pipeline/emulatorboot.py decides which).
FAILURES: Mapping[str, type[BootCheckFailed]] = {
    cls.code: cls for cls in (BootCheckFailed, BootCheckPcrMismatch, BootCheckNoHeartbeat)}
MODE_PLAIN = "plain"
MODE_EMULATOR = "emulator"


@dataclass(frozen=True)
class BootResult:
    """One boot check, as it goes into a Build's `conversion.boot_check`.

    `ok` means the init's marker showed the entrypoint was exec'd (whatever its exit status) and
    the exec shim, when there is one, did not report failing to start the program;
    `seconds` is the whole check, `exec_seconds` the time from QEMU's start to the marker.
    In the emulator (`mode` "emulator") `ok` also needs `pcrs` (as the emulator's NSM measured them,
    read by the init) equal to the Build's and the heartbeat to have come; a plain boot has neither
    (None). `fallback_reason` says why `auto` booted plain; `error_code` names the first failure.
    """

    ok: bool
    seconds: float
    console_tail: tuple[str, ...]
    program_output: tuple[str, ...]
    exit_status: int | None
    reason: str
    exec_seconds: float | None = None
    mode: str = MODE_PLAIN
    fallback_reason: str | None = None
    pcrs: Mapping[str, str] | None = None
    pcrs_match: bool | None = None
    heartbeat: bool | None = None
    error_code: str = BootCheckFailed.code

    def to_json(self) -> BootCheckJson:
        return {
            "ok": self.ok,
            "seconds": round(self.seconds, 3),
            "exec_seconds": None if self.exec_seconds is None else round(self.exec_seconds, 3),
            "console_tail": list(self.console_tail),
            "program_output": list(self.program_output),
            "exit_status": self.exit_status,
            "reason": self.reason,
            "mode": self.mode,
            "fallback_reason": self.fallback_reason,
            "pcrs": None if self.pcrs is None else dict(self.pcrs),
            "pcrs_match": self.pcrs_match,
            "heartbeat": self.heartbeat,
        }

    def raise_if_failed(self) -> None:
        """For a pipeline that must not publish an image whose entrypoint does not start (or, in the
        emulator, whose PCRs are not the Build's, or that never sent its heartbeat)."""
        if not self.ok:
            error = FAILURES.get(self.error_code, BootCheckFailed)
            raise error(f"boot check failed: {self.reason}", details={"boot_check": dict(self.to_json())})


def memory_for(eif_size: int) -> int:
    """Guest memory (MiB) for an EIF of `eif_size` bytes: 4x its size in 64 MiB steps, at least 512."""
    need = math.ceil(EIF_MEMORY_FACTOR * eif_size / _MIB)
    return max(MIN_MEMORY_MIB, -(-need // 64) * 64)


def qemu_command(*, kernel: Path, initrd: Path, cmdline: str, memory_mib: int, qemu: str = QEMU) -> list[str]:
    """The QEMU argv: software emulation only, no devices but the serial console on stdout, a reset ends QEMU.

    The guest may be a hostile image: no network, no disk, no monitor, and QEMU's seccomp sandbox
    (no new privileges, no spawning) in case it breaks out of TCG.
    """
    return [
        qemu,
        "-machine", "q35",
        "-accel", "tcg",
        "-cpu", "max",
        "-smp", "1",
        "-m", str(memory_mib),
        "-nodefaults",
        "-no-user-config",
        "-display", "none",
        "-serial", "stdio",
        "-no-reboot",
        "-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        "-kernel", str(kernel),
        "-initrd", str(initrd),
        "-append", f"{cmdline} {CHECK_CMDLINE}" if cmdline else CHECK_CMDLINE,
    ]


class LineSplitter:
    """Splits a byte stream into console lines, never buffering more than one bounded line."""

    def __init__(self, *, max_line_bytes: int = MAX_LINE_BYTES) -> None:
        self._partial = bytearray()
        self._max = max_line_bytes

    def push(self, data: bytes) -> list[str]:
        self._partial += data
        lines: list[str] = []
        while True:
            cut = self._partial.find(b"\n")
            if cut < 0:
                if len(self._partial) <= self._max:
                    return lines
                cut = self._max
                lines.append(self._partial[:cut].decode("utf-8", "replace"))
                del self._partial[:cut]
                continue
            lines.append(self._partial[:cut].decode("utf-8", "replace"))
            del self._partial[: cut + 1]

    def flush(self) -> list[str]:
        rest, self._partial = bytes(self._partial), bytearray()
        return [rest.decode("utf-8", "replace")] if rest else []


@dataclass(frozen=True)
class _Watch:
    timed_out: bool
    exec_seconds: float | None
    stderr: str


def _watch(proc: subprocess.Popen[bytes], parser: ConsoleParser, *, started: float, timeout: float,
           settle: float, after_exit: float | None = None) -> _Watch:
    """Feed the console to `parser` until QEMU closes it, the timeout passes, or `settle` after the verdict
    (or `after_exit` after the program's exit line, for a machine that may not end on the init's reset)."""
    assert proc.stdout is not None and proc.stderr is not None
    deadline = started + timeout
    stop_at = deadline
    exec_seconds: float | None = None
    stderr = bytearray()
    lines = LineSplitter()
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ, "console")
        sel.register(proc.stderr, selectors.EVENT_READ, "stderr")
        while sel.get_map():
            now = time.monotonic()
            if now >= stop_at:
                break
            for key, _ in sel.select(stop_at - now):
                data = os.read(key.fd, _READ_SIZE)
                if not data:
                    sel.unregister(key.fileobj)
                    if key.data == "console":
                        for line in lines.flush():
                            parser.feed(line)
                    continue
                if key.data == "stderr":
                    stderr += data[: max(0, _STDERR_KEEP - len(stderr))]
                    continue
                for line in lines.push(data):
                    parser.feed(line)
            if parser.exec_ok and exec_seconds is None:
                exec_seconds = time.monotonic() - started
            if parser.decided and stop_at == deadline:
                stop_at = min(deadline, time.monotonic() + settle)
            if after_exit is not None and parser.exit_status is not None:
                stop_at = min(stop_at, time.monotonic() + after_exit)
    timed_out = not parser.decided and time.monotonic() >= deadline
    return _Watch(timed_out, exec_seconds, stderr.decode("utf-8", "replace"))


def _end(proc: subprocess.Popen[bytes]) -> int:
    # QEMU leads its own process group: kill the group, even if QEMU already exited (its zombie holds the id).
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    code = proc.wait()
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return code


def boot_kernel(
    kernel: Path,
    initrd: Path,
    cmdline: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mib: int = MIN_MEMORY_MIB,
    settle: float = DEFAULT_SETTLE,
    qemu: str = QEMU,
) -> BootResult:
    """Boot `kernel` with `initrd` and `cmdline` under QEMU (TCG) and judge the console.

    Ends when QEMU exits (the init reboots once the program exits), `settle` seconds after the
    verdict if the program keeps running, or at `timeout` (QEMU's process group is killed).
    Raises `BootCheckUnavailable` when QEMU cannot be started at all.
    """
    argv = qemu_command(kernel=kernel, initrd=initrd, cmdline=cmdline, memory_mib=memory_mib, qemu=qemu)
    parser = ConsoleParser()
    started = time.monotonic()
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                start_new_session=True, close_fds=True)
    except OSError as exc:
        raise BootCheckUnavailable(f"cannot start {qemu}: {exc.strerror or exc}", details={"qemu": qemu}) from exc
    try:
        watch = _watch(proc, parser, started=started, timeout=timeout, settle=settle)
    finally:
        code = _end(proc)
    seconds = time.monotonic() - started
    verdict = parser.verdict()
    reason = verdict.reason
    if not verdict.ok:
        if watch.timed_out:
            reason += f" (timed out after {timeout:g}s)"
        elif not verdict.init_started and code != 0:
            detail = " ".join(watch.stderr.split())[:500]
            reason += f" (qemu exited with status {code}{': ' + detail if detail else ''})"
    return BootResult(
        ok=verdict.ok,
        seconds=seconds,
        console_tail=verdict.console_tail,
        program_output=verdict.program_output,
        exit_status=verdict.exit_status,
        reason=reason,
        exec_seconds=watch.exec_seconds,
    )


def _write(out: Path, parts: Iterable[Iterable[bytes]]) -> None:
    with out.open("wb") as f:
        for chunks in parts:
            for chunk in chunks:
                f.write(chunk)


def boot_eif(
    eif_path: Path,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    memory_mib: int | None = None,
    settle: float = DEFAULT_SETTLE,
    scratch: Path | None = None,
    qemu: str = QEMU,
) -> BootResult:
    """Boot the EIF's own kernel, cmdline and concatenated ramdisks (the loader's view) under QEMU.

    `memory_mib` defaults to `memory_for(EIF size)`; the kernel and initramfs are written to a
    temporary directory under `scratch` (default: the system temp dir) and removed afterwards.
    Raises `InvalidEif` for a file that is not a bootable EIF, `BootCheckUnavailable` without QEMU.
    """
    from common.enclave.reader import iter_section_data, read_eif

    eif_path = Path(eif_path)
    info = read_eif(eif_path)
    if info.arch != "x86_64":
        raise BootCheckUnavailable(f"an {info.arch} EIF cannot boot under {qemu}", details={"arch": info.arch})
    if b"\0" in info.cmdline:
        raise InvalidEif("the cmdline section contains a NUL byte", details={"reason": "bad_cmdline"})
    with tempfile.TemporaryDirectory(prefix="nitroconv-boot-", dir=scratch) as tmp:
        kernel, initrd = Path(tmp, "kernel"), Path(tmp, "initrd")
        _write(kernel, [iter_section_data(eif_path, info.kernel)])
        # The loader hands the enclave kernel one initramfs: the ramdisks in file order, back to back.
        _write(initrd, (iter_section_data(eif_path, ramdisk) for ramdisk in info.ramdisks))
        return boot_kernel(
            kernel,
            initrd,
            os.fsdecode(info.cmdline),
            timeout=timeout,
            memory_mib=memory_mib or memory_for(info.size),
            settle=settle,
            qemu=qemu,
        )
