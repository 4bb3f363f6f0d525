"""NITROCONV_BOOT_CHECK and NITROCONV_BOOT_CHECK_TIMEOUT: strict parsing, off by default, inside the time limit."""
from __future__ import annotations

import pytest

from common.errors import InvalidOptions
from common.settings import Settings


def test_settings_boot_check_is_off_by_default() -> None:
    s = Settings.from_env({})
    assert s.boot_check is False and s.boot_check_timeout == 120


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
