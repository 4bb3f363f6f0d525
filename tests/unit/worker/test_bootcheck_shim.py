"""The boot check's reading of the exec shim's console lines: a shim that cannot start the program fails it."""
from __future__ import annotations

import re
from pathlib import Path

from worker.pipeline.bootcheck import (
    INIT_PREFIX,
    MARK_EXEC_OK,
    MARK_EXIT,
    MARK_LAUNCH,
    MARK_START,
    SHIM_NOTICES,
    SHIM_PREFIX,
    parse_console,
)

SHIM_C = Path(__file__).resolve().parents[3] / "worker" / "runtime" / "shim.c"
NOTICE = SHIM_PREFIX + "no run-time values (vsock unavailable: Address family not supported by protocol), using the defaults"
SHIM_START = [MARK_START, MARK_LAUNCH + "argc=4 argv0=/.nitroconv/shim", MARK_EXEC_OK + "pid=80 argv0=/.nitroconv/shim"]


def test_bootcheck_shim_notices_mirror_the_shim_source() -> None:
    source = SHIM_C.read_text()
    assert re.search(r'#define SHIM_PREFIX "' + re.escape(SHIM_PREFIX) + '"', source)
    for notice in SHIM_NOTICES:
        assert f'SHIM_PREFIX "{notice}' in source, notice


def test_bootcheck_shim_exec_failure_fails_the_check() -> None:
    verdict = parse_console([*SHIM_START, NOTICE,
                             SHIM_PREFIX + "exec /no/such/program: No such file or directory", MARK_EXIT + "status=127"])
    assert not verdict.ok
    assert "did not start: exec /no/such/program: No such file or directory" in verdict.reason
    assert verdict.exit_status == 127 and verdict.program_output == ()


def test_bootcheck_shim_lines_are_not_program_output() -> None:
    verdict = parse_console([*SHIM_START, NOTICE, SHIM_PREFIX + "refused env SECRET: not in mutable_env_vars",
                             "hello", MARK_EXIT + "status=0"])
    assert verdict.ok and verdict.program_output == ("hello",)
    assert NOTICE in verdict.console_tail


def test_bootcheck_shim_notice_then_a_silent_exit_127_is_the_programs() -> None:
    # A program may itself exit 127 without printing; only a shim failure line marks a failed start.
    verdict = parse_console([*SHIM_START, NOTICE, MARK_EXIT + "status=127"])
    assert verdict.ok and verdict.exit_status == 127


def test_bootcheck_shim_like_line_after_program_output_does_not_fail_a_start() -> None:
    # The program started (it printed); a later forged shim line only affects its own verdict if it is
    # the last word before a 126/127 exit, which a program could cause anyway by exiting so.
    verdict = parse_console([*SHIM_START, "started", MARK_EXIT + "status=0"])
    assert verdict.ok
    failed = parse_console([*SHIM_START, "started", SHIM_PREFIX + "exec x: denied", MARK_EXIT + "status=1"])
    assert failed.ok


def test_bootcheck_init_lines_keep_their_meaning_with_the_shim() -> None:
    verdict = parse_console([*SHIM_START, NOTICE, INIT_PREFIX + "something else", "out", MARK_EXIT + "status=0"])
    assert verdict.ok and verdict.program_output == ("out",)
