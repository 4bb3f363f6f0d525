"""Build use cases: submit, read, list, cancel, and wait for a conversion to end."""
from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, Row, Table, and_, bindparam, false, func, or_, select, update
from sqlalchemy import delete as delete_rows
from sqlalchemy.orm import Session

from api import sessions
from api.auth import Principal
from api.schemas.builds import MAX_CONFIGS, MAX_CONFIGS_BYTES
from api.schemas.common import group_ids
from api.submission import roles_at_least, submit_build, submit_build_pinned
from common.errors import (
    Conflict,
    NotFound,
    QueueUnavailable,
    Unauthenticated,
    ValidationFailed,
)
from common.queue.publish import enqueue_conversion
from common.registry.hostpolicy import check_registry_host
from common.registry.reference import parse_reference
from common.settings import Settings
from common.store import followers
from common.store.accounts import Role
from common.store.builds import (
    NewBuild,
    build_row,
    check_retry,
    end_unsuccessfully,
    existing_build,
    quota_exceeded,
    stamped_build,
    user_actor,
)
from common.store.engine import engine_for
from common.store.models import App, Build
from common.store.sealing import Credentials, Sealer
from common.store.status import CONVERSION_TERMINAL, ConversionState

log = logging.getLogger(__name__)

DEFAULT_CPU_COUNT = 2
_OPTION_DEFAULTS: dict[str, object] = {
    "add_ccm_ca_certificates": False, "allow_cmdline_args": False, "debug": False, "entrypoint": [],
    "entrypoint_args": [], "env_vars": [], "mutable_env_vars": [], "java_mode": None,
}


@dataclass(frozen=True)
class Submitted:
    account_id: uuid.UUID
    build: Build
    app_name: str
    app_description: str
    created: bool
    app_group_id: uuid.UUID | str | None = None

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


@dataclass(frozen=True)
class Draft:
    """What a submission works out before it touches the database: a build id, its sealed credentials and the
    request's fingerprint, the host policy checked."""

    build_id: uuid.UUID
    src: Mapping[str, object]
    dst: Mapping[str, object]
    src_creds: Credentials | None
    dst_creds: Credentials | None
    sealed_in: bytes | None
    sealed_out: bytes | None
    fingerprint: str


def draft(s: Settings, sealer: Sealer, body: Mapping[str, object]) -> Draft:
    """Everything that needs no database, done before the account's quota lock is taken."""
    build_id = uuid.uuid4()
    src, dst = body["input_image"], body["output_image"]
    assert isinstance(src, Mapping) and isinstance(dst, Mapping)
    for image in (src, dst):
        check_registry_host(parse_reference(str(image["name"])).api_host, allow_list=s.insecure_registries,
                            production=s.env == "production")
    src_creds, dst_creds = _credentials(src), _credentials(dst)
    sealed_in = sealer.seal_credentials(src_creds, str(build_id)) if src_creds else None
    sealed_out = sealer.seal_credentials(dst_creds, str(build_id)) if dst_creds else None
    return Draft(build_id, src, dst, src_creds, dst_creds, sealed_in, sealed_out, _fingerprint(body))


def _new_build(d: Draft, body: Mapping[str, object], settings: Mapping[str, object], *, account_id: uuid.UUID,
               app_id: uuid.UUID, user_id: uuid.UUID, idempotency_key: str | None) -> NewBuild:
    """The build the request asks for, with the app's default_build_settings filling what it leaves out."""
    defaults = settings.get("nitro_enclaves") or {}
    assert isinstance(defaults, Mapping)
    options = {**_OPTION_DEFAULTS, **(defaults.get("converter_options") or {}),
               **(body.get("converter_options") or {})}  # type: ignore[dict-item]

    def pick(key: str, fallback: object) -> object:
        value = body.get(key)
        return value if value is not None else defaults.get(key, fallback)

    # Neither the request nor the app names a size: the worker uses the smallest valid one for the EIF.
    mem_size = pick("mem_size", None)
    return NewBuild(
        build_id=d.build_id, account_id=account_id, app_id=app_id, created_by=user_id,
        input_image_name=str(d.src["name"]), output_image_name=str(d.dst["name"]),
        input_username=d.src_creds.username if d.src_creds else None,
        output_username=d.dst_creds.username if d.dst_creds else None,
        input_credentials=d.sealed_in, output_credentials=d.sealed_out,
        converter_options=options, cpu_count=int(pick("cpu_count", DEFAULT_CPU_COUNT)),  # type: ignore[call-overload]
        mem_size=int(mem_size) if mem_size is not None else None,  # type: ignore[call-overload]
        enable_overlay_filesystem_persistence=bool(pick("enable_overlay_filesystem_persistence", True)),
        request_fingerprint=d.fingerprint, idempotency_key=idempotency_key)


