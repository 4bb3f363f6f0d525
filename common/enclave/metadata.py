"""The EIF metadata section (EIF.md §4.1): written byte for byte as nitro-cli's serde_json writes it, and
checked on read against the shape nitro-cli deserialises."""
from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

from common.enclave.format import METADATA_MAX_SIZE, U64_MAX
from common.errors import InvalidBlobs, InvalidEif, InvalidOptions

_JSON_MAX_DEPTH = 128  # serde_json's recursion limit: deeper metadata could not be read back by nitro-cli


def _json_float(value: float) -> str:
    """A float as serde_json (ryu) prints it: "1.0", "0.0001", "1e16", "1.5e-7", non-finite as null."""
    if not math.isfinite(value):
        return "null"  # serde_json turns non-finite floats into null
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")  # repr gives the shortest round-trip digits
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)  # value = 0.<digits> * 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    length = len(digits)
    if length <= point <= 16:
        text = digits + "0" * (point - length) + ".0"
    elif 0 < point <= 16:
        text = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        text = "0." + "0" * -point + digits
    elif length == 1:
        text = f"{digits}e{point - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + text


def _json_value(value: object, out: list[str], depth: int) -> None:
    """serde_json's compact output for a `serde_json::Value` (maps are BTreeMaps: keys sorted)."""
    if depth > _JSON_MAX_DEPTH:
        raise InvalidOptions(f"metadata nested deeper than {_JSON_MAX_DEPTH} levels",
                             details={"reason": "invalid_metadata"})
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -(1 << 63) <= value <= U64_MAX:
            # serde_json would read such a number back as a float, so it could not round-trip.
            raise InvalidOptions(f"integer {value} in metadata is outside the 64-bit range",
                                 details={"reason": "invalid_metadata"})
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_json_float(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))  # same escapes as serde_json
    elif isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise InvalidOptions("metadata object keys must be strings", details={"reason": "invalid_metadata"})
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _json_value(value[key], out, depth + 1)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _json_value(item, out, depth + 1)
        out.append("]")
    else:
        raise InvalidOptions(f"metadata value of type {type(value).__name__} is not JSON",
                             details={"reason": "invalid_metadata"})


def build_metadata(
    *,
    image_name: str,
    image_version: str,
    build_time: str,
    build_tool: str = "nitroconv",
    build_tool_version: str,
    operating_system: str,
    kernel_version: str,
    docker_info: object,
    custom: object | None = None,
) -> bytes:
    """The metadata section bytes, as nitro-cli's `serde_json::to_vec(&EifIdentityInfo)` writes them.

    Compact JSON; the top level and BuildMetadata in struct-field order; DockerInfo and CustomMetadata
    are `serde_json::Value`s whose object keys nitro-cli emits sorted (its serde_json has no
    preserve_order). `custom` must be an object or None: describe-eif flattens it into its Metadata.
    Values that are not JSON, or that nitro-cli could not read back, raise `InvalidOptions`.
    """
    if custom is not None and not isinstance(custom, Mapping):
        raise InvalidOptions("custom metadata must be a JSON object", details={"reason": "invalid_metadata"})
    out: list[str] = ["{"]
    top: list[tuple[str, object]] = [("ImageName", image_name), ("ImageVersion", image_version)]
    build: list[tuple[str, str]] = [("BuildTime", build_time), ("BuildTool", build_tool),
                                    ("BuildToolVersion", build_tool_version),
                                    ("OperatingSystem", operating_system), ("KernelVersion", kernel_version)]
    for key, text in [*top, *build]:
        if not isinstance(text, str):
            raise InvalidOptions(f"metadata field {key} must be a string", details={"reason": "invalid_metadata"})
    for key, text in top:
        out.append(f"{json.dumps(key)}:")
        _json_value(text, out, 1)
        out.append(",")
    out.append('"BuildMetadata":{')
    out.append(",".join(f"{json.dumps(key)}:{json.dumps(text, ensure_ascii=False)}" for key, text in build))
    out.append('},"DockerInfo":')
    _json_value(docker_info, out, 1)
    out.append(',"CustomMetadata":')
    _json_value(custom, out, 1)
    out.append("}")
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates have no UTF-8 form
        raise InvalidOptions("metadata contains text that is not valid Unicode",
                             details={"reason": "invalid_metadata"}) from exc


_CONFIG_SPLIT = re.compile(r"[ /-]")


def kernel_info_from_config(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(OperatingSystem, KernelVersion) from a kernel config, as nitro-cli derives them.

    nitro-cli splits the third line (e.g. `# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel
    Configuration`) on ' ', '/' and '-' and takes words 1 and 3: ("Linux", "4.14.256").
    """
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            lines = [f.readline() for _ in range(3)]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidBlobs(f"cannot read kernel config {os.fspath(path)!r}: {exc}") from exc
    words = _CONFIG_SPLIT.split(lines[2].rstrip("\n"))
    if len(words) < 4:
        raise InvalidBlobs(f"kernel config {os.fspath(path)!r}: third line {lines[2]!r} has no OS and version")
    return words[1], words[3]


BUILD_FIELDS = ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion")


def parse_metadata(raw: bytes, *, stage: str) -> dict[str, object]:
    """The metadata JSON, checked against the shape nitro-cli deserialises (EifIdentityInfo)."""
    def bad(message: str) -> InvalidEif:
        return InvalidEif(f"metadata section: {message}", details={"reason": "invalid_metadata", "stage": stage})

    if len(raw) > METADATA_MAX_SIZE:
        raise InvalidEif(f"metadata section larger than {METADATA_MAX_SIZE} bytes",
                         details={"reason": "section_too_large", "stage": stage})
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    for key in ("ImageName", "ImageVersion"):
        if not isinstance(meta.get(key), str):
            raise bad(f"{key} missing or not a string")
    build = meta.get("BuildMetadata")
    if not isinstance(build, dict) or not all(isinstance(build.get(k), str) for k in BUILD_FIELDS):
        raise bad(f"BuildMetadata must be an object with string fields {', '.join(BUILD_FIELDS)}")
    for key in ("DockerInfo", "CustomMetadata"):
        if key not in meta:
            raise bad(f"{key} missing (nitro-cli requires the key, null allowed)")
    if meta["CustomMetadata"] is not None and not isinstance(meta["CustomMetadata"], dict):
        raise bad("CustomMetadata must be an object or null (describe-eif flattens it)")
    return meta
