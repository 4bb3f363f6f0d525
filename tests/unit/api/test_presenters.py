"""build_view is sent without a marshmallow dump: it must already be BuildSchema's dump, to the byte."""
from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

import pytest

from api.presenters import _options, build_view
from api.schemas.builds import BuildSchema, ConverterOptionsSchema
from common.store.models import App, Build

T0 = datetime(2026, 3, 1, 12, 0, 0, 500_000, tzinfo=UTC)
ALL_OPTIONS = {"add_ccm_ca_certificates": False, "allow_cmdline_args": True, "debug": False,
               "entrypoint": ["/bin/sh", "-c"], "entrypoint_args": ["echo hi"], "env_vars": ["A=1", "B=é"],
               "mutable_env_vars": ["PORT=8080"], "java_mode": "OPENJDK"}

NETWORK_REQUEST = {"ingress": None, "hostname": None,
                   "egress": {"mode": "none", "allow": [], "deny": []}}


def _app() -> App:
    return App(id=uuid.uuid4(), account_id=uuid.uuid4(), name="app ü", description="what it does")


def _build(**over: object) -> Build:
    fields: dict[str, object] = {
        "id": uuid.uuid4(), "account_id": uuid.uuid4(), "app_id": uuid.uuid4(), "created_by": uuid.uuid4(),
        "request_fingerprint": "f" * 64, "created_at": T0, "updated_at": T0, "approval_updated_at": T0,
        "input_image_name": "127.0.0.1:5000/in:1", "output_image_name": "127.0.0.1:5000/out:1",
        "input_username": "u", "output_username": None, "input_credentials": b"sealed", "output_credentials": None,
        "converter_options": dict(ALL_OPTIONS), "cpu_count": 2, "mem_size": 1024,
        "enable_overlay_filesystem_persistence": True, "approval_status": "PENDING", "conversion_state": "QUEUED",
        "progress": 0.0, "attempts": 0, "cancel_requested": False, "exposed_ports": [], "warnings": [],
    }
    fields.update(over)
    return Build(**fields)


CASES = {
    "queued, as a submission answers": _build(),
    "no credentials, no mem_size, no options": _build(input_username=None, input_credentials=None, mem_size=None,
                                                      converter_options={}),
    # Keys the schema does not declare, or values of loose types, as an older row or an app default may hold.
    "loose options": _build(converter_options={"debug": 1, "entrypoint": None, "env_vars": ["A=1"],
                                               "surprise": True, "java_mode": None}),
    "credentials with an empty username": _build(input_username=None, output_username="",
                                                 output_credentials=b"sealed"),
    "succeeded, signed, reused, awaiting approval": _build(
        conversion_state="SUCCEEDED", progress=1, attempts=1, pending_task_id=uuid.uuid4(),
        started_at=T0, finished_at=T0 + timedelta(seconds=7), input_digest="sha256:" + "a" * 64,
        output_digest="sha256:" + "b" * 64, output_size=(5 << 20) + 1, eif_size=123_456_789,
        eif_sha256="c" * 64, pcr0="0" * 96, pcr1="1" * 96, pcr2="2" * 96, pcr8="8" * 96,
        exposed_ports=[[8080, "tcp"], ["53", "udp"]], warnings=["replaced /.nitroconv"], docker_version="24.0",
        reused_from="cache:abc", boot_check={"ok": True, "seconds": 3, "exec_seconds": 1.25, "console_tail": ["x"],
                                             "program_output": ["hi"], "exit_status": 0, "reason": "ok",
                                             "unpromised": "field"}),
    "failed, boot check partly recorded": _build(
        conversion_state="FAILED", approval_status="REJECTED", progress=0.5, attempts=3,
        error_code="boot_check_failed", error_message=None, pcr0="0" * 96, pcr1="1" * 96, pcr2="2" * 96,
        boot_check={"ok": False, "seconds": 120.0, "console_tail": [], "reason": "timeout"}),
    "succeeded with a network policy": _build(
        conversion_state="SUCCEEDED", progress=1, converter_options={**ALL_OPTIONS, "network": NETWORK_REQUEST},
        network={**NETWORK_REQUEST, "ingress": [{"port": 8080, "proxy_protocol": False}], "hostname": "in"}),
    "cancel requested while running": _build(conversion_state="PULLING", progress=0.25, cancel_requested=True,
                                            started_at=T0),
}


@pytest.mark.parametrize("build", CASES.values(), ids=CASES.keys())
def test_build_view_is_the_schemas_dump(build):
    app = _app()
    view = build_view(build, app.name, app.description)
    dumped = BuildSchema().dump(view)
    # As bytes, with the JSON provider's sorted keys: 3 == 3.0 in Python, not in JSON.
    assert json.dumps(view, sort_keys=True) == json.dumps(dumped, sort_keys=True)


@pytest.mark.parametrize("options", [ALL_OPTIONS, {}, {"debug": True, "java_mode": None},
                                     {"debug": 1}, {"entrypoint": None}, {"entrypoint": ["a", 2]},
                                     {"java_mode": 5}, {"surprise": True, "debug": False},
                                     {"network": NETWORK_REQUEST}, {"network": None}])
def test_converter_options_are_their_schemas_dump(options):
    assert json.dumps(_options(dict(options)), sort_keys=True) == \
        json.dumps(ConverterOptionsSchema().dump(options), sort_keys=True)
