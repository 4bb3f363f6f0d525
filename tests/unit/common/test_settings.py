"""Settings parsing: defaults, strict parsers, cross-field rules."""
from __future__ import annotations

import pytest

from common.errors import InvalidOptions
from common.settings import Settings, load_or_create_secret, parse_bool


def test_settings_defaults_match_the_contract():
    s = Settings.from_env({})
    assert s.api_addr == "127.0.0.1:8080" and s.registry_addr == "127.0.0.1:5000"
    assert s.database_url == "postgresql://postgres@127.0.0.1:5432/nitroconv"
    assert s.redis_url == "redis://127.0.0.1:6379/0" and s.workers == 1
    assert s.insecure_registries == {"127.0.0.1:5000"}


def test_settings_insecure_registries_default_follows_the_registry_addr():
    s = Settings.from_env({"NITROCONV_REGISTRY_ADDR": "127.0.0.1:5901"})
    assert s.insecure_registries == {"127.0.0.1:5901"}
    s = Settings.from_env({"NITROCONV_INSECURE_REGISTRIES": "a:1, b:2"})
    assert s.insecure_registries == {"a:1", "b:2"}


@pytest.mark.parametrize("env", [
    {"NITROCONV_WORKERS": "zero"}, {"NITROCONV_WORKERS": "0"}, {"NITROCONV_API_ADDR": "nohost"},
    {"NITROCONV_TIME_LIMIT": "9000"},  # above the default visibility timeout minus margin rules
])
def test_settings_reject_bad_values(env):
    with pytest.raises(InvalidOptions):
        Settings.from_env(env)


def test_parse_bool_is_strict():
    assert parse_bool("Yes") is True and parse_bool("0") is False
    with pytest.raises(InvalidOptions):
        parse_bool("treu")


def test_settings_repr_hides_secrets():
    s = Settings.from_env({"NITROCONV_SECRET_KEY": "s3cret-canary", "NITROCONV_ADMIN_PASSWORD": "pw-canary"})
    assert "s3cret-canary" not in repr(s) and "pw-canary" not in repr(s)


def test_secret_is_created_once_and_shared(tmp_path):
    first = load_or_create_secret(tmp_path / "k")
    assert len(first) >= 32 and load_or_create_secret(tmp_path / "k") == first
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