# Per process: each app's default_build_settings as last seen (jsonb text, parsed). Only a guess: the submission
# statement checks it against the app's current settings and answers `stale` (inserting nothing) when it differs.
_APP_SETTINGS: dict[uuid.UUID, tuple[str, Mapping[str, object]]] = {}
_APP_SETTINGS_MAX = 4096
_STALE_TRIES = 3
# Tries with the app's settings pinned, after the others: each `moved` answer (the session selected another account
# meanwhile) uses one, and a session moved under every one of them gets a 409.
_MOVED_TRIES = 3
_WRITERS = roles_at_least(Role.WRITER)


def _app_settings(app_id: uuid.UUID, seen: str | None) -> tuple[str | None, Mapping[str, object]]:
    if seen is not None:
        if len(_APP_SETTINGS) >= _APP_SETTINGS_MAX:
            _APP_SETTINGS.clear()
        _APP_SETTINGS[app_id] = (seen, json.loads(seen))
    known = _APP_SETTINGS.get(app_id)
    return known if known is not None else (None, {})


def _rows_for(d: Draft, body: Mapping[str, object], *, account_id: uuid.UUID, app_id: uuid.UUID, user_id: uuid.UUID,
              idempotency_key: str | None) -> Callable[[str | None], Mapping[str, object]]:
    """The build's row for the app's settings as the database holds them (jsonb text; None: no such app)."""

    def values_for(settings: str | None) -> Mapping[str, object]:
        return build_row(_new_build(d, body, json.loads(settings) if settings else {}, account_id=account_id,
                                    app_id=app_id, user_id=user_id, idempotency_key=idempotency_key))

    return values_for


def submit(db: Callable[[], Session], s: Settings, d: Draft, *, account_id: uuid.UUID | None, user_id: uuid.UUID,
           body: Mapping[str, object], idempotency_key: str | None, session_id: uuid.UUID | None = None
           ) -> Submitted:
    """Record the conversion request (QUEUED, PENDING) with the caller's role checked, then enqueue it.

    The submission's statement (api/submission.py) checks every rule and commits; a Forbidden is raised as the
    caller's `Principal.require(Role.WRITER)` would. `db` gives the request's session, opened only for the rare
    answers that need a second look (a retried Idempotency-Key). `account_id` and `user_id` are the caller's
    session as this process last saw it: the statement checks them against the session (`session_id`) and
    answers `moved` with the current ones, which the next try uses.
    """
    engine = engine_for(s.database_url)
    app_id = body["app_id"]
    assert isinstance(app_id, uuid.UUID)
    seen: str | None = None
    row: Mapping[str, object]
    for attempt in range(_STALE_TRIES + _MOVED_TRIES):
        if account_id is None:
            Principal(user_id=user_id, account_id=None, role=None).require(Role.WRITER)
        assert account_id is not None
        if attempt < _STALE_TRIES:
            known, settings = _app_settings(app_id, seen)
            row = build_row(_new_build(d, body, settings, account_id=account_id, app_id=app_id, user_id=user_id,
                                       idempotency_key=idempotency_key))
            got = submit_build(engine, row, user_id=user_id, account_id=account_id, roles=_WRITERS,
                               app_settings=known, quota=s.max_queued_per_account, session_id=session_id)
        else:
            # The app's settings changed under every try: read them under a lock that holds them still.
            values_for = _rows_for(d, body, account_id=account_id, app_id=app_id, user_id=user_id,
                                   idempotency_key=idempotency_key)
            got, row = submit_build_pinned(engine, values_for, app_id=app_id, user_id=user_id, account_id=account_id,
                                           roles=_WRITERS, quota=s.max_queued_per_account, session_id=session_id)
        if got.outcome == "session":
            assert session_id is not None
            sessions.forget(session_id)
            raise Unauthenticated("the session has ended or expired; sign in again")
        if got.outcome == "moved":
            assert session_id is not None and got.session_user_id is not None
            user_id = uuid.UUID(str(got.session_user_id))
            account_id = uuid.UUID(str(got.session_account_id)) if got.session_account_id else None
            sessions.remember(session_id, user_id, account_id)
            continue
        if got.outcome != "stale":
            break
        seen = got.app_settings
    else:
        raise Conflict("the session's account changed during the submission; retry")
    if got.outcome in ("deactivated", "disabled"):
        Principal(user_id=user_id, account_id=None, role=None,
                  refused="account_deactivated" if got.outcome == "deactivated" else "user_disabled").require_account()
        raise AssertionError("a refused account passed require_account()")
    if got.outcome == "role":
        role = Role(got.role) if got.role else None
        Principal(user_id=user_id, account_id=account_id if role else None, role=role).require(Role.WRITER)
        raise AssertionError("a role the statement refused passed require()")
    if got.outcome == "no_app":
        raise _no_app()
    app_name, app_description = str(got.app_name), str(got.app_description)
    if got.outcome == "quota":
        raise quota_exceeded(s.max_queued_per_account, int(got.unfinished or 0))
    if got.outcome in ("exists", "conflict"):
        assert idempotency_key is not None
        existing = existing_build(db(), account_id, idempotency_key)
        if existing is None:  # deleted (DELETE /v1/builds/{id}) since the statement saw it
            raise Conflict("the build of this Idempotency-Key was deleted; retry", code="idempotency_conflict")
        return Submitted(account_id, check_retry(existing, d.fingerprint), app_name, app_description, False,
                         got.app_group_id)
    assert got.outcome == "created", got.outcome
    build = stamped_build(row, got.created_at, got.updated_at, got.approval_updated_at)
    if got.waits_for is None:
        _enqueue(s, build.id)
    return Submitted(account_id, build, app_name, app_description, True, got.app_group_id)


