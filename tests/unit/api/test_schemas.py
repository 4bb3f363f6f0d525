"""The conversion request schema: the seed's wrapped and flat forms and every field rule."""
from __future__ import annotations

import uuid

import pytest
from marshmallow import ValidationError

from api.presenters import REDACTED
from api.schemas.builds import BuildSchema, ConversionRequestSchema

APP = str(uuid.uuid4())


def flat(**over):
    body = {"app_id": APP, "input_image": {"name": "127.0.0.1:5000/app:1"},
            "output_image": {"name": "127.0.0.1:5000/app-nitro:1"}, "converter_options": {}}
    body.update(over)
    return body


def test_conversion_request_accepts_the_seed_wrapped_form():
    wrapped = {"request": {"app_id": APP, "input_image": {"name": "busybox", "auth_config": {
        "username": "u", "password": "p"}}, "output_image": {"name": "registry.local/busybox-nitro"},
        "converter_options": {"entrypoint": ["/bin/sh"], "env_vars": ["A=1"], "java_mode": "OPENJDK"}},
        "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 2048, "enable_overlay_filesystem_persistence": False}}
    data = ConversionRequestSchema().load(wrapped)
    assert data["cpu_count"] == 2 and data["mem_size"] == 2048
    assert data["enable_overlay_filesystem_persistence"] is False
    assert data["converter_options"]["entrypoint"] == ["/bin/sh"]
    assert data["input_image"]["auth_config"] == {"username": "u", "password": "p"}


def test_conversion_request_accepts_the_flat_form_with_defaults():
    data = ConversionRequestSchema().load(flat())
    assert data["cpu_count"] is None and data["converter_options"]["debug"] is False


def _errors(body):
    with pytest.raises(ValidationError) as info:
        ConversionRequestSchema().load(body)
    return info.value.messages


@pytest.mark.parametrize("body,field", [
    (flat(app_id="not-a-uuid"), "app_id"),
    (flat(input_image={"name": "Bad Name!"}), "input_image"),
    (flat(output_image={"name": ""}), "output_image"),
    (flat(input_image={}), "input_image"),
    (flat(cpu_count=0), "cpu_count"),
    (flat(cpu_count="2"), "cpu_count"),
    (flat(mem_size=0), "mem_size"),
    (flat(mem_size=-5), "mem_size"),
    (flat(converter_options={"env_vars": ["NOEQUALS"]}), "converter_options"),
    (flat(converter_options={"env_vars": ["=x"]}), "converter_options"),
    (flat(converter_options={"mutable_env_vars": ["1BAD=x"]}), "converter_options"),
    (flat(converter_options={"entrypoint": "/bin/sh"}), "converter_options"),
    (flat(converter_options={"entrypoint_args": [1, 2]}), "converter_options"),
    (flat(converter_options={"java_mode": "COBOL"}), "converter_options"),
    (flat(converter_options={"surprise": True}), "converter_options"),
    (flat(unexpected=1), "unexpected"),
    (flat(output_image={"name": "127.0.0.1:5000/app:1"}), "output_image"),
])
def test_conversion_request_rejects_invalid_fields(body, field):
    assert field in _errors(body)


def test_conversion_request_names_differ_after_normalisation():
    assert "output_image" in _errors(flat(input_image={"name": "busybox"},
                                          output_image={"name": "docker.io/library/busybox:latest"}))


def test_conversion_request_wrapped_form_must_hold_objects():
    assert "request" in _errors({"request": [], "nitro_enclaves_options": {}})
    assert "nitro_enclaves_options" in _errors({"request": flat(), "nitro_enclaves_options": 3})


def test_build_schema_accepts_only_redacted_passwords():
    echo = {"name": "x", "auth_config": {"username": "u", "password": "clear"}}
    from api.schemas.builds import EchoImageSchema
    assert EchoImageSchema().validate(echo)
    echo["auth_config"]["password"] = REDACTED
    assert EchoImageSchema().validate(echo) == {}
    assert "conversion" in BuildSchema().fields
