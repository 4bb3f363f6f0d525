"""CCM's API document as data (tests/data/ccm/contract.json, see extract.py there) and a checker of JSON values
against its schemas, read as a generated client reads them: every required field present and not null, the
documented types, formats and enums, nested objects, maps and arrays checked the same way; an optional field
may be absent or null."""
from __future__ import annotations

import json
import re
import uuid
from pathlib import Path

CONTRACT = json.loads((Path(__file__).resolve().parents[2] / "data" / "ccm" / "contract.json").read_text())
DEFINITIONS: dict[str, dict] = CONTRACT["definitions"]
OPERATIONS: dict[tuple[str, str], dict] = {(op["method"], op["path"]): op for op in CONTRACT["operations"]}
# Our route parameters for CCM's path parameters.
_PARAM_NAMES = {"account-id": "acct_id"}


def our_path(ccm_path: str) -> str:
    """The OpenAPI path of ours serving a CCM path: `{build-id}` -> `{build_id}`, `{account-id}` -> `{acct_id}`."""
    return re.sub(r"\{([^}]+)\}", lambda m: "{" + _PARAM_NAMES.get(m.group(1), m.group(1).replace("-", "_")) + "}",
                  ccm_path)


def resolve(schema: dict) -> dict:
    while "$ref" in schema:
        schema = DEFINITIONS[schema["$ref"].rsplit("/", 1)[1]]
    return schema


def problems(value: object, schema: dict | None, where: str = "$") -> list[str]:
    """What a client generated from CCM's document would refuse in `value` (empty when it reads it)."""
    if schema is None:
        return []
    schema = resolve(schema)
    found: list[str] = []
    kind = schema.get("type") or ("object" if "properties" in schema or "additionalProperties" in schema else None)
    if value is None:
        return [] if schema.get("x-nullable") or kind is None else [f"{where}: null where {kind} is documented"]
    checks = {"string": lambda v: isinstance(v, str), "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "boolean": lambda v: isinstance(v, bool), "object": lambda v: isinstance(v, dict),
              "array": lambda v: isinstance(v, list)}
    if kind in checks and not checks[kind](value):
        return [f"{where}: {type(value).__name__} where {kind} is documented"]
    if "enum" in schema and value not in schema["enum"]:
        found.append(f"{where}: {value!r} not one of {schema['enum']}")
    if kind == "string" and schema.get("format") == "uuid":
        try:
            uuid.UUID(str(value))
        except ValueError:
            found.append(f"{where}: {value!r} is not a uuid")
    if isinstance(value, dict):
        for name in schema.get("required", []):
            if value.get(name) is None:
                found.append(f"{where}.{name}: required, missing or null")
        for name, prop in schema.get("properties", {}).items():
            if value.get(name) is not None:
                found += problems(value[name], prop, f"{where}.{name}")
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for name, item in value.items():
                if name not in schema.get("properties", {}):
                    found += problems(item, extra, f"{where}[{name!r}]")
        if "maxProperties" in schema and len(value) > schema["maxProperties"]:
            found.append(f"{where}: more than {schema['maxProperties']} properties")
        if "minProperties" in schema and len(value) < schema["minProperties"]:
            found.append(f"{where}: fewer than {schema['minProperties']} properties")
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            found += problems(item, schema["items"], f"{where}[{index}]")
    return found


def request_problems(body: object, schema: dict | None, where: str = "$") -> list[str]:
    """`problems`, and no field the document does not name: what the test sends is a CCM client's request."""
    found = problems(body, schema, where)
    if schema is None or not isinstance(body, dict):
        return found
    schema = resolve(schema)
    props = schema.get("properties", {})
    if props and not isinstance(schema.get("additionalProperties"), dict):
        found += [f"{where}.{name}: not in CCM's document" for name in body if name not in props]
    for name, value in body.items():
        if name in props and isinstance(value, dict):
            found += [p for p in request_problems(value, props[name], f"{where}.{name}") if "not in CCM's" in p]
    return found
