"""Unit tests for the signing and CA bundle settings (common/settings.py)."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import InvalidOptions
from common.settings import Settings


def test_settings_signing_paths_load_together() -> None:
    settings = Settings.from_env({"NITROCONV_SIGNING_KEY": "/keys/k.pem", "NITROCONV_SIGNING_CERT": "/keys/c.pem",
                                  "NITROCONV_CA_BUNDLE": "/etc/corp.pem"})
    assert (settings.signing_key, settings.signing_cert) == (Path("/keys/k.pem"), Path("/keys/c.pem"))
    assert settings.ca_bundle == Path("/etc/corp.pem")
    assert Settings.from_env({}).signing_key is None and Settings.from_env({}).ca_bundle is None


@pytest.mark.parametrize("name", ["NITROCONV_SIGNING_KEY", "NITROCONV_SIGNING_CERT"])
def test_settings_signing_refuses_half_a_pair(name: str) -> None:
    with pytest.raises(InvalidOptions, match="set together"):
        Settings.from_env({name: "/keys/x.pem"})
