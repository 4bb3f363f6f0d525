"""NITROCONV_OUTPUT_COMPRESSION: gzip by default, zstd on request, anything else refused at start-up."""
from __future__ import annotations

import pytest

from common.errors import InvalidOptions
from common.settings import Settings


def test_settings_output_compression_defaults_to_gzip() -> None:
    assert Settings.from_env({}).output_compression == "gzip"


@pytest.mark.parametrize(("raw", "expected"), [("zstd", "zstd"), (" GZIP ", "gzip"), ("Zstd", "zstd")])
def test_settings_output_compression_values(raw: str, expected: str) -> None:
    assert Settings.from_env({"NITROCONV_OUTPUT_COMPRESSION": raw}).output_compression == expected


def test_settings_output_compression_refuses_unknown() -> None:
    with pytest.raises(InvalidOptions):
        Settings.from_env({"NITROCONV_OUTPUT_COMPRESSION": "xz"})
