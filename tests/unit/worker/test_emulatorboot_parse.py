"""Unit tests of the emulator boot check's pure parts: PCR lines, the verdict's order, the mode chosen."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from common.errors import BootCheckFailed, BootCheckNoHeartbeat, BootCheckPcrMismatch, BootCheckUnavailable
from common.settings import Settings
from worker.pipeline.bootcheck import (
    INIT_PREFIX,
    MARK_EXEC_OK,
    MARK_EXIT,
    MARK_LAUNCH,
    MARK_START,
    BootResult,
)
from worker.pipeline.emulatorboot import (
    MARK_PCR,
    BootCheckPlan,
    EmulatorConsoleParser,
    choose_mode,
    compare_pcrs,
    expected_registers,
    judge,
    parse_pcr_line,
)

P0, P1, P2, P8 = "a" * 96, "b" * 96, "c" * 96, "d" * 96
EXPECTED = {"PCR0": P0, "PCR1": P1, "PCR2": P2}


def _boot(*pcr_lines: str, program: tuple[str, ...] = ("hello",)) -> EmulatorConsoleParser:
    parser = EmulatorConsoleParser()
    for line in (MARK_START, INIT_PREFIX + "NSM driver loaded", *pcr_lines, INIT_PREFIX + "heartbeat acknowledged",
                 MARK_LAUNCH + "argc=1 argv0=/bin/app", MARK_EXEC_OK + "pid=80 argv0=/bin/app", *program,
                 MARK_EXIT + "status=0"):
        parser.feed(line)
    return parser


def test_parse_pcr_line_reads_index_and_lowercases_the_digest():
    assert parse_pcr_line(f"{MARK_PCR}0 {P0.upper()}") == (0, P0)
    assert parse_pcr_line(f"{MARK_PCR}8 {P8}\r") == (8, P8)


@pytest.mark.parametrize("line", [
    f"{MARK_PCR}0 {'a' * 95}",          # short digest
    f"{MARK_PCR}0 {'a' * 97}",          # long digest
    f"{MARK_PCR}x {P0}",                # no index
    f"{MARK_PCR}0 {'g' * 96}",          # not hex
    f"{MARK_PCR}0  {P0} extra",         # trailing junk
    f"{INIT_PREFIX}pcrs {P0}",          # another init line
    f"pcr 0 {P0}",                      # not the init's
])
def test_parse_pcr_line_refuses_anything_else(line):
    assert parse_pcr_line(line) is None


def test_console_keeps_pcr_lines_before_the_launch_only_and_the_first_per_register():
    forged = f"{MARK_PCR}0 {'f' * 96}"
    parser = _boot(f"{MARK_PCR}0 {P0}", f"{MARK_PCR}1 {P1}", f"{MARK_PCR}1 {'e' * 96}", f"{MARK_PCR}2 {P2}",
                   f"{MARK_PCR}8 {'0' * 96}", f"{MARK_PCR}9 bad", program=(forged, "hello"))
    assert parser.pcrs == {0: P0, 1: P1, 2: P2, 8: "0" * 96}
    assert parser.bad_pcr_lines == [f"{MARK_PCR}9 bad"]
    verdict = parser.verdict()
    assert verdict.ok and verdict.program_output == ("hello",)


def test_a_program_printing_pcr_lines_cannot_supply_missing_ones():
    parser = _boot(program=(f"{MARK_PCR}0 {P0}", f"{MARK_PCR}1 {P1}", f"{MARK_PCR}2 {P2}"))
    assert parser.pcrs == {}
    assert judge(console_ok=True, console_reason="r", expected=EXPECTED, reported=parser.pcrs,
                 heartbeat=True).error_code == "boot_check_pcr_mismatch"


def test_expected_registers_drops_the_algorithm_and_absent_pcr8():
    assert expected_registers({"HashAlgorithm": "Sha384 { ... }", "PCR0": P0.upper(), "PCR1": P1, "PCR2": P2}) \
        == EXPECTED
    assert expected_registers({"PCR0": P0, "PCR8": P8, "PCR9": None}) == {"PCR0": P0, "PCR8": P8}


def test_compare_pcrs_names_each_missing_or_different_register():
    assert compare_pcrs(EXPECTED, {0: P0, 1: P1, 2: P2, 8: "0" * 96}) == []
    problems = compare_pcrs({**EXPECTED, "PCR8": P8}, {0: P0, 1: "9" * 96, 2: P2})
    assert problems == [f"PCR1 measured by the emulator is {'9' * 96}, the Build's is {P1}",
                        "the init reported no PCR8 from the emulator's NSM"]


def test_judge_reports_the_entrypoint_first_then_pcrs_then_heartbeat():
    wrong = {0: "9" * 96, 1: P1, 2: P2}
    right = {0: P0, 1: P1, 2: P2}
    entry = judge(console_ok=False, console_reason="exec failed: /nope", expected=EXPECTED, reported=wrong,
                  heartbeat=False)
    assert (entry.ok, entry.error_code, entry.reason, entry.pcrs_match) == \
        (False, "boot_check_failed", "exec failed: /nope", False)
    pcrs = judge(console_ok=True, console_reason="ok", expected=EXPECTED, reported=wrong, heartbeat=False)
    assert (pcrs.ok, pcrs.error_code) == (False, "boot_check_pcr_mismatch")
    assert pcrs.reason.startswith("PCRs differ from the Build's: PCR0 measured by the emulator is 999")
    beat = judge(console_ok=True, console_reason="ok", expected=EXPECTED, reported=right, heartbeat=False)
    assert (beat.ok, beat.error_code, beat.pcrs_match) == (False, "boot_check_no_heartbeat", True)
    assert "no heartbeat" in beat.reason and "port 9000" in beat.reason
    good = judge(console_ok=True, console_reason="entrypoint exec'd; exited with status 0", expected=EXPECTED,
                 reported=right, heartbeat=True)
    assert good.ok and good.reason.endswith("PCRs equal the Build's; heartbeat received")


@pytest.mark.parametrize(("code", "error"), [("boot_check_failed", BootCheckFailed),
                                             ("boot_check_pcr_mismatch", BootCheckPcrMismatch),
                                             ("boot_check_no_heartbeat", BootCheckNoHeartbeat)])
def test_a_failed_emulator_result_raises_its_own_code_with_the_result(code, error):
    result = BootResult(ok=False, seconds=3.0, console_tail=(), program_output=(), exit_status=0, reason="why",
                        mode="emulator", pcrs={"PCR0": P0}, pcrs_match=False, heartbeat=True, error_code=code)
    with pytest.raises(error) as info:
        result.raise_if_failed()
    assert info.value.code == code and isinstance(info.value, BootCheckFailed)
    assert info.value.message == "boot check failed: why"
    stored = info.value.details["boot_check"]
    assert (stored["mode"], stored["pcrs"], stored["pcrs_match"], stored["heartbeat"]) == \
        ("emulator", {"PCR0": P0}, False, True)


def _plan(tmp_path: Path, mode: str, *, qemu: bool) -> BootCheckPlan:
    binary = tmp_path / "qemu-system-x86_64"
    if qemu:
        binary.write_text("#!/bin/sh\n")
        binary.chmod(0o755)
    # A backend that is a plain argv (not `-m worker.emulator`) is taken as installed.
    return BootCheckPlan(mode=mode, emulator_qemu=binary, backend=(sys.executable, "backend.py"))


def test_choose_mode(tmp_path):
    assert choose_mode(_plan(tmp_path, "plain", qemu=True)) == ("plain", None)
    assert choose_mode(_plan(tmp_path, "auto", qemu=True)) == ("emulator", None)
    assert choose_mode(_plan(tmp_path, "emulator", qemu=True)) == ("emulator", None)


def test_choose_mode_without_the_emulator_falls_back_under_auto_only(tmp_path):
    mode, why = choose_mode(_plan(tmp_path / "none", "auto", qemu=False))
    assert mode == "plain" and why is not None and "no emulator at" in why and "make setup" in why
    with pytest.raises(BootCheckUnavailable, match="boot check mode emulator: no emulator at") as info:
        choose_mode(_plan(tmp_path / "none", "emulator", qemu=False))
    assert info.value.code == "boot_check_unavailable"


def test_plan_from_settings_follows_the_environment(tmp_path):
    s = Settings.from_env({"NITROCONV_STATE_DIR": str(tmp_path), "NITROCONV_BOOT_CHECK_MODE": " Emulator ",
                           "NITROCONV_BOOT_CHECK_TIMEOUT": "45"})
    plan = BootCheckPlan.from_settings(s)
    assert (plan.mode, plan.timeout, plan.emulator_qemu) == \
        ("emulator", 45.0, tmp_path / "emulator" / "qemu-system-x86_64")
    assert BootCheckPlan.from_settings(s, timeout=7).timeout == 7.0
    assert Settings.from_env({}).boot_check_mode == "auto"
    assert Settings.from_env({"NITROCONV_EMULATOR_QEMU": "/opt/q"}).emulator_qemu == Path("/opt/q")


@pytest.mark.parametrize("raw", ["kvm", "emulated", "plain,emulator"])
def test_settings_refuse_an_unknown_boot_check_mode(raw):
    from common.errors import InvalidOptions

    with pytest.raises(InvalidOptions, match="NITROCONV_BOOT_CHECK_MODE"):
        Settings.from_env({"NITROCONV_BOOT_CHECK_MODE": raw})


def test_what_the_init_said_about_the_nsm_explains_missing_pcrs():
    parser = _boot(f"{INIT_PREFIX}no nsm (/dev/nsm: No such file or directory), PCRs not read, entropy not seeded")
    assert parser.nsm_problems == ["no nsm (/dev/nsm: No such file or directory), PCRs not read, entropy not seeded"]
    verdict = judge(console_ok=True, console_reason="ok", expected=EXPECTED, reported=parser.pcrs, heartbeat=True,
                    nsm_problems=parser.nsm_problems)
    assert verdict.error_code == "boot_check_pcr_mismatch"
    assert verdict.reason.endswith("; the init said: no nsm (/dev/nsm: No such file or directory), PCRs not read, "
                                   "entropy not seeded")
    quiet = judge(console_ok=True, console_reason="ok", expected=EXPECTED, reported={0: P0, 1: P1, 2: P2},
                  heartbeat=True, nsm_problems=["nsm error: GetRandom: busy"])
    assert quiet.ok  # an NSM complaint that cost no PCR is not a failure
