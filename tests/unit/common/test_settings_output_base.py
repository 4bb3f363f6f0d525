"""NITROCONV_OUTPUT_BASE_IMAGE: the image converted images are layered on."""
from __future__ import annotations

import pytest

from common.errors import InvalidReference
from common.settings import Settings


def test_settings_output_base_defaults_to_none() -> None:
    assert Settings.from_env({}).output_base_image == ""


def test_settings_output_base_is_read_and_trimmed() -> None:
    settings = Settings.from_env({"NITROCONV_OUTPUT_BASE_IMAGE": " registry.example:5000/ops/nitro-cli:1.4 "})
    assert settings.output_base_image == "registry.example:5000/ops/nitro-cli:1.4"


@pytest.mark.parametrize("value", ["Not A Reference", "registry.example/UPPER:tag", "host/repo:bad tag"])
def test_settings_output_base_rejects_a_malformed_reference_at_start(value: str) -> None:
    with pytest.raises(InvalidReference):
        Settings.from_env({"NITROCONV_OUTPUT_BASE_IMAGE": value})
