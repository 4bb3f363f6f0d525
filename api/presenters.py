"""Records to response dicts (the seed's Build, Task, App shapes); schemas dump (the Build's: see build_view) and
document them."""
from __future__ import annotations

import math
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import Row

from api.schemas.builds import ATTRIBUTES_KEY, BootCheckSchema, ConverterOptionsSchema
from common.store.models import App, Build, Task
from common.store.status import ApprovalStatus

REDACTED = "***"
NIL_UUID = "00000000-0000-0000-0000-000000000000"  # CCM's ApprovalInfo requires a user id: the SYSTEM's


def epoch(value: datetime | None) -> int | None:
    return int(value.timestamp()) if value is not None else None


def _epoch(value: datetime) -> int:
    return int(value.timestamp())


def _auth_echo(username: str | None, sealed: bytes | None) -> dict[str, object] | None:
    if username is None and sealed is None:
        return None
    return {"username": username, "password": REDACTED}


def _str(value: object) -> str | None:
    return str(value) if value is not None else None


def _strings(value: object) -> list[str | None]:
    return [_str(item) for item in value or ()]  # type: ignore[attr-defined]


# The parts stored as JSON go through their own schemas: their values are whatever the row holds.
_BOOT_CHECK = BootCheckSchema()
_OPTIONS = ConverterOptionsSchema()
_OPTION_KINDS = {"add_ccm_ca_certificates": bool, "allow_cmdline_args": bool, "debug": bool, "entrypoint": list,
                 "entrypoint_args": list, "env_vars": list, "mutable_env_vars": list, "java_mode": str, "network": dict}


def _is_dumped(key: str, value: object) -> bool:
    kind = _OPTION_KINDS.get(key)
    if kind is list:
        return type(value) is list and all(type(item) is str for item in value)
    return kind is not None and (type(value) is kind or (kind in (str, dict) and value is None))


def _options(stored: dict[str, object]) -> dict[str, object]:
    # What the API stored itself is already the dump (declared keys, exact types): skip the schema for it.
    if all(_is_dumped(key, value) for key, value in stored.items()):
        return stored
    return _OPTIONS.dump(stored)


def _boot_check(stored: dict[str, object] | None) -> dict[str, object] | None:
    # Only the documented keys: the stored JSON may gain fields the API has not promised.
    if stored is None:
        return None
    view = {key: stored.get(key) for key in _BOOT_CHECK.fields}
    view["mode"] = view["mode"] or "plain"  # a check recorded without a mode ran plain: the emulator mode came later
    return _BOOT_CHECK.dump(view)


def build_view(build: Build | Row[Any], app_name: str, app_description: str,
               app_group_id: uuid.UUID | str | None = None) -> dict[str, object]:
    """The Build exactly as `BuildSchema().dump` gives it (JSON types, ids as strings), so the routes can send
    it without a dump; tests/unit/api/test_presenters.py holds the two equal."""
    options = dict(build.converter_options)
    attributes: dict[str, object] = {}
    if build.pcr0 is not None:
        nitro: dict[str, object] = {"hash_algorithm": "Sha384", "pcr0": build.pcr0, "pcr1": _str(build.pcr1),
                                    "pcr2": _str(build.pcr2)}
        if build.pcr8:
            nitro["pcr8"] = build.pcr8
        attributes[ATTRIBUTES_KEY] = {"nitro_enclave": nitro}
    error = ({"code": build.error_code, "message": build.error_message or ""}
             if build.error_code else None)
    created_at = _epoch(build.created_at)
    return {
        "build_id": str(build.id),
        "docker_info": {
            "docker_image_name": build.output_image_name,
            "docker_version": build.docker_version or "",  # CCM requires a string
            "docker_image_sha": build.output_digest,
            "docker_image_size": math.ceil(build.output_size / (1 << 20)) if build.output_size is not None else None,
            "exposed_ports": [{"port": int(p[0]), "protocol": str(p[1]).capitalize()}  # type: ignore[arg-type]
                              for p in build.exposed_ports],
        },
        "created_at": created_at,
        "updated_at": _epoch(build.updated_at),
        "app_id": str(build.app_id),
        "app_name": app_name,
        "status": {"status": build.approval_status, "status_updated_at": _epoch(build.approval_updated_at)},
        "deployment_status": {"status": "UNDEPLOYED", "status_updated_at": created_at},
        "enclave_info": None,
        "attributes": attributes,
        "app_description": app_description,
        "mem_size": build.mem_size,
        "threads": build.cpu_count,
        "advanced_settings": {
            "entrypoint": _strings(options.get("entrypoint")),
            "allowCmdlineArgs": bool(options.get("allow_cmdline_args")),
            "manifestEnv": _strings(options.get("env_vars")),
            "mutableEnv": _strings(options.get("mutable_env_vars")),
            "java_runtime": _str(options.get("java_mode")),
        },
        "build_name": None,
        "pending_task_id": _str(build.pending_task_id),
        "configs": dict(build.configs or {}),  # None on a build just submitted, before the database filled it
        "marketplace_build_id": None,
        "launch_hint": None,
        "enable_overlay_filesystem_persistence": build.enable_overlay_filesystem_persistence,
        "group_id": _str(app_group_id),  # a Build is in its app's group
        "conversion": {
            "state": build.conversion_state,
            "progress": float(build.progress),
            "error": error,
            "input_digest": build.input_digest,
            "output_digest": build.output_digest,
            "eif_size": build.eif_size,
            "eif_sha256": build.eif_sha256,
            "started_at": epoch(build.started_at),
            "finished_at": epoch(build.finished_at),
            "attempts": build.attempts,
            "warnings": _strings(build.warnings),
            "cancel_requested": build.cancel_requested,
            "boot_check": _boot_check(build.boot_check),
            "reused_from": build.reused_from,
            "network": build.network,
            "request": {
                "input_image": {"name": build.input_image_name,
                                "auth_config": _auth_echo(build.input_username, build.input_credentials)},
                "output_image": {"name": build.output_image_name,
                                 "auth_config": _auth_echo(build.output_username, build.output_credentials)},
                "converter_options": _options(options),
            },
        },
    }


