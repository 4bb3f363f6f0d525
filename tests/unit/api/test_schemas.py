"""The conversion request schema: the seed's wrapped and flat forms and every field rule."""
from __future__ import annotations

import copy
import random
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


def test_conversion_request_network_refusal_names_the_field():
    body = flat(converter_options={"network": {"egress": {"allow": [{"cidr": "10.0.0.0/8"}, {"cidr": "10.0.0.1/8"}]}}})
    assert _errors(body) == {"converter_options": {"network": [
        "network.egress.allow[1].cidr: '10.0.0.1/8' is not a CIDR block (address/prefix, no host bits set)"]}}


def test_conversion_request_network_is_loaded_normalized():
    loaded = ConversionRequestSchema().load(flat(converter_options={"network": {"ingress": [8080]}}))
    assert loaded["converter_options"]["network"] == {
        "ingress": [{"port": 8080, "proxy_protocol": False}], "hostname": None,
        "egress": {"mode": "transparent", "deny": [{"cidr": cidr, "ports": ["1-65535"]} for cidr in (
            "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "::/128", "::1/128", "fe80::/10", "fd00:ec2::254/128")],
                   "allow": [{"cidr": "0.0.0.0/0", "ports": ["1-65535"]}, {"cidr": "::/0", "ports": ["1-65535"]}]}}
    # A request that says nothing keeps saying nothing; the Build's conversion.network shows what was built.
    assert "network" not in ConversionRequestSchema().load(flat(converter_options={}))["converter_options"]


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


# --- the fast path of ConversionRequestSchema.load: a strict subset, with the schema's own result -------------
def _both(body):
    """(the fast path's outcome, marshmallow's own): a loaded dict or the error messages."""
    from marshmallow import Schema

    schema = ConversionRequestSchema()
    outcomes = []
    for load in (schema.load, lambda data: Schema.load(schema, data)):
        try:
            outcomes.append(("ok", load(copy.deepcopy(body))))
        except ValidationError as exc:
            outcomes.append(("invalid", exc.messages))
    return outcomes


def _wrapped(**request_over):
    request = {"app_id": APP, "input_image": {"name": "127.0.0.1:5000/app:1", "auth_config": {
        "username": "u", "password": "p"}}, "output_image": {"name": "127.0.0.1:5000/app-nitro:1"},
        "converter_options": {"entrypoint": ["/bin/sh"], "env_vars": ["A=1"], "java_mode": "OPENJDK"}}
    request.update(request_over)
    return {"request": request, "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 1024}}


PLAIN = [_wrapped(), flat(), flat(converter_options=None), flat(cpu_count=1024, mem_size=1 << 40),
         flat(input_image={"name": "busybox", "auth_config": None}),
         flat(input_image={"name": "busybox", "auth_config": {}}),
         flat(input_image={"name": "busybox", "auth_config": {"username": None, "password": "p" * 16384}}),
         flat(converter_options={"debug": True, "mutable_env_vars": ["PORT=8080"], "entrypoint_args": []}),
         flat(app_id=APP.upper()), flat(enable_overlay_filesystem_persistence=False),
         {"request": flat()}]


@pytest.mark.parametrize("body", PLAIN)
def test_conversion_request_fast_path_takes_plain_requests_and_loads_them_alike(body):
    from api.schemas.builds import _fast_load

    assert _fast_load(copy.deepcopy(body)) is not None
    fast, slow = _both(body)
    assert fast == slow and fast[0] == "ok"
    assert type(fast[1]["app_id"]) is uuid.UUID


# Values the fast path must leave to the schema: loose types marshmallow coerces, or rejects with its messages.
ODD = [True, False, 0, 1, 2, 1025, 2.0, -1, "2", "true", "", None, [], {}, ["A=1"], ["NOEQ"], ["x" * 8193],
       ["A=1"] * 513, "OPENJDK", "COBOL", "Bad Name!", "127.0.0.1:5000/app-nitro:1", "{" + APP + "}",
       "urn:uuid:" + APP, "x" * 1025, {"username": "u"}, {"password": 3}, {"name": "busybox"}, 1 << 41,
       # each bound exactly (accepted) next to its overrun above
       1024, ["x" * 8192], ["A=1"] * 512, "x" * 1024, 1 << 40, {"username": "u" * 1024, "password": "p" * 16384},
       {"username": "u" * 1025}, {"password": "p" * 16385}]


def _paths(value, path=()):
    yield path
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*path, key))


def _replaced(body, path, value):
    body = copy.deepcopy(body)
    if not path:
        return value
    target = body
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return body


@pytest.mark.parametrize("base", [_wrapped(), flat(converter_options={"debug": False, "entrypoint": ["a"]})])
def test_conversion_request_fast_path_agrees_with_the_schema_on_every_odd_value(base):
    paths = list(_paths(base))
    extra = [(*path, "surprise") for path in paths if isinstance(_at(base, path), dict)]
    for path in paths + extra:
        for value in ODD:
            body = _replaced(base, path, value)
            fast, slow = _both(body)
            assert fast == slow, (path, value)


def _at(body, path):
    for key in path:
        body = body[key]
    return body


def test_conversion_request_fast_path_agrees_on_random_mixes():
    rng = random.Random(8)
    base = _wrapped()
    paths = list(_paths(base))[1:]
    for _ in range(1500):
        body = base
        for _ in range(rng.randint(1, 3)):
            path = rng.choice(paths)
            try:
                body = _replaced(body, path, rng.choice(ODD))
            except (KeyError, TypeError):  # an earlier change removed the parent
                continue
        fast, slow = _both(body)
        assert fast == slow, body
