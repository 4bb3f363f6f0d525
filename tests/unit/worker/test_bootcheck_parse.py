"""Unit tests of the boot check's pure parts: console parsing, markers mirrored from the init's C source."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from common.errors import BootCheckFailed
from worker.pipeline import bootcheck
from worker.pipeline.bootcheck import (
    C_MARKERS,
    INIT_PREFIX,
    MARK_EXEC_FAILED,
    MARK_EXEC_OK,
    MARK_EXIT,
    MARK_FATAL,
    MARK_LAUNCH,
    MARK_START,
    BootResult,
    ConsoleParser,
    LineSplitter,
    clean_line,
    memory_for,
    parse_console,
    qemu_command,
)

INIT_C = Path(__file__).resolve().parents[3] / "worker" / "runtime" / "init.c"

BOOT = [
    "[    3.256964] Run /init as init process",
    MARK_START,
    INIT_PREFIX + "/nsm.ko is an empty placeholder (dev blobs), NSM driver not loaded",
    INIT_PREFIX + "vsock unavailable (Address family not supported by protocol), no heartbeat sent, continuing",
    MARK_LAUNCH + "argc=3 argv0=/bin/app",
]


def test_markers_mirror_init_source():
    defines = dict(re.findall(r'^#define (NCI_[A-Z_]+) "([^"\\]*)"$', INIT_C.read_text(), re.MULTILINE))
    assert defines == dict(C_MARKERS)
    assert all(value.startswith(INIT_PREFIX) for value in C_MARKERS.values())


def test_markers_are_all_used_by_init_source():
    source = INIT_C.read_text()
    for name in C_MARKERS:
        # Defined once, used at least once more: a marker the init never prints is a dead contract.
        assert source.count(name) >= 2, name


def test_parse_console_exec_ok_collects_output_until_exit():
    verdict = parse_console([
        *BOOT,
        MARK_EXEC_OK + "pid=79 argv0=/bin/app",
        "hello",
        "[    3.500000] random: crng init done",
        "world\r",
        MARK_EXIT + "status=3",
        "[    3.596008] reboot: Restarting system",
        "after",
    ])
    assert verdict.ok
    assert verdict.program_output == ("hello", "world")
    assert verdict.exit_status == 3
    assert verdict.reason == "entrypoint exec'd; exited with status 3"
    assert verdict.console_tail[-1] == "after"


def test_parse_console_keeps_output_printed_before_the_marker():
    # The exec wakes the parent and the program at once; either may reach the console first.
    verdict = parse_console([*BOOT, "early line", MARK_EXEC_OK + "pid=80 argv0=/bin/app", MARK_EXIT + "status=0"])
    assert verdict.ok
    assert verdict.program_output == ("early line",)
    assert verdict.exit_status == 0


def test_parse_console_signal_exit_is_negative():
    verdict = parse_console([*BOOT, MARK_EXEC_OK + "pid=80 argv0=/bin/app", MARK_EXIT + "signal=9"])
    assert verdict.ok
    assert verdict.exit_status == -9
    assert verdict.reason == "entrypoint exec'd; killed by signal 9"


def test_parse_console_still_running_has_no_exit_status():
    verdict = parse_console([*BOOT, MARK_EXEC_OK + "pid=80 argv0=/bin/app", "listening on :8080"])
    assert verdict.ok
    assert verdict.exit_status is None
    assert verdict.program_output == ("listening on :8080",)
    assert "still running" in verdict.reason


def test_parse_console_exec_failed_is_not_ok():
    verdict = parse_console([
        *BOOT,
        MARK_EXEC_FAILED + "/no/such: No such file or directory",
        MARK_EXIT + "status=127",
    ])
    assert not verdict.ok
    assert verdict.decided
    assert verdict.reason == "exec failed: /no/such: No such file or directory"
    assert verdict.exit_status == 127
    assert verdict.program_output == ()


def test_parse_console_program_cannot_undo_a_real_exec():
    # A program may print init-looking lines; only the init prints anything after a failed exec,
    # so an exec marker anywhere means the entrypoint ran.
    verdict = parse_console([
        *BOOT,
        MARK_EXEC_OK + "pid=80 argv0=/bin/app",
        MARK_EXEC_FAILED + "fake: fake",
        MARK_FATAL + "fake",
    ])
    assert verdict.ok


def test_parse_console_init_fatal():
    verdict = parse_console([MARK_START, MARK_FATAL + "bind /rootfs: No such file or directory"])
    assert not verdict.ok
    assert verdict.decided
    assert verdict.reason == "init failed: bind /rootfs: No such file or directory"


def test_parse_console_kernel_panic():
    verdict = parse_console([
        "[    1.000000] Run /init as init process",
        "[    1.100000] Kernel panic - not syncing: No working init found.  Try passing init= option to kernel.",
    ])
    assert not verdict.ok
    assert verdict.decided
    assert verdict.reason.startswith("kernel panic: No working init found.")
    assert not verdict.init_started


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        (["[    0.000000] Linux version 6.1.0"], "the init never started"),
        ([MARK_START], "init started but did not reach the entrypoint"),
        (BOOT, "init launched the entrypoint but never reported the exec"),
    ],
)
def test_parse_console_undecided_says_how_far_it_got(lines, reason):
    verdict = parse_console(lines)
    assert not verdict.ok
    assert not verdict.decided
    assert verdict.reason == reason


def test_parse_console_ignores_exit_lines_before_launch():
    verdict = parse_console([MARK_START, MARK_EXIT + "status=5", *BOOT[2:]])
    assert verdict.exit_status is None


def test_console_parser_bounds_tail_and_output():
    parser = ConsoleParser(tail_lines=3, output_lines=2)
    for line in [*BOOT, MARK_EXEC_OK + "pid=1 argv0=x", "a", "b", "c", "d"]:
        parser.feed(line)
    verdict = parser.verdict()
    assert verdict.program_output == ("a", "b")
    assert verdict.console_tail == ("b", "c", "d")


def test_clean_line_drops_controls_and_truncates():
    assert clean_line("a\x00b\x1b[0mc\td\r") == "ab[0mc\td"
    long = clean_line("x" * 10_000)
    assert len(long) == bootcheck.MAX_LINE_CHARS
    assert long.endswith("…")


def test_line_splitter_bounds_a_line_without_newline():
    splitter = LineSplitter(max_line_bytes=8)
    assert splitter.push(b"abc\ndef") == ["abc"]
    assert splitter.push(b"ghijklmnop") == ["defghijk"]
    assert splitter.push(b"\n\xff\n") == ["lmnop", "\ufffd"]
    assert splitter.push(b"tail") == []
    assert splitter.flush() == ["tail"]
    assert splitter.flush() == []


def test_memory_for_is_four_times_the_eif_in_64_mib_steps():
    assert memory_for(0) == 512
    assert memory_for(100 * 1024 * 1024) == 512
    assert memory_for(200 * 1024 * 1024) == 832
    assert memory_for(200 * 1024 * 1024 + 1) == 832
    assert memory_for(208 * 1024 * 1024) == 832
    assert memory_for(208 * 1024 * 1024 + 1) == 896


def test_qemu_command_is_software_only_with_serial_console_and_no_devices():
    argv = qemu_command(kernel=Path("/k"), initrd=Path("/i"), cmdline="console=ttyS0 a=b c", memory_mib=640)
    assert argv[0] == "qemu-system-x86_64"
    assert "-enable-kvm" not in argv
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert argv[argv.index("-m") + 1] == "640"
    # The EIF's cmdline, then timestamps on kernel lines so they never pass for the program's output.
    assert argv[argv.index("-append") + 1] == "console=ttyS0 a=b c printk.time=1"
    assert argv[argv.index("-serial") + 1] == "stdio"
    assert {"-nodefaults", "-no-reboot", "-no-user-config"} <= set(argv)
    assert argv[argv.index("-kernel") + 1] == "/k"
    assert argv[argv.index("-initrd") + 1] == "/i"
    assert argv[argv.index("-sandbox") + 1].startswith("on,")


def test_boot_result_to_json_and_raise_if_failed():
    failed = BootResult(ok=False, seconds=1.23456, console_tail=("x",), program_output=(), exit_status=127,
                        reason="exec failed: /x: No such file or directory")
    as_json = failed.to_json()
    assert as_json == {
        "ok": False,
        "seconds": 1.235,
        "exec_seconds": None,
        "console_tail": ["x"],
        "program_output": [],
        "exit_status": 127,
        "reason": "exec failed: /x: No such file or directory",
        "mode": "plain",
        "fallback_reason": None,
        "pcrs": None,
        "pcrs_match": None,
        "heartbeat": None,
    }
    with pytest.raises(BootCheckFailed) as info:
        failed.raise_if_failed()
    assert info.value.code == "boot_check_failed"
    assert info.value.details["boot_check"] == as_json
    ok = BootResult(ok=True, seconds=2.0, console_tail=(), program_output=("hi",), exit_status=0, reason="r",
                    exec_seconds=1.5)
    ok.raise_if_failed()
    assert ok.to_json()["exec_seconds"] == 1.5
