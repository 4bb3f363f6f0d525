"""NITROCONV_ATTESTATION_ROOT and its pin (common/settings.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidOptions
from common.settings import Settings

PIN = "641A0321A3E244EFE456463195D606317ED7CDCC3C1756E09893F3C68F79BB5B"


def test_the_root_and_its_pin_load_together() -> None:
    s = Settings.from_env({"NITROCONV_ATTESTATION_ROOT": "/pki/root.pem", "NITROCONV_ATTESTATION_ROOT_SHA256": PIN})
    assert (s.attestation_root, s.attestation_root_sha256) == (Path("/pki/root.pem"), PIN.lower())
    default = Settings.from_env({})
    assert default.attestation_root is None and default.attestation_root_sha256 == ""


@pytest.mark.parametrize("environ", [
    {"NITROCONV_ATTESTATION_ROOT": "/pki/root.pem"},
    {"NITROCONV_ATTESTATION_ROOT_SHA256": PIN},
    {"NITROCONV_ATTESTATION_ROOT": "/pki/root.pem", "NITROCONV_ATTESTATION_ROOT_SHA256": "abc"},
    {"NITROCONV_ATTESTATION_ROOT": "/pki/root.pem", "NITROCONV_ATTESTATION_ROOT_SHA256": PIN[:-1] + "g"},
])
def test_a_root_without_a_valid_pin_is_refused_at_start_up(environ: dict[str, str]) -> None:
    with pytest.raises(InvalidOptions, match="ATTESTATION_ROOT"):
        Settings.from_env(environ)
