"""The abuse-limit settings: NITROCONV_ENV, body size, quota and rate limit parse strictly."""
from __future__ import annotations

import pytest

from common.errors import InvalidOptions
from common.settings import Settings


def test_settings_limits_defaults_and_overrides():
    s = Settings.from_env({})
    assert (s.env, s.max_request_bytes, s.max_queued_per_account, s.rate_limit_per_minute) == \
        ("development", 1 << 20, 50, 600)
    s = Settings.from_env({"NITROCONV_ENV": "Production", "NITROCONV_MAX_REQUEST_BYTES": "4096",
                           "NITROCONV_MAX_QUEUED_PER_ACCOUNT": "3", "NITROCONV_RATE_LIMIT_PER_MINUTE": "0"})
    assert (s.env, s.max_request_bytes, s.max_queued_per_account, s.rate_limit_per_minute) == \
        ("production", 4096, 3, 0)


@pytest.mark.parametrize("env", [{"NITROCONV_ENV": "prod"}, {"NITROCONV_MAX_REQUEST_BYTES": "0"},
                                 {"NITROCONV_MAX_QUEUED_PER_ACCOUNT": "-1"}, {"NITROCONV_RATE_LIMIT_PER_MINUTE": "x"}])
def test_settings_limits_refuse_typos(env):
    with pytest.raises(InvalidOptions):
        Settings.from_env(env)
