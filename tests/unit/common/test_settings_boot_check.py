"""NITROCONV_BOOT_CHECK and NITROCONV_BOOT_CHECK_TIMEOUT: strict parsing, on by default where the emulator is
installed and off elsewhere, inside the time limit."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidOptions
from common.settings import Settings


def _host(tmp_path: Path, *, emulator: str | None) -> dict[str, str]:
    """A state dir whose emulator/qemu-system-x86_64 is `emulator` ("exec", "noexec", "dir") or absent."""
    qemu = tmp_path / "emulator" / "qemu-system-x86_64"
    qemu.parent.mkdir()
    if emulator == "dir":
        qemu.mkdir()
    elif emulator is not None:
        qemu.write_bytes(b"#!/bin/sh\n")
        qemu.chmod(0o755 if emulator == "exec" else 0o644)
    return {"NITROCONV_STATE_DIR": str(tmp_path)}


def test_settings_boot_check_is_on_by_default_where_the_emulator_is_installed(tmp_path: Path) -> None:
    s = Settings.from_env(_host(tmp_path, emulator="exec"))
    assert s.boot_check is True and s.boot_check_timeout == 120
    assert s.emulator_qemu == tmp_path / "emulator" / "qemu-system-x86_64"


@pytest.mark.parametrize("emulator", [None, "noexec", "dir"])
def test_settings_boot_check_is_off_by_default_without_the_emulator(tmp_path: Path, emulator: str | None) -> None:
    assert Settings.from_env(_host(tmp_path, emulator=emulator)).boot_check is False


def test_settings_boot_check_default_follows_nitroconv_emulator_qemu(tmp_path: Path) -> None:
    env = _host(tmp_path, emulator=None)
    elsewhere = tmp_path / "qemu"
    elsewhere.write_bytes(b"#!/bin/sh\n")
    elsewhere.chmod(0o755)
    assert Settings.from_env({**env, "NITROCONV_EMULATOR_QEMU": str(elsewhere)}).boot_check is True


@pytest.mark.parametrize(("raw", "value"), [("0", False), ("1", True)])
def test_settings_boot_check_set_explicitly_wins_over_the_default(tmp_path: Path, raw: str, value: bool) -> None:
    for emulator in ("exec", None):
        state = tmp_path / str(emulator)
        state.mkdir()
        assert Settings.from_env({**_host(state, emulator=emulator), "NITROCONV_BOOT_CHECK": raw}).boot_check is value


@pytest.mark.parametrize(("raw", "value"), [("1", True), ("true", True), ("on", True), ("0", False), ("no", False)])
def test_settings_boot_check_parses_strict_booleans(raw: str, value: bool) -> None:
    assert Settings.from_env({"NITROCONV_BOOT_CHECK": raw}).boot_check is value


@pytest.mark.parametrize("raw", ["ture", "2", "enabled"])
def test_settings_boot_check_refuses_a_typo(raw: str) -> None:
    with pytest.raises(InvalidOptions):
        Settings.from_env({"NITROCONV_BOOT_CHECK": raw})


def test_settings_boot_check_timeout_is_read_and_checked() -> None:
    s = Settings.from_env({"NITROCONV_BOOT_CHECK": "1", "NITROCONV_BOOT_CHECK_TIMEOUT": "45"})
    assert s.boot_check_timeout == 45
    with pytest.raises(InvalidOptions):
        Settings.from_env({"NITROCONV_BOOT_CHECK_TIMEOUT": "0"})


def test_settings_boot_check_timeout_must_fit_the_soft_time_limit() -> None:
    with pytest.raises(InvalidOptions, match="boot_check_timeout"):
        Settings.from_env({"NITROCONV_BOOT_CHECK": "1", "NITROCONV_BOOT_CHECK_TIMEOUT": "1800"})
