"""Boot check in the emulator: QEMU's nitro-enclave machine loads the EIF, our vsock backend beside it.

What it adds to the plain boot (worker/pipeline/bootcheck.py): QEMU's own EIF loader accepts the file
(header, sections, CRC); QEMU measures the EIF itself and its NSM device serves the PCRs, which our init
reads from /dev/nsm and prints (`nitroconv-init: pcr <n> <hex>`), so PCR0/1/2 (and 8 when signed) are
computed by code that is not ours and compared with the Build's; and the init's "enclave ready"
heartbeat travels over real vsock to the parent side here, which echoes it as nitro-cli does.

The machine, the vsock backend (`python -m worker.emulator`, mapping the guest's connection to the
parent's port P onto the Unix socket `<uds>_P`) and the heartbeat's answer are an emulator session
(worker/emulator/session.py), as for `nitroconv run-local`; this module reads the console and judges.
"""
from __future__ import annotations

import importlib.util
import logging
import os
import re
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from common.errors import (
    BootCheckFailed,
    BootCheckNoHeartbeat,
    BootCheckNoSandbox,
    BootCheckPcrMismatch,
    BootCheckUnavailable,
    EmulatorNoSandbox,
    EmulatorUnavailable,
)
from worker.emulator.session import BACKEND_MODULE, HEARTBEAT_PORT, EmulatorSession
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

# The nitro-enclave machine does not always end on the init's reset: once the program's exit line is in, the
# verdict is final, and only this long is left for the kernel's last lines.
AFTER_EXIT = 0.5

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
    """Why the emulator cannot run the boot check here (None when it can)."""
    problem = _emulator_problem(plan)
    return problem[1] if problem is not None else None


def _emulator_problem(plan: BootCheckPlan) -> tuple[type[BootCheckUnavailable], str] | None:
    if not os.access(plan.emulator_qemu, os.X_OK):
        return BootCheckUnavailable, f"no emulator at {plan.emulator_qemu} (make setup builds it)"
    if plan.backend[1:3] == ("-m", BACKEND_MODULE) and importlib.util.find_spec(BACKEND_MODULE) is None:
        return BootCheckUnavailable, f"the vsock backend ({BACKEND_MODULE}) is not installed"
    # The images booted are anyone's: the session's default policy requires the seccomp sandbox.
    refused = EmulatorSession.refusal(str(plan.emulator_qemu))
    if refused is not None:
        return BootCheckNoSandbox, refused
    return None


def choose_mode(plan: BootCheckPlan) -> tuple[str, str | None]:
    """(mode to boot in, why `auto` fell back to plain or None). `emulator` asked for and missing (or
    without its sandbox: `boot_check_no_sandbox`) raises."""
    if plan.mode not in MODES:
        raise BootCheckUnavailable(f"unknown boot check mode {plan.mode!r}", details={"mode": plan.mode})
    if plan.mode == MODE_PLAIN:
        return MODE_PLAIN, None
    problem = _emulator_problem(plan)
    if problem is None:
        return MODE_EMULATOR, None
    error, missing = problem
    if plan.mode == MODE_EMULATOR:
        raise error(f"boot check mode emulator: {missing}", details={"mode": plan.mode})
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
    Raises `BootCheckUnavailable` when the emulator or its backend cannot be started at all, and
    `BootCheckNoSandbox` (before starting anything) when the emulator's QEMU has no seccomp sandbox.
    """
    eif_path = Path(eif_path)
    session = EmulatorSession(qemu=qemu, eif=eif_path, memory_mib=memory_mib or memory_for(eif_path.stat().st_size),
                              backend=backend, backend_log=True, answer_heartbeat=answer_heartbeat)
    parser = EmulatorConsoleParser()
    started = time.monotonic()
    try:
        try:
            proc = session.start()
        except EmulatorNoSandbox as exc:
            raise BootCheckNoSandbox(exc.message, details=exc.details) from exc
        except EmulatorUnavailable as exc:
            raise BootCheckUnavailable(str(exc), details=exc.details) from exc
        try:
            watch = _watch(proc, parser, started=started, timeout=timeout, settle=settle, after_exit=AFTER_EXIT)
        finally:
            # The verdict is in: QEMU is killed at once, not asked.
            code = session.stop_qemu()
    finally:
        session.close()
    heartbeat = session.heartbeat_came
    backend_tail = session.backend_tail()
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
                    reported=parser.pcrs, heartbeat=heartbeat, nsm_problems=parser.nsm_problems)
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
        heartbeat=heartbeat,
        error_code=verdict.error_code,
    )
