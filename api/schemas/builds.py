"""Schemas of the conversion request (the seed's, wrapped or flat) and of the Build it returns."""
from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from marshmallow import Schema, ValidationError, fields, pre_load, types, validate, validates_schema

from api.schemas.common import MAX_OFFSET, PageMetadataSchema, StatusSchema, group_filter
from common.enclave.network import parse_request
from common.errors import InvalidOptions, InvalidReference
from common.options import JAVA_MODES
from common.registry.reference import parse_reference

_ENV_ENTRY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*=[^\x00]*", re.DOTALL)
REDACTED = "***"
# The request's bounds, named once: the schema and its fast path (`_fast_load`) both read them.
MAX_ITEM_CHARS = 8192
MAX_LIST_ITEMS = 512
MAX_USERNAME_CHARS = 1024
MAX_PASSWORD_CHARS = 16384
MAX_CPU_COUNT = 1024
MAX_MEM_SIZE_MIB = 1 << 40


def image_reference(value: str) -> None:
    try:
        parse_reference(value)
    except InvalidReference as exc:
        raise ValidationError(exc.message) from None


def env_entry(value: str) -> None:
    if not _ENV_ENTRY.fullmatch(value):
        raise ValidationError("must be NAME=VALUE with NAME a valid environment variable name")


def _strings(item_validate: Callable[[str], None] | None = None, **kwargs: object) -> fields.List:
    inner = fields.String(validate=[validate.Length(max=MAX_ITEM_CHARS)] + ([item_validate] if item_validate else []))
    return fields.List(inner, load_default=list, validate=validate.Length(max=MAX_LIST_ITEMS), **kwargs)  # type: ignore[arg-type]


class AuthConfigSchema(Schema):
    username = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=MAX_USERNAME_CHARS))
    password = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=MAX_PASSWORD_CHARS),
                             metadata={"description": 'never returned: responses show "***"'})


class ImageInfoSchema(Schema):
    name = fields.String(required=True, validate=image_reference)
    auth_config = fields.Nested(AuthConfigSchema, load_default=None, allow_none=True)


class NetworkPolicyField(fields.Field):
    """converter_options.network: checked and normalized by common.enclave.network (one message naming the field)."""

    def _deserialize(self, value: object, attr: str | None, data: Mapping[str, Any] | None,
                     **kwargs: object) -> dict[str, object]:
        try:
            return parse_request(value)
        except InvalidOptions as exc:
            raise ValidationError(exc.message) from None

    def _serialize(self, value: object, attr: str | None, obj: object, **kwargs: object) -> object:
        return value


NETWORK_DESCRIPTION = (
    "nitroconv's extension: the app's network policy, measured into the EIF (PCR2) and written to launch.json. "
    "`ingress`: the published TCP ports, each a port or {port, proxy_protocol} (PROXY protocol v2 to the app); "
    "omitted: the image's EXPOSEd TCP ports. `egress.mode`: none, proxy (HTTP CONNECT proxy, HTTP(S)_PROXY set) "
    "or transparent; `egress.allow`/`egress.deny`: rules {host: name or *.name} or {cidr}, with optional `ports` "
    "(443 or \"8000-8100\"); deny wins, no allow match is refused; omitted egress: transparent, allow everything "
    "(CCM's behaviour) but the parent itself; omitted allow: everything; omitted deny: the parent instance's "
    "loopback and link-local addresses, its metadata service included (`[]` denies nothing). `hostname`: one RFC 1123 label; omitted: from the image name. "
    "Stored with defaults filled in; the policy the EIF got, EXPOSE resolved, is the Build's `conversion.network`.")


class ConverterOptionsSchema(Schema):
    add_ccm_ca_certificates = fields.Boolean(load_default=False)
    allow_cmdline_args = fields.Boolean(load_default=False)
    debug = fields.Boolean(load_default=False)
    entrypoint = _strings()
    entrypoint_args = _strings()
    env_vars = _strings(env_entry)
    mutable_env_vars = _strings(env_entry)
    java_mode = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(JAVA_MODES))
    network = NetworkPolicyField(allow_none=True, metadata={
        "type": "object", "description": NETWORK_DESCRIPTION,
        "example": {"ingress": [8080, {"port": 8443, "proxy_protocol": True}],
                    "egress": {"mode": "proxy", "allow": [{"host": "*.example.com", "ports": [443]}],
                               "deny": [{"cidr": "169.254.0.0/16"}]},
                    "hostname": "app"}})