def _no_app() -> ValidationFailed:
    return ValidationFailed("The request is invalid.", details={"fields": {"app_id": ["no such app in this account"]}})


def _enqueue(s: Settings, build_id: uuid.UUID) -> None:
    try:
        enqueue_conversion(s.redis_url, s.visibility_timeout, str(build_id))
    except QueueUnavailable:
        # The row is committed and QUEUED: the sweeper publishes it when Redis is back.
        log.warning("enqueue failed build_id=%s; the sweeper will retry", build_id)


# A Build as the routes present it: its row and its app's name and description, read with Core (no ORM objects:
# a poller lists many builds many times a second).
_BUILDS: Table = Build.__table__  # type: ignore[assignment]
_UNSHOWN = {"account_id", "created_by", "idempotency_key", "request_fingerprint", "approval_reason", "lease_owner",
            "lease_expires_at", "enqueued_at", "not_before", "claimed_at", "waits_for"}
_VIEW = select(*(c for c in _BUILDS.c if c.key not in _UNSHOWN), App.name.label("app_name"),
               App.description.label("app_description"), App.group_id.label("app_group_id")).join(App, App.id == _BUILDS.c.app_id)
GET_STATEMENT = _VIEW.where(_BUILDS.c.id == bindparam("build_id"), _BUILDS.c.account_id == bindparam("account_id"))


def get(session: Session, account_id: uuid.UUID, build_id: uuid.UUID) -> Row[Any]:
    """The build's row with `app_name`, `app_description` and `app_group_id`."""
    row = session.connection().execute(GET_STATEMENT, {"build_id": build_id, "account_id": account_id}).one_or_none()
    if row is None:
        raise NotFound("no such build")
    return row


_SORT = {"created_at": _BUILDS.c.created_at, "updated_at": _BUILDS.c.updated_at,
         "status": _BUILDS.c.approval_status, "app_name": App.name}


def update_configs(session: Session, account_id: uuid.UUID, build_id: uuid.UUID,
                   change: Mapping[str, object]) -> None:
    """Attach (an object) or detach (null) application configs by id; the others stay."""
    build = session.execute(select(Build).where(Build.id == build_id, Build.account_id == account_id)
                            .with_for_update()).scalar_one_or_none()
    if build is None:
        raise NotFound("no such build")
    configs = {**build.configs, **{k: v for k, v in change.items() if v is not None}}
    for key in (k for k, v in change.items() if v is None):
        configs.pop(key, None)
    if len(configs) > MAX_CONFIGS or len(json.dumps(configs)) > MAX_CONFIGS_BYTES:
        session.rollback()
        raise ValidationFailed("The request is invalid.", code="configs_too_large", details={"fields": {"configs": [
            f"a build carries at most {MAX_CONFIGS} configs of {MAX_CONFIGS_BYTES} bytes of JSON in all"]}})
    if configs != build.configs:
        build.configs = configs
        build.updated_at = func.now()
    session.commit()


