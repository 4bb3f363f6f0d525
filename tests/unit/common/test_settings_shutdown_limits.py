"""The cold-shutdown grace and the per-image inflation limit come from the environment and reach Celery."""
from __future__ import annotations

import pytest

from common.errors import InvalidOptions
from common.settings import Settings
from worker.celery_app import celery_config


def test_settings_shutdown_limits_defaults_and_overrides():
    s = Settings.from_env({})
    assert (s.soft_shutdown_timeout, s.max_image_bytes) == (30, 8 << 30)
    s = Settings.from_env({"NITROCONV_SOFT_SHUTDOWN_TIMEOUT": "2", "NITROCONV_MAX_IMAGE_BYTES": "1048576"})
    assert (s.soft_shutdown_timeout, s.max_image_bytes) == (2, 1 << 20)
    assert celery_config(s)["worker_soft_shutdown_timeout"] == 2.0


@pytest.mark.parametrize("env", [{"NITROCONV_SOFT_SHUTDOWN_TIMEOUT": "0"}, {"NITROCONV_MAX_IMAGE_BYTES": "-5"},
                                 {"NITROCONV_MAX_IMAGE_BYTES": "8G"}])
def test_settings_shutdown_limits_refuse_nonsense(env):
    with pytest.raises(InvalidOptions):
        Settings.from_env(env)