class NitroEnclavesOptionsSchema(Schema):
    cpu_count = fields.Integer(load_default=None, allow_none=True, strict=True,
                               validate=validate.Range(min=1, max=MAX_CPU_COUNT))
    mem_size = fields.Integer(load_default=None, allow_none=True, strict=True,
                              validate=validate.Range(min=1, max=MAX_MEM_SIZE_MIB),
                              metadata={"description": "enclave memory in MiB; at least 4x the EIF size. Omitted: "
                                                       "the app's default, else that minimum rounded up to 256 MiB"})
    enable_overlay_filesystem_persistence = fields.Boolean(load_default=None, allow_none=True)


class ImageConversionRequestSchema(Schema):
    """CCM's ImageConversionRequest (the `request` of the wrapped form)."""

    app_id = fields.UUID(required=True)
    input_image = fields.Nested(ImageInfoSchema, required=True)
    output_image = fields.Nested(ImageInfoSchema, required=True)
    converter_options = fields.Nested(ConverterOptionsSchema, allow_none=True)


class WrappedConversionRequestSchema(Schema):
    """CCM's NitroEnclavesConversionRequest: the wrapped form of ConversionRequest (documentation only: the
    route loads both forms with ConversionRequestSchema)."""

    request = fields.Nested(ImageConversionRequestSchema, required=True)
    nitro_enclaves_options = fields.Nested(NitroEnclavesOptionsSchema, required=True)


class ConversionRequestSchema(NitroEnclavesOptionsSchema):
    """POST /v1/builds/convert-app/nitro-enclaves, flat form; the seed's wrapped form is unwrapped first."""

    app_id = fields.UUID(required=True)
    input_image = fields.Nested(ImageInfoSchema, required=True)
    output_image = fields.Nested(ImageInfoSchema, required=True)
    converter_options = fields.Nested(ConverterOptionsSchema, load_default=None, allow_none=True)

    @pre_load
    def unwrap(self, data: object, **_: object) -> object:
        if not isinstance(data, Mapping) or "request" not in data:
            return data
        request, options = data.get("request"), data.get("nitro_enclaves_options", {})
        errors: dict[str, list[str]] = {}
        if not isinstance(request, Mapping):
            errors["request"] = ["must be an object"]
        if not isinstance(options, Mapping):
            errors["nitro_enclaves_options"] = ["must be an object"]
        unknown = set(data) - {"request", "nitro_enclaves_options"}
        for key in sorted(unknown):
            errors[key] = ["Unknown field."]
        if errors:
            raise ValidationError(errors)
        assert isinstance(request, Mapping) and isinstance(options, Mapping)
        clash = set(request) & set(options)
        if clash:
            raise ValidationError({k: ["given in both request and nitro_enclaves_options"] for k in clash})
        return {**request, **options}

    @validates_schema
    def names_differ(self, data: Mapping[str, object], **_: object) -> None:
        src, dst = data.get("input_image"), data.get("output_image")
        if not isinstance(src, Mapping) or not isinstance(dst, Mapping):
            return
        if str(parse_reference(str(src["name"]))) == str(parse_reference(str(dst["name"]))):
            raise ValidationError("must differ from input_image.name", field_name="output_image")

    def load(self, data: Mapping[str, Any] | Sequence[Mapping[str, Any]], *, many: bool | None = None,
             partial: bool | types.StrSequenceOrSet | None = None,
             unknown: types.UnknownOption | None = None) -> Any:
        """The schema's load; a request of exactly the expected types and values is taken on a fast path.

        marshmallow's load costs more than the rest of a plain submission's validation. The fast path accepts a strict subset
        of what the schema accepts and returns what the schema would (tests/unit/api/test_schemas.py compares
        the two); anything else, every invalid request included, goes through the schema and its errors.
        """
        fast = _fast_load(data) if many is partial is unknown is None else None
        return fast if fast is not None else super().load(data, many=many, partial=partial, unknown=unknown)


_TOP = frozenset({"app_id", "input_image", "output_image", "converter_options", "cpu_count", "mem_size",
                  "enable_overlay_filesystem_persistence"})
_OPTION_BOOLS = ("add_ccm_ca_certificates", "allow_cmdline_args", "debug")
_OPTION_LISTS = {"entrypoint": None, "entrypoint_args": None, "env_vars": _ENV_ENTRY, "mutable_env_vars": _ENV_ENTRY}
_OPTIONS = frozenset({*_OPTION_BOOLS, *_OPTION_LISTS, "java_mode"})


