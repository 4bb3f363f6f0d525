"""Settings parsing: defaults, strict parsers, cross-field rules."""
from __future__ import annotations

import pytest

from common.errors import InvalidOptions
from common.registry.auth import Credentials
from common.settings import ClientSettings, Settings, load_or_create_secret, parse_bool


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
    s = Settings.from_env({"NITROCONV_SECRET_KEY": "s3cret-canary", "NITROCONV_ADMIN_PASSWORD": "pw-canary",
                           "NITROCONV_INPUT_USER": "u", "NITROCONV_INPUT_PASSWORD": "reg-canary"})
    assert "s3cret-canary" not in repr(s) and "pw-canary" not in repr(s) and "reg-canary" not in repr(s)


def test_settings_cli_registry_credentials():
    s = Settings.from_env({"NITROCONV_INPUT_USER": "alice", "NITROCONV_INPUT_PASSWORD": "pw",
                           "NITROCONV_OUTPUT_PASSWORD": "token-only"})
    assert s.input_credentials == Credentials("alice", "pw")
    assert s.output_credentials == Credentials("", "token-only")
    assert Settings.from_env({}).input_credentials is None and Settings.from_env({}).output_credentials is None


def test_client_settings_url_token_and_session_file(tmp_path):
    assert ClientSettings.from_env({}).url == "http://127.0.0.1:8080"
    assert ClientSettings.from_env({"NITROCONV_API_ADDR": "10.0.0.1:9"}).url == "http://10.0.0.1:9"
    c = ClientSettings.from_env({"NITROCONV_URL": "https://conv.example", "NITROCONV_API_ADDR": "10.0.0.1:9",
                                 "NITROCONV_TOKEN": "tok-canary", "NITROCONV_CLIENT_CONFIG": str(tmp_path / "s.json")})
    assert (c.url, c.token, c.session_file) == ("https://conv.example", "tok-canary", tmp_path / "s.json")
    assert "tok-canary" not in repr(c)
    # The service's settings do not concern the client: a value they would refuse is not read.
    assert ClientSettings.from_env({"NITROCONV_ENV": "nonsense"}).token is None


def test_secret_is_created_once_and_shared(tmp_path):
    first = load_or_create_secret(tmp_path / "k")
    assert len(first) >= 32 and load_or_create_secret(tmp_path / "k") == first
    assert (tmp_path / "k").stat().st_mode & 0o777 == 0o600
