"""`nitroconv` client argument handling: the request built from options, exit statuses, --expect-pcr."""
from __future__ import annotations

import argparse

import pytest

from common.errors import InvalidEif, ServiceUnreachable, WaitTimedOut
from worker.cli import build_parser
from worker.cli import client as cli_client
from worker.cli.client import UsageError, exit_status
from worker.cli.local import _expected_pcr
from worker.cli.service import conversion_request


def _args(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["convert", "--app-id", "A", "--input", "r/in:1", "--output", "r/out:1", *argv])


def test_cli_client_convert_options_become_the_api_request(monkeypatch):
    monkeypatch.setenv("PW_IN", "s3cret")
    body = conversion_request(_args("--env", "A=1", "B=2", "--entrypoint", "/bin/app", "--entrypoint=-v",
                                    "--mutable-env", "C=3", "--debug", "--java-mode", "OPENJ9", "--cpu-count", "4",
                                    "--no-overlay-persistence", "--input-user", "u", "--input-password-env", "PW_IN"))
    request, options = body["request"], body["nitro_enclaves_options"]
    assert request["input_image"] == {"name": "r/in:1", "auth_config": {"username": "u", "password": "s3cret"}}
    assert request["output_image"] == {"name": "r/out:1", "auth_config": None}
    assert request["converter_options"] == {"env_vars": ["A=1", "B=2"], "entrypoint": ["/bin/app", "-v"],
                                            "mutable_env_vars": ["C=3"], "java_mode": "OPENJ9", "debug": True}
    assert options == {"cpu_count": 4, "enable_overlay_filesystem_persistence": False}


def test_cli_client_network_option_is_passed_as_given():
    body = conversion_request(_args("--network", '{"ingress": [8080], "egress": {"mode": "none"}}'))
    assert body["request"]["converter_options"] == {"network": {"ingress": [8080], "egress": {"mode": "none"}}}
    with pytest.raises(SystemExit):
        _args("--network", "[8080]")


def test_cli_client_unset_password_variable_is_a_usage_error(monkeypatch):
    monkeypatch.delenv("PW_NONE", raising=False)
    with pytest.raises(UsageError):
        conversion_request(_args("--output-user", "u", "--output-password-env", "PW_NONE"))


def test_cli_client_exit_statuses():
    assert exit_status(ServiceUnreachable("x")) == 3
    assert exit_status(WaitTimedOut("x")) == 4
    assert exit_status(UsageError("x")) == 2
    assert exit_status(InvalidEif("x")) == 1


def test_cli_client_expect_pcr_parsing():
    assert _expected_pcr("0=" + "AB" * 48) == (0, "ab" * 48)
    for bad in ("0", "5=" + "a" * 96, "0=" + "a" * 95, "0=" + "g" * 96):
        with pytest.raises(argparse.ArgumentTypeError):
            _expected_pcr(bad)


class _Scripted(cli_client.Client):
    """A client whose polls answer from a script: a state, or None for a service that does not answer."""

    def __init__(self, script: list[str | None]) -> None:
        super().__init__("http://nowhere.invalid")
        object.__setattr__(self, "script", script)

    def build(self, build_id: str) -> cli_client.JsonObject:
        state = self.script.pop(0)  # type: ignore[attr-defined]
        if state is None:
            raise ServiceUnreachable("cannot reach")
        return {"build_id": build_id, "conversion": {"state": state, "progress": 0.5}}


def test_cli_client_wait_rides_through_an_outage_only_after_an_answer(monkeypatch):
    assert _Scripted(["QUEUED", None, None, "PULLING", None, "SUCCEEDED"]).wait(
        "b", poll=0.001)["conversion"]["state"] == "SUCCEEDED"
    with pytest.raises(ServiceUnreachable):  # never answered: a wrong URL fails at once
        _Scripted([None, "SUCCEEDED"]).wait("b", poll=0.001)
    monkeypatch.setattr(cli_client, "UNREACHABLE_GRACE_SECONDS", 0.05)
    with pytest.raises(ServiceUnreachable):  # gone for longer than the grace
        _Scripted(["QUEUED", *[None] * 1000]).wait("b", poll=0.01)