def _fast_load(data: object) -> dict[str, object] | None:
    """ConversionRequestSchema's result for a plainly valid request, else None (the schema decides)."""
    if type(data) is not dict:
        return None
    if "request" in data:
        request, options = data["request"], data.get("nitro_enclaves_options", {})
        if (type(request) is not dict or type(options) is not dict or not data.keys() <= _WRAPPER
                or request.keys() & options.keys()):
            return None
        data = {**request, **options}
    if not data.keys() <= _TOP or type(app_id := data.get("app_id")) is not str:
        return None
    src, dst = _image(data.get("input_image")), _image(data.get("output_image"))
    options = _options(data.get("converter_options"))
    cpu_count, mem_size = data.get("cpu_count"), data.get("mem_size")
    persistence = data.get("enable_overlay_filesystem_persistence")
    if (src is None or dst is None or options is False or not _int_in(cpu_count, MAX_CPU_COUNT)
            or not _int_in(mem_size, MAX_MEM_SIZE_MIB) or (persistence is not None and type(persistence) is not bool)):
        return None
    try:
        loaded_app_id = uuid.UUID(app_id)
        if str(parse_reference(str(src["name"]))) == str(parse_reference(str(dst["name"]))):
            return None
    except (ValueError, InvalidReference):
        return None
    return {"app_id": loaded_app_id, "input_image": src, "output_image": dst, "converter_options": options,
            "cpu_count": cpu_count, "mem_size": mem_size, "enable_overlay_filesystem_persistence": persistence}


_WRAPPER = frozenset({"request", "nitro_enclaves_options"})


def _int_in(value: object, top: int) -> bool:
    return value is None or (type(value) is int and 1 <= value <= top)


def _text(value: object, longest: int) -> bool:
    return value is None or (type(value) is str and len(value) <= longest)


def _image(value: object) -> dict[str, object] | None:
    if type(value) is not dict or not value.keys() <= {"name", "auth_config"} or type(value.get("name")) is not str:
        return None
    auth = value.get("auth_config")
    if auth is not None:
        if type(auth) is not dict or not auth.keys() <= {"username", "password"}:
            return None
        auth = {"username": auth.get("username"), "password": auth.get("password")}
        if not (_text(auth["username"], MAX_USERNAME_CHARS) and _text(auth["password"], MAX_PASSWORD_CHARS)):
            return None
    return {"name": value["name"], "auth_config": auth}


def _options(value: object) -> dict[str, object] | None | bool:
    """The loaded converter_options (None when absent), or False when the schema must decide."""
    if value is None:
        return None
    if type(value) is not dict or not value.keys() <= _OPTIONS:
        return False
    loaded: dict[str, object] = {}
    for key in _OPTION_BOOLS:
        flag = value.get(key, False)
        if type(flag) is not bool:
            return False
        loaded[key] = flag
    for key, pattern in _OPTION_LISTS.items():
        items = value.get(key, [])
        if (type(items) is not list or len(items) > MAX_LIST_ITEMS
                or not all(type(i) is str and len(i) <= MAX_ITEM_CHARS and (pattern is None or pattern.fullmatch(i))
                           for i in items)):
            return False
        loaded[key] = list(items)
    java_mode = value.get("java_mode")
    if java_mode is not None and java_mode not in JAVA_MODES:
        return False
    loaded["java_mode"] = java_mode
    return loaded


class ConversionSubmitQuerySchema(Schema):
    wait = fields.Integer(load_default=None, validate=validate.Range(min=0),
                          metadata={"description": "hold the response up to this many seconds for the end"})


# --- responses ---------------------------------------------------------------------------------------
class PortSchema(Schema):
    port = fields.Integer(required=True)
    protocol = fields.String(required=True, validate=validate.OneOf(("Tcp", "Udp")))


class DockerInfoSchema(Schema):
    docker_image_name = fields.String(required=True)
    docker_version = fields.String(required=True, metadata={
        "description": "the input image config's docker_version; empty when the image does not say"})
    docker_image_sha = fields.String(required=True, allow_none=True)
    docker_image_size = fields.Integer(required=True, allow_none=True, metadata={"description": "MiB"})
    exposed_ports = fields.List(fields.Nested(PortSchema), required=True)