def app_view(app: App) -> dict[str, object]:
    return {
        "app_id": app.id, "acct_id": app.account_id, "name": app.name, "description": app.description,
        "input_image_name": app.input_image_name or "", "output_image_name": app.output_image_name or "",
        "default_build_settings": dict(app.default_build_settings), "auto_approve": app.auto_approve,
        "created_at": _epoch(app.created_at), "updated_at": _epoch(app.updated_at),
        "isvprodid": app.isvprodid, "isvsvn": app.isvsvn, "mem_size": app.mem_size, "threads": app.threads,
        "allowed_domains": list(app.allowed_domains), "labels": dict(app.labels),
        "custom_metadata": dict(app.custom_metadata), "advanced_settings": dict(app.advanced_settings),
        "certificate_policy": dict(app.certificate_policy) if app.certificate_policy is not None else None,
        "signers": list(app.signers or ()), "group_id": app.group_id,
    }


def task_view(task: Task, build: Build, requester_email: str | None, approver_email: str | None) -> dict[str, object]:
    approver: dict[str, object] | None = None
    if task.approved_by_system:
        approver = {"user_id": None, "user_name": "SYSTEM"}
    elif task.approver_id is not None:
        approver = {"user_id": task.approver_id, "user_name": approver_email or ""}
    status = {"status": task.status, "created_at": _epoch(task.created_at), "status_updated_at": _epoch(task.updated_at)}
    approvals: list[dict[str, object]] = []
    if approver is not None:
        approvals.append({"user_id": approver["user_id"] or NIL_UUID, "user_name": approver["user_name"],
                          "status": "DENIED" if task.status == "DENIED" else "APPROVED",
                          "denial_reason": task.denial_reason})
    requester_info: dict[str, object] = (
        {"requester_type": "USER", "user_id": task.requester_id, "user_name": requester_email or ""}
        if task.requester_id else {"requester_type": "SYSTEM"})
    return {
        "task_id": task.id, "acct_id": task.account_id, "entity_id": task.build_id, "build_id": task.build_id,
        "app_id": build.app_id, "type": task.type, "task_type": task.type, "status": status, "task_status": status,
        "requester_info": requester_info, "approvals": approvals,
        "requester": ({"user_id": task.requester_id, "user_name": requester_email or ""}
                      if task.requester_id else None),
        "approver": approver,
        "denial_reason": task.denial_reason,
        "description": f"Approve build {task.build_id} of {build.input_image_name} -> {build.output_image_name}",
        "created_at": _epoch(task.created_at), "updated_at": _epoch(task.updated_at),
    }


def is_decided(build: Build) -> bool:
    return build.approval_status != ApprovalStatus.PENDING.value


def page_metadata(limit: int, offset: int, total: int, filtered: int) -> dict[str, int]:
    return {"page": offset // limit + 1, "pages": max(1, math.ceil(filtered / limit)), "limit": limit,
            "total_count": total, "filtered_count": filtered}