def list_builds(session: Session, account_id: uuid.UUID, q: Mapping[str, object]
                ) -> tuple[Sequence[Row[Any]], int, int]:
    """(page of builds as `get` gives them, total in account, total matching the filters)."""
    filters: list[ColumnElement[bool]] = []
    if q.get("status"):
        filters.append(_BUILDS.c.approval_status == q["status"])
    if q.get("app_id"):
        filters.append(_BUILDS.c.app_id == q["app_id"])
    if q.get("docker_image_name"):  # CCM: the build's image name, or its app's output image name
        name = str(q["docker_image_name"])
        filters.append(or_(_BUILDS.c.output_image_name == name, _BUILDS.c.app_id.in_(
            select(App.id).where(App.account_id == account_id, App.output_image_name == name))))
    if q.get("all_search"):
        needle = "%" + str(q["all_search"]).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        filters.append(or_(*(column.ilike(needle, escape="\\") for column in (
            _BUILDS.c.input_image_name, _BUILDS.c.output_image_name, _BUILDS.c.output_digest,
            _BUILDS.c.input_digest)), _BUILDS.c.app_id.in_(
                select(App.id).where(App.account_id == account_id, App.name.ilike(needle, escape="\\")))))
    if q.get("filter"):  # a build's group is its app's
        filters.append(_BUILDS.c.app_id.in_(select(App.id).where(
            App.account_id == account_id, App.group_id.in_(group_ids(str(q["filter"]))))))
    if q.get("deployed_status") == "DEPLOYED":
        filters.append(false())  # never deployed here
    if q.get("config_id"):
        filters.append(_BUILDS.c.configs.has_key(str(q["config_id"])))
    order = []
    for part in str(q["sort_by"]).split(","):
        key, _, direction = part.partition(":")
        order.append(_SORT[key].asc() if direction == "ASC" else _SORT[key].desc())
    conn = session.connection()
    mine = _BUILDS.c.account_id == account_id
    # Both counts in one scan of the account's builds (every build has its app: no join needed to count).
    matching = func.count().filter(and_(*filters)) if filters else func.count()
    total, filtered = conn.execute(select(func.count(), matching).select_from(_BUILDS).where(mine)).one()
    rows = conn.execute(_VIEW.where(mine, *filters).order_by(*order, _BUILDS.c.id)
                        .limit(int(q["limit"])).offset(int(q["offset"]))).all()  # type: ignore[call-overload]
    return rows, total, filtered


def cancel(s: Settings, session: Session, account_id: uuid.UUID, build_id: uuid.UUID, user_id: uuid.UUID) -> bool:
    """Cancel the conversion. True when it is already CANCELLED, False when a worker will honour it."""
    build = get(session, account_id, build_id)
    state = ConversionState(build.conversion_state)
    if state in CONVERSION_TERMINAL:
        raise Conflict(f"the conversion already ended ({state.value})", code="invalid_transition")
    actor = user_actor(user_id)
    if state is ConversionState.QUEUED and end_unsuccessfully(
            session, build_id, state, ConversionState.CANCELLED, actor=actor, code="cancelled",
            message="cancelled by the user"):
        released = followers.release(session, build_id)  # builds that waited for it convert on their own
        session.commit()
        for follower in released:
            _enqueue(s, follower)
        return True
    # Running (or claimed meanwhile): the worker checks this flag between steps and at each heartbeat.
    session.execute(update(Build).where(Build.id == build_id).values(cancel_requested=True, updated_at=func.now())
                    .execution_options(synchronize_session=False))
    session.commit()
    return False


def delete(s: Settings, session: Session, account_id: uuid.UUID, build_id: uuid.UUID, user_id: uuid.UUID) -> None:
    """Delete the build (its task and events go with it). A conversion not yet ended is cancelled first, so a
    worker running it stops at its next step (its compare-and-set writes then find no row and change nothing)."""
    state = ConversionState(get(session, account_id, build_id).conversion_state)
    if state not in CONVERSION_TERMINAL:
        cancel(s, session, account_id, build_id, user_id)
    session.execute(delete_rows(Build).where(Build.id == build_id, Build.account_id == account_id)
                    .execution_options(synchronize_session=False))
    session.commit()


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