class NitroEnclaveAttributesSchema(Schema):
    hash_algorithm = fields.String(required=True, validate=validate.OneOf(("Sha384",)))
    pcr0 = fields.String(required=True)
    pcr1 = fields.String(required=True)
    pcr2 = fields.String(required=True)
    pcr8 = fields.String(load_default=None)


class ImageAttributesSchema(Schema):
    """CCM's ImageAttributes: one platform's measurements."""

    nitro_enclave = fields.Nested(NitroEnclaveAttributesSchema, load_default=None)


# CCM's `attributes` is a map of ImageAttributes. Ours has one entry once the EIF is measured, under this key:
# `attributes.eif.nitro_enclave.pcr0` (empty map before).
ATTRIBUTES_KEY = "eif"


class AdvancedSettingsSchema(Schema):
    entrypoint = fields.List(fields.String(), required=True)
    allowCmdlineArgs = fields.Boolean(required=True)
    manifestEnv = fields.List(fields.String(), required=True)
    mutableEnv = fields.List(fields.String(), required=True)
    java_runtime = fields.String(required=True, allow_none=True)


class RedactedAuthSchema(Schema):
    username = fields.String(required=True, allow_none=True)
    password = fields.String(required=True, validate=validate.Equal(REDACTED))


class EchoImageSchema(Schema):
    name = fields.String(required=True)
    auth_config = fields.Nested(RedactedAuthSchema, required=True, allow_none=True)


class ConversionEchoSchema(Schema):
    input_image = fields.Nested(EchoImageSchema, required=True)
    output_image = fields.Nested(EchoImageSchema, required=True)
    converter_options = fields.Nested(ConverterOptionsSchema, required=True)


class ConversionErrorSchema(Schema):
    code = fields.String(required=True)
    message = fields.String(required=True)


class BootCheckSchema(Schema):
    """The QEMU boot check of the EIF (when the deployment runs it), kept for failed conversions too."""

    ok = fields.Boolean(required=True, metadata={"description": "the init showed the entrypoint was exec'd"})
    seconds = fields.Float(required=True)
    exec_seconds = fields.Float(load_default=None, allow_none=True,
                                metadata={"description": "from QEMU's start to the entrypoint's exec"})
    console_tail = fields.List(fields.String(), required=True)
    program_output = fields.List(fields.String(), required=True,
                                 metadata={"description": "the program's first lines on the console"})
    exit_status = fields.Integer(required=True, allow_none=True,
                                 metadata={"description": "negative for a signal; null while it still ran"})
    reason = fields.String(required=True)
    mode = fields.String(load_default="plain", validate=validate.OneOf(("emulator", "plain")), metadata={
        "description": "emulator: QEMU's nitro-enclave machine loaded the EIF (PCRs and heartbeat checked); "
                       "plain: its kernel and ramdisks booted with -kernel/-initrd"})
    fallback_reason = fields.String(load_default=None, allow_none=True,
                                    metadata={"description": "why the boot ran plain though the emulator was asked for"})
    pcrs = fields.Dict(keys=fields.String(), values=fields.String(), load_default=None, allow_none=True,
                       metadata={"description": "PCR0/1/2/8 as the emulator's NSM measured them (null when plain)"})
    pcrs_match = fields.Boolean(load_default=None, allow_none=True,
                                metadata={"description": "the emulator's PCRs equal the Build's (null when plain)"})
    heartbeat = fields.Boolean(load_default=None, allow_none=True,
                               metadata={"description": "the enclave's heartbeat reached the parent on vsock "
                                                        "port 9000 (null when plain)"})


class ConversionSchema(Schema):
    state = fields.String(required=True, validate=validate.OneOf(
        ("QUEUED", "PULLING", "BUILDING", "MEASURING", "PUSHING", "SUCCEEDED", "FAILED", "CANCELLED")))
    progress = fields.Float(required=True, validate=validate.Range(min=0.0, max=1.0))
    error = fields.Nested(ConversionErrorSchema, required=True, allow_none=True)
    input_digest = fields.String(required=True, allow_none=True)
    output_digest = fields.String(required=True, allow_none=True)
    eif_size = fields.Integer(required=True, allow_none=True)
    eif_sha256 = fields.String(required=True, allow_none=True)
    started_at = fields.Integer(required=True, allow_none=True)
    finished_at = fields.Integer(required=True, allow_none=True)
    attempts = fields.Integer(required=True)
    warnings = fields.List(fields.String(), required=True)
    cancel_requested = fields.Boolean(required=True)
    boot_check = fields.Nested(BootCheckSchema, required=True, allow_none=True)
    reused_from = fields.String(
        required=True, allow_none=True,
        metadata={"readOnly": True, "description": "the earlier conversion whose EIF and output layer this one reused (its build id; "
                                 "`cache:<key>` when another account made it); null when converted afresh"})
    request = fields.Nested(ConversionEchoSchema, required=True)
    network = fields.Dict(
        load_default=None, allow_none=True,
        metadata={"readOnly": True, "description": "the network policy measured into the EIF and written to "
                  "launch.json, every default filled in (ingress from the image's EXPOSE); null until built"})


