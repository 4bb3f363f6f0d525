"""The emulated nitro-cli's console handling (worker/emulator/enclave.py): which lines a user sees without
--console, and the exit status read from the init's line."""
from __future__ import annotations

import argparse
import io

from worker.emulator.enclave import Attached


def _attached(console: bool) -> tuple[Attached, io.StringIO]:
    out = io.StringIO()
    args = argparse.Namespace(console=console, attach_console=False)
    return Attached(args, out, io.StringIO()), out


def test_without_console_only_the_program_is_shown_and_the_status_is_read() -> None:
    a, out = _attached(console=False)
    for line in ["Probing EDD (edd=off to disable)... ok", "[    0.000000] Linux version 6.12", "nitroconv-init: start", "hello", "nitroconv-shim: refused env X: "
                 "not in mutable_env_vars", "nitroconv-init: exit status=7"]:
        a.console_line(line)
    assert out.getvalue().splitlines() == ["hello", "nitroconv-shim: refused env X: not in mutable_env_vars"]
    assert a.exit_status == 7


def test_console_shows_everything_and_a_signal_is_128_plus() -> None:
    a, out = _attached(console=True)
    a.console_line("[    1.5] x")
    a.console_line("nitroconv-init: exit signal=9")
    assert out.getvalue().splitlines() == ["[    1.5] x", "nitroconv-init: exit signal=9"]
    assert a.exit_status == 137


def test_a_program_printing_the_marker_mid_line_does_not_set_the_status() -> None:
    a, _ = _attached(console=False)
    a.console_line("nitroconv-init: start")
    a.console_line("echo nitroconv-init: exit status=0")
    assert a.exit_status is None
