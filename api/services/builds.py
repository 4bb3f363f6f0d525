"""Build use cases: submit, read, list, cancel, and wait for a conversion to end."""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, and_, bindparam, func, select, update
from sqlalchemy.orm import Session

from api.limits import lock_account_app
from common.buildstore import NewBuild, end_unsuccessfully, insert_build, user_actor
from common.errors import (
    Conflict,
    NotFound,
    QueueUnavailable,
    ValidationFailed,
)
from common.hostpolicy import check_registry_host
from common.models import App, Build
from common.queue import enqueue_conversion
from common.reference import parse_reference
from common.sealing import Credentials, Sealer
from common.settings import Settings
from common.status import CONVERSION_TERMINAL, ConversionState

log = logging.getLogger(__name__)

DEFAULT_CPU_COUNT = 2
_OPTION_DEFAULTS: dict[str, object] = {
    "add_ccm_ca_certificates": False, "allow_cmdline_args": False, "debug": False, "entrypoint": [],
    "entrypoint_args": [], "env_vars": [], "mutable_env_vars": [], "java_mode": None,
}


@dataclass(frozen=True)
class Submitted:
    build: Build
    app: App
    created: bool

    @property
    def build_id(self) -> uuid.UUID:
        return self.build.id


def _fingerprint(body: Mapping[str, object]) -> str:
    """Hash of the request without passwords, to tell a retry from a different request under one key."""

    def scrub(value: object) -> object:
        if isinstance(value, Mapping):
            return {k: ("<redacted>" if k == "password" else scrub(v)) for k, v in value.items()}
        if isinstance(value, list):
            return [scrub(v) for v in value]
        return str(value) if isinstance(value, uuid.UUID) else value

    return hashlib.sha256(json.dumps(scrub(body), sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _credentials(image: Mapping[str, object]) -> Credentials | None:
    auth = image.get("auth_config")
    if not isinstance(auth, Mapping) or (auth.get("username") is None and auth.get("password") is None):
        return None
    return Credentials(username=str(auth.get("username") or ""), password=str(auth.get("password") or ""))


def submit(session: Session, s: Settings, sealer: Sealer, *, account_id: uuid.UUID, user_id: uuid.UUID,
           body: Mapping[str, object], idempotency_key: str | None) -> Submitted:
    """Record the conversion request (QUEUED, PENDING), commit, then enqueue it.

    Everything that needs no database (host policy, sealing, the fingerprint) is done before the
    account's quota lock is taken, so submissions of one account serialise on two short round trips
    (the app with the lock; the insert with the quota check) and the commit, not on CPU work.
    """
    build_id = uuid.uuid4()
    src, dst = body["input_image"], body["output_image"]
    assert isinstance(src, Mapping) and isinstance(dst, Mapping)
    for image in (src, dst):
        check_registry_host(parse_reference(str(image["name"])).api_host, allow_list=s.insecure_registries,
                            production=s.env == "production")
    src_creds, dst_creds = _credentials(src), _credentials(dst)
    sealed_in = sealer.seal_credentials(src_creds, str(build_id)) if src_creds else None
    sealed_out = sealer.seal_credentials(dst_creds, str(build_id)) if dst_creds else None
    fingerprint = _fingerprint(body)

    retry = idempotency_key is not None and session.execute(select(Build.id).where(
        Build.account_id == account_id, Build.idempotency_key == idempotency_key)).first() is not None
    # A retried submission returns its build even when the account is at its quota: no lock, no count.
    app = lock_account_app(session, account_id, body["app_id"], lock=not retry)
    if app is None:
        raise ValidationFailed("The request is invalid.",
                               details={"fields": {"app_id": ["no such app in this account"]}})
    defaults = app.default_build_settings.get("nitro_enclaves") or {}
    assert isinstance(defaults, Mapping)
    options = {**_OPTION_DEFAULTS, **(defaults.get("converter_options") or {}),
               **(body.get("converter_options") or {})}  # type: ignore[dict-item]

    def pick(key: str, fallback: object) -> object:
        value = body.get(key)
        return value if value is not None else defaults.get(key, fallback)

    # Neither the request nor the app names a size: the worker uses the smallest valid one for the EIF.
    mem_size = pick("mem_size", None)
    new = NewBuild(
        build_id=build_id, account_id=account_id, app_id=app.id, created_by=user_id,
        input_image_name=str(src["name"]), output_image_name=str(dst["name"]),
        input_username=src_creds.username if src_creds else None,
        output_username=dst_creds.username if dst_creds else None,
        input_credentials=sealed_in, output_credentials=sealed_out,
        converter_options=options, cpu_count=int(pick("cpu_count", DEFAULT_CPU_COUNT)),  # type: ignore[call-overload]
        mem_size=int(mem_size) if mem_size is not None else None,  # type: ignore[call-overload]
        enable_overlay_filesystem_persistence=bool(pick("enable_overlay_filesystem_persistence", True)),
        request_fingerprint=fingerprint, idempotency_key=idempotency_key)
    # The quota is checked by the insert itself, under the account lock taken above.
    build, created = insert_build(session, new, quota=None if retry else s.max_queued_per_account)
    session.commit()
    if created:
        try:
            enqueue_conversion(s.redis_url, s.visibility_timeout, str(build.id))
        except QueueUnavailable:
            # The row is committed and QUEUED: the sweeper publishes it when Redis is back.
            log.warning("enqueue failed build_id=%s; the sweeper will retry", build.id)
    return Submitted(build, app, created)


# A Build as the routes present it: its row and its app's name and description, read with Core (no ORM objects:
# a poller lists many builds many times a second).
_BUILDS: Table = Build.__table__  # type: ignore[assignment]
_UNSHOWN = {"account_id", "created_by", "idempotency_key", "request_fingerprint", "approval_reason", "lease_owner",
            "lease_expires_at", "enqueued_at", "not_before", "claimed_at"}
_VIEW = select(*(c for c in _BUILDS.c if c.key not in _UNSHOWN), App.name.label("app_name"),
               App.description.label("app_description")).join(App, App.id == _BUILDS.c.app_id)
GET_STATEMENT = _VIEW.where(_BUILDS.c.id == bindparam("build_id"), _BUILDS.c.account_id == bindparam("account_id"))


def get(session: Session, account_id: uuid.UUID, build_id: uuid.UUID) -> Row[Any]:
    """The build's row with `app_name` and `app_description`."""
    row = session.connection().execute(GET_STATEMENT, {"build_id": build_id, "account_id": account_id}).one_or_none()
    if row is None:
        raise NotFound("no such build")
    return row


_SORT = {"created_at": _BUILDS.c.created_at, "updated_at": _BUILDS.c.updated_at,
         "status": _BUILDS.c.approval_status, "app_name": App.name}


def list_builds(session: Session, account_id: uuid.UUID, q: Mapping[str, object]
                ) -> tuple[Sequence[Row[Any]], int, int]:
    """(page of builds as `get` gives them, total in account, total matching the filters)."""
    filters: list[ColumnElement[bool]] = []
    if q.get("status"):
        filters.append(_BUILDS.c.approval_status == q["status"])
    if q.get("app_id"):
        filters.append(_BUILDS.c.app_id == q["app_id"])
    if q.get("docker_image_name"):
        filters.append(_BUILDS.c.output_image_name == q["docker_image_name"])
    key, _, direction = str(q["sort_by"]).partition(":")
    column = _SORT[key]
    order = column.asc() if direction == "ASC" else column.desc()
    conn = session.connection()
    mine = _BUILDS.c.account_id == account_id
    # Both counts in one scan of the account's builds (every build has its app: no join needed to count).
    matching = func.count().filter(and_(*filters)) if filters else func.count()
    total, filtered = conn.execute(select(func.count(), matching).select_from(_BUILDS).where(mine)).one()
    rows = conn.execute(_VIEW.where(mine, *filters).order_by(order, _BUILDS.c.id)
                        .limit(int(q["limit"])).offset(int(q["offset"]))).all()  # type: ignore[call-overload]
    return rows, total, filtered


def cancel(session: Session, account_id: uuid.UUID, build_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Cancel the conversion. True when it is already CANCELLED, False when a worker will honour it."""
    build = get(session, account_id, build_id)
    state = ConversionState(build.conversion_state)
    if state in CONVERSION_TERMINAL:
        raise Conflict(f"the conversion already ended ({state.value})", code="invalid_transition")
    actor = user_actor(user_id)
    if state is ConversionState.QUEUED and end_unsuccessfully(
            session, build_id, state, ConversionState.CANCELLED, actor=actor, code="cancelled",
            message="cancelled by the user"):
        session.commit()
        return True
    # Running (or claimed meanwhile): the worker checks this flag between steps and at each heartbeat.
    session.execute(update(Build).where(Build.id == build_id).values(cancel_requested=True, updated_at=func.now())
                    .execution_options(synchronize_session=False))
    session.commit()
    return False


def wait_for_end(session: Session, account_id: uuid.UUID, build_id: uuid.UUID, seconds: float,
                 poll: float = 0.25) -> bool:
    """Poll until the conversion is terminal or `seconds` pass. True when it ended."""
    deadline = time.monotonic() + seconds
    while True:
        state = session.execute(select(Build.conversion_state).where(
            Build.id == build_id, Build.account_id == account_id)).scalar_one()
        session.rollback()  # end the snapshot so the next poll sees new commits, and hold no connection
        if ConversionState(state) in CONVERSION_TERMINAL:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(min(poll, max(0.0, deadline - time.monotonic())))
        poll = min(poll * 1.5, 2.0)