class BuildSchema(Schema):
    """The seed's Build, field for field, plus `conversion`."""

    build_id = fields.UUID(required=True)
    docker_info = fields.Nested(DockerInfoSchema, required=True)
    created_at = fields.Integer(required=True)
    updated_at = fields.Integer(required=True)
    app_id = fields.UUID(required=True)
    app_name = fields.String(required=True)
    status = fields.Nested(StatusSchema, required=True)
    deployment_status = fields.Nested(StatusSchema, required=True)
    enclave_info = fields.Dict(required=True, allow_none=True)
    attributes = fields.Dict(keys=fields.String(), values=fields.Nested(ImageAttributesSchema), required=True,
                             metadata={"description": f"CCM's map of ImageAttributes; the EIF's PCRs at "
                                                      f"`{ATTRIBUTES_KEY}.nitro_enclave`"})
    app_description = fields.String(required=True)
    mem_size = fields.Integer(required=True, allow_none=True,
                              metadata={"description": "MiB; null until the conversion sizes an omitted mem_size"})
    threads = fields.Integer(required=True)
    advanced_settings = fields.Nested(AdvancedSettingsSchema, required=True)
    build_name = fields.String(required=True, allow_none=True)
    pending_task_id = fields.UUID(required=True, allow_none=True)
    configs = fields.Dict(keys=fields.String(), values=fields.Dict(allow_none=True), required=True, metadata={
        "description": "CCM's application configs attached to the image, by config id (PATCH sets them)"})
    marketplace_build_id = fields.UUID(required=True, allow_none=True)
    launch_hint = fields.Dict(required=True, allow_none=True)
    enable_overlay_filesystem_persistence = fields.Boolean(required=True)
    group_id = fields.UUID(required=True, allow_none=True)
    conversion = fields.Nested(ConversionSchema, required=True)


class BuildListQuerySchema(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET))
    sort_by = fields.String(load_default="created_at:DESC", validate=validate.Regexp(
        r"^(created_at|updated_at|status|app_name)(:(ASC|DESC))?(,(created_at|updated_at|status|app_name)"
        r"(:(ASC|DESC))?){0,3}$"), metadata={"description": "CCM's `key1:ASC,key2:DESC`"})
    status = fields.String(load_default=None, validate=validate.OneOf(("PENDING", "WHITELISTED", "REJECTED")))
    app_id = fields.UUID(load_default=None)
    docker_image_name = fields.String(load_default=None, metadata={
        "description": "the build's output image name, or its app's output image name"})
    all_search = fields.String(load_default=None, validate=validate.Length(max=255), metadata={
        "description": "in the image names, the app's name and the digests (case-insensitive)"})
    deployed_status = fields.String(load_default=None, validate=validate.OneOf(("DEPLOYED", "UNDEPLOYED")),
                                    metadata={"description": "builds here are never deployed"})
    config_id = fields.String(load_default=None, validate=validate.Length(min=1, max=255),
                              metadata={"description": "builds whose `configs` have this config id"})
    filter = group_filter(load_default=None)


MAX_CONFIGS = 100
MAX_CONFIGS_BYTES = 64 * 1024


class BuildUpdateSchema(Schema):
    """CCM's BuildUpdateRequest: application configs to attach to the image, by config id. Each id given with
    an object attaches it (or replaces what that id had); with null, detaches it; ids not named stay."""

    configs = fields.Dict(keys=fields.String(validate=validate.Length(min=1, max=255)),
                          values=fields.Dict(allow_none=True), load_default=dict,
                          validate=validate.Length(max=MAX_CONFIGS))


class BuildListSchema(Schema):
    metadata = fields.Nested(PageMetadataSchema, required=True)
    items = fields.List(fields.Nested(BuildSchema), required=True)
