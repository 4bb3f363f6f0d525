"""Extract from Fortanix CCM's API document what tests/integration/service/test_ccm_conformance.py needs, as data.

Origin: `openapi/fortanix-ccm-openapi-original.json` (Swagger 2.0, info.version 2.0.0) in the public repository
github.com/api-evangelist/fortanix. Run it on that file to regenerate `contract.json`:

    python tests/data/ccm/extract.py fortanix-ccm-openapi-original.json > tests/data/ccm/contract.json

Kept: the operations under /v1/sys, /v1/accounts, /v1/user(s), /v1/apps, /v1/builds and /v1/tasks (method,
path, success code, query and path parameter names with their types and enums, the body's schema), and the
definitions they reach, each cut down to type, format, required, enum, properties, items, additionalProperties,
$ref, x-nullable and min/maxProperties. No descriptions, summaries or examples (the document's prose) are kept.
"""
from __future__ import annotations

import json
import sys

PREFIXES = ("/v1/sys/", "/v1/accounts", "/v1/user", "/v1/apps", "/v1/builds", "/v1/tasks")
SCHEMA_KEYS = ("type", "format", "required", "enum", "properties", "items", "additionalProperties", "$ref",
               "x-nullable", "minProperties", "maxProperties")


def cut(schema: object) -> object:
    if not isinstance(schema, dict):
        return schema
    out: dict[str, object] = {}
    for key in SCHEMA_KEYS:
        if key not in schema:
            continue
        value = schema[key]
        if key == "properties":
            value = {name: cut(prop) for name, prop in value.items()}
        elif key in ("items", "additionalProperties") and isinstance(value, dict):
            value = cut(value)
        out[key] = value
    return out


def refs(value: object, found: set[str]) -> None:
    if isinstance(value, dict):
        ref = value.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/definitions/"):
            found.add(ref.rsplit("/", 1)[1])
        for item in value.values():
            refs(item, found)
    elif isinstance(value, list):
        for item in value:
            refs(item, found)


def main(path: str) -> None:
    doc = json.load(open(path))
    operations = []
    for route, methods in doc["paths"].items():
        if not route.startswith(PREFIXES):
            continue
        for method, op in methods.items():
            if method == "parameters":
                continue
            params = [doc["parameters"][p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
                      for p in op.get("parameters", [])]
            success = sorted(code for code in op["responses"] if code.startswith("2"))
            operations.append({
                "operation_id": op["operationId"], "method": method.upper(), "path": route,
                "success": int(success[0]), "response": cut(op["responses"][success[0]].get("schema")),
                "body": next((cut(p["schema"]) for p in params if p["in"] == "body"), None),
                "query": {p["name"]: cut({k: v for k, v in p.items() if k in ("type", "enum", "format")})
                          for p in params if p["in"] == "query"},
                "path_params": [p["name"] for p in params if p["in"] == "path"],
            })
    needed: set[str] = set()
    refs(operations, needed)
    done: set[str] = set()
    while needed - done:
        name = sorted(needed - done)[0]
        done.add(name)
        refs(doc["definitions"][name], needed)
    json.dump({"origin": "github.com/api-evangelist/fortanix openapi/fortanix-ccm-openapi-original.json, Swagger "
                         f"{doc['swagger']}, info.version {doc['info']['version']}; see extract.py",
               "operations": operations,
               "definitions": {name: cut(doc["definitions"][name]) for name in sorted(done)}},
              sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1])
