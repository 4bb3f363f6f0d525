"""Persistence of builds and tasks; with common/store/followers.py (builds served by an identical one), the only
module that writes their status columns.

Every status write is a compare-and-set UPDATE whose WHERE clause is the edge of the table in
`common.store.status` (and, for a worker, its lease token): the row count decides the winner, and the
winner appends a `build_events` row in the same transaction.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy import (
    ColumnElement,
    and_,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session, aliased

from common.errors import Conflict, IdempotencyKeyReused, InvalidTransition, NotFound, QuotaExceeded
from common.store.models import App, Build, BuildEvent, Task
from common.store.status import (
    APPROVAL_TRANSITIONS,
    CONVERSION_TERMINAL,
    CONVERSION_TRANSITIONS,
    RUNNING,
    TASK_TRANSITIONS,
    ApprovalStatus,
    ConversionState,
    TaskStatus,
    allowed,
)

SYSTEM = "system"


def user_actor(user_id: uuid.UUID) -> str:
    return f"user:{user_id}"


def worker_actor(fence: uuid.UUID) -> str:
    return f"worker:{fence}"


def _event(session: Session, build_id: uuid.UUID, machine: str, src: str, dst: str, actor: str,
           reason: str | None) -> None:
    session.execute(insert(BuildEvent).values(
        build_id=build_id, machine=machine, from_state=src, to_state=dst, actor=actor, reason=reason))


def transition_conversion(
    session: Session, build_id: uuid.UUID, src: ConversionState, dst: ConversionState, *, actor: str,
    reason: str | None = None, fence: uuid.UUID | None = None,
    values: Mapping[str, object] | None = None, where: Iterable[ColumnElement[bool]] = (),
) -> bool:
    """Move `conversion_state` from `src` to `dst`. False when another writer got there first.

    `fence` is the lease token of the worker holding the conversion: a worker whose lease was
    taken over (requeued after it looked dead) matches no row and learns it has lost.
    """
    if not allowed(CONVERSION_TRANSITIONS, src, dst):
        raise InvalidTransition(f"conversion cannot go from {src.value} to {dst.value}")
    stmt = update(Build).where(Build.id == build_id, Build.conversion_state == src.value, *where)
    if fence is not None:
        stmt = stmt.where(Build.lease_owner == fence)
    stmt = stmt.values(conversion_state=dst.value, updated_at=func.now(), **dict(values or {}))
    if session.execute(stmt.execution_options(synchronize_session=False)).rowcount != 1:  # type: ignore[attr-defined]
        return False
    _event(session, build_id, "conversion", src.value, dst.value, actor, reason)
    return True


def transition_approval(
    session: Session, build_id: uuid.UUID, src: ApprovalStatus, dst: ApprovalStatus, *, actor: str,
    reason: str | None = None, where: Iterable[ColumnElement[bool]] = (),
) -> bool:
    """Move the seed's `status.status` from `src` to `dst`; False when the CAS lost."""
    if not allowed(APPROVAL_TRANSITIONS, src, dst):
        raise InvalidTransition(f"build status cannot go from {src.value} to {dst.value}")
    stmt = (update(Build)
            .where(Build.id == build_id, Build.approval_status == src.value, *where)
            .values(approval_status=dst.value, approval_updated_at=func.now(), approval_reason=reason,
                    updated_at=func.now())
            .execution_options(synchronize_session=False))
    if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
        return False
    _event(session, build_id, "approval", src.value, dst.value, actor, reason)
    return True


def transition_task(
    session: Session, task: Task, src: TaskStatus, dst: TaskStatus, *, actor: str,
    approver_id: uuid.UUID | None, reason: str | None = None,
) -> bool:
    if not allowed(TASK_TRANSITIONS, src, dst):
        raise InvalidTransition(f"task cannot go from {src.value} to {dst.value}")
    stmt = (update(Task)
            .where(Task.id == task.id, Task.status == src.value)
            .values(status=dst.value, approver_id=approver_id, approved_by_system=approver_id is None,
                    denial_reason=reason if dst is TaskStatus.DENIED else None, updated_at=func.now())
            .execution_options(synchronize_session=False))
    if session.execute(stmt).rowcount != 1:  # type: ignore[attr-defined]
        return False
    _event(session, task.build_id, "task", src.value, dst.value, actor, reason)
    return True


# --- submission -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class NewBuild:
    """A validated conversion request; credentials already sealed for this build id."""

    build_id: uuid.UUID
    account_id: uuid.UUID
    app_id: uuid.UUID
    created_by: uuid.UUID | None
    input_image_name: str
    output_image_name: str
    input_username: str | None
    output_username: str | None
    input_credentials: bytes | None
    output_credentials: bytes | None
    converter_options: Mapping[str, object]
    cpu_count: int
    mem_size: int | None  # None: the worker sizes it from the EIF and records what it used
    enable_overlay_filesystem_persistence: bool
    request_fingerprint: str
    idempotency_key: str | None = None


# The states whose builds count against an account's quota (the submission statement, migration 0007, lists them).
UNFINISHED = tuple(st.value for st in ConversionState if st not in CONVERSION_TERMINAL)


def build_row(new: NewBuild) -> dict[str, object]:
    """The columns a submission sends for `new` (the server sets the timestamps)."""
    return {
        "id": new.build_id, "account_id": new.account_id, "app_id": new.app_id, "created_by": new.created_by,
        "idempotency_key": new.idempotency_key, "request_fingerprint": new.request_fingerprint,
        "input_image_name": new.input_image_name, "output_image_name": new.output_image_name,
        "input_username": new.input_username, "output_username": new.output_username,
        "input_credentials": new.input_credentials, "output_credentials": new.output_credentials,
        "converter_options": dict(new.converter_options), "cpu_count": new.cpu_count, "mem_size": new.mem_size,
        "enable_overlay_filesystem_persistence": new.enable_overlay_filesystem_persistence,
        "approval_status": ApprovalStatus.PENDING.value, "conversion_state": ConversionState.QUEUED.value,
        "progress": 0.0, "attempts": 0, "cancel_requested": False, "exposed_ports": [], "warnings": [],
    }


def stamped_build(row: Mapping[str, object], created_at: object, updated_at: object,
                  approval_updated_at: object) -> Build:
    """The inserted build, assembled from the values sent and the server's timestamps (detached: a record to
    present, not to change)."""
    return Build(**row, created_at=created_at, updated_at=updated_at, approval_updated_at=approval_updated_at,
                 enqueued_at=created_at)


def existing_build(session: Session, account_id: uuid.UUID, idempotency_key: str) -> Build | None:
    return session.execute(select(Build).where(
        Build.account_id == account_id, Build.idempotency_key == idempotency_key)).scalar_one_or_none()


def check_retry(existing: Build, request_fingerprint: str) -> Build:
    """`existing` when the request under its Idempotency-Key is this one; IdempotencyKeyReused otherwise."""
    if existing.request_fingerprint != request_fingerprint:
        raise IdempotencyKeyReused("this Idempotency-Key was used for a different request",
                                   details={"build_id": str(existing.id)})
    return existing


def quota_exceeded(quota: int, unfinished: int) -> QuotaExceeded:
    return QuotaExceeded(f"the account has {unfinished} unfinished conversions (quota {quota}); "
                         "wait for some to end or cancel them",
                         details={"limit": quota, "unfinished": unfinished, "retry_after": 30})


# --- worker side ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    build_id: uuid.UUID
    fence: uuid.UUID
    attempt: int


def claim(session: Session, build_id: uuid.UUID, *, lease_seconds: int) -> Claim | None:
    """QUEUED -> PULLING under a fresh lease token; None when the build is not claimable."""
    fence = uuid.uuid4()
    ok = transition_conversion(
        session, build_id, ConversionState.QUEUED, ConversionState.PULLING, actor=worker_actor(fence),
        values={"lease_owner": fence, "lease_expires_at": func.now() + timedelta(seconds=lease_seconds),
                "attempts": Build.attempts + 1, "started_at": func.coalesce(Build.started_at, func.now()),
                "claimed_at": func.now(), "not_before": None,
                "progress": 0.0, "error_code": None, "error_message": None},
        where=(Build.cancel_requested.is_(False), Build.waits_for.is_(None)))
    if not ok:
        return None
    attempt = session.execute(select(Build.attempts).where(Build.id == build_id)).scalar_one()
    return Claim(build_id=build_id, fence=fence, attempt=attempt)


def _claimable(max_attempts: int) -> ColumnElement[bool]:
    """A QUEUED build a worker may start now: not cancelled, attempts left, past its retry backoff, not waiting
    for an identical build (common/store/followers.py)."""
    return and_(Build.conversion_state == ConversionState.QUEUED.value, Build.cancel_requested.is_(False),
                Build.attempts < max_attempts, or_(Build.not_before.is_(None), Build.not_before <= func.now()),
                Build.waits_for.is_(None))


def fair_accounts(session: Session, *, max_attempts: int, limit: int = 32) -> list[uuid.UUID]:
    """Accounts with claimable work, fairest first.

    Fewest conversions running first (several workers share out among accounts), then the account
    served least recently (never served first): with one worker this is round robin, so one account's
    backlog delays another account's submission by at most one conversion.
    """
    waiting = select(Build.account_id).where(_claimable(max_attempts)).group_by(Build.account_id).subquery()
    other = aliased(Build)
    running = (select(func.count()).select_from(other)
               .where(other.account_id == waiting.c.account_id,
                      other.conversion_state.in_([st.value for st in RUNNING]))
               .correlate(waiting).scalar_subquery())
    served = (select(func.max(other.claimed_at)).where(other.account_id == waiting.c.account_id)
              .correlate(waiting).scalar_subquery())
    return list(session.execute(select(waiting.c.account_id)
                                .order_by(running, served.asc().nulls_first(), waiting.c.account_id)
                                .limit(limit)).scalars())


def claim_next(session: Session, *, lease_seconds: int, max_attempts: int) -> Claim | None:
    """Claim the fairest claimable QUEUED build (see `fair_accounts`), oldest submission first in an account.

    A broker message is only a token saying there is queued work: whichever build this claims, every
    QUEUED build keeps at least one token (its own, or the sweeper's re-send), so each is still claimed,
    and exactly once (SKIP LOCKED, then the CAS). None when nothing is claimable now.
    """
    for account_id in fair_accounts(session, max_attempts=max_attempts):
        build_id = session.execute(
            select(Build.id).where(_claimable(max_attempts), Build.account_id == account_id)
            .order_by(Build.created_at, Build.id).limit(1).with_for_update(skip_locked=True)).scalar_one_or_none()
        if build_id is None:
            continue  # another worker holds that account's next build for the moment
        found = claim(session, build_id, lease_seconds=lease_seconds)
        if found is not None:
            return found
    return None


def heartbeat(session: Session, build_id: uuid.UUID, fence: uuid.UUID, lease_seconds: int,
              progress: float | None = None) -> tuple[bool, bool]:
    """Extend the lease (and record progress). Returns (still ours, cancel requested)."""
    values: dict[str, object] = {"lease_expires_at": func.now() + timedelta(seconds=lease_seconds)}
    if progress is not None:
        values["progress"] = progress
        values["updated_at"] = func.now()
    row = session.execute(
        update(Build).where(Build.id == build_id, Build.lease_owner == fence,
                            Build.conversion_state.in_([s.value for s in RUNNING]))
        .values(**values).returning(Build.cancel_requested)
        .execution_options(synchronize_session=False)).one_or_none()
    if row is None:
        return False, False
    return True, bool(row[0])


@dataclass(frozen=True)
class Outcome:
    """What a successful conversion recorded (mirrors the engine's result without importing it)."""

    input_digest: str
    output_digest: str
    output_size: int
    eif_size: int
    eif_sha256: str
    pcr0: str
    pcr1: str
    pcr2: str
    pcr8: str | None
    exposed_ports: tuple[tuple[int, str], ...]
    warnings: tuple[str, ...]
    docker_version: str | None
    mem_size: int | None = None  # the enclave memory used (MiB); None keeps the requested value
    boot_check: Mapping[str, object] | None = None
    # The earlier conversion whose EIF and layer were reused (a build id, an output reference, or a cache
    # entry when another account made it); None when converted afresh.
    reused_from: str | None = None
    network: Mapping[str, object] | None = None


def succeed(session: Session, build_id: uuid.UUID, fence: uuid.UUID, outcome: Outcome) -> uuid.UUID | None:
    """PUSHING -> SUCCEEDED with the results, and open the BUILD_WHITELIST task. Returns the task id.

    None when the lease was lost (another worker owns the build now; it will record its own result).
    """
    values = {
        "input_digest": outcome.input_digest, "output_digest": outcome.output_digest,
        "output_size": outcome.output_size, "eif_size": outcome.eif_size, "eif_sha256": outcome.eif_sha256,
        "pcr0": outcome.pcr0, "pcr1": outcome.pcr1, "pcr2": outcome.pcr2, "pcr8": outcome.pcr8,
        "exposed_ports": [list(p) for p in outcome.exposed_ports], "warnings": list(outcome.warnings),
        "docker_version": outcome.docker_version, "progress": 1.0, "finished_at": func.now(),
        "lease_owner": None, "lease_expires_at": None,
        "boot_check": dict(outcome.boot_check) if outcome.boot_check is not None else None,
        "reused_from": outcome.reused_from,
        "network": dict(outcome.network) if outcome.network is not None else None,
    }
    if outcome.mem_size is not None:
        values["mem_size"] = outcome.mem_size
    if not transition_conversion(session, build_id, ConversionState.PUSHING, ConversionState.SUCCEEDED,
                                 actor=worker_actor(fence), fence=fence, values=values):
        return None
    build = session.execute(select(Build.account_id, Build.created_by).where(Build.id == build_id)).one()
    task_id = uuid.uuid4()
    session.execute(insert(Task).values(
        id=task_id, account_id=build.account_id, build_id=build_id, type="BUILD_WHITELIST",
        status=TaskStatus.INPROGRESS.value, requester_id=build.created_by, approved_by_system=False))
    session.execute(update(Build).where(Build.id == build_id).values(pending_task_id=task_id)
                    .execution_options(synchronize_session=False))
    _event(session, build_id, "task", "", TaskStatus.INPROGRESS.value, SYSTEM, "conversion succeeded")
    return task_id


def end_unsuccessfully(
    session: Session, build_id: uuid.UUID, src: ConversionState, dst: ConversionState, *, actor: str,
    code: str, message: str, fence: uuid.UUID | None = None, values: Mapping[str, object] | None = None,
) -> bool:
    """FAILED or CANCELLED with the error, and the build REJECTED with the reason, in one transaction.

    `values` are further columns recorded with the end (a failed boot check's result).
    """
    reason = f"{code}: {message}"
    ok = transition_conversion(
        session, build_id, src, dst, actor=actor, reason=reason, fence=fence,
        values={**dict(values or {}), "error_code": code, "error_message": message, "finished_at": func.now(),
                "lease_owner": None, "lease_expires_at": None})
    if ok:
        transition_approval(session, build_id, ApprovalStatus.PENDING, ApprovalStatus.REJECTED,
                            actor=actor, reason=reason)
    return ok


def requeue(session: Session, build_id: uuid.UUID, src: ConversionState, *, actor: str, reason: str,
            fence: uuid.UUID | None = None, backoff_seconds: float | None = None) -> bool:
    """A running conversion back to QUEUED: its lease expired (fence None) or its worker gives it back.

    `backoff_seconds` holds it back from every worker's claim that long (a retry after a transient error).
    """
    where: list[ColumnElement[bool]] = []
    if fence is None:
        where.append(Build.lease_expires_at < func.now())
    not_before = func.now() + timedelta(seconds=backoff_seconds) if backoff_seconds else None
    return transition_conversion(
        session, build_id, src, ConversionState.QUEUED, actor=actor, reason=reason, fence=fence,
        values={"lease_owner": None, "lease_expires_at": None, "enqueued_at": func.now(), "progress": 0.0,
                "not_before": not_before},
        where=where)


# --- approval -------------------------------------------------------------------------------------
def decide_task(session: Session, task: Task, decision: TaskStatus, *, approver_id: uuid.UUID | None,
                reason: str | None = None) -> None:
    """APPROVED -> task SUCCESS and build WHITELISTED; DENIED -> task DENIED and build REJECTED.

    Raises Conflict when the task is already decided or its build has not converted; the caller's
    transaction then rolls back both writes.
    """
    actor = SYSTEM if approver_id is None else user_actor(approver_id)
    if decision not in TASK_TRANSITIONS[TaskStatus.INPROGRESS]:
        raise InvalidTransition(f"a task cannot be set to {decision.value}")
    current = TaskStatus(task.status)
    if not allowed(TASK_TRANSITIONS, current, decision):
        raise InvalidTransition(f"task is already {current.value}")
    converted: list[ColumnElement[bool]] = []
    target = ApprovalStatus.REJECTED
    if decision is TaskStatus.SUCCESS:
        target = ApprovalStatus.WHITELISTED
        converted.append(Build.conversion_state == ConversionState.SUCCEEDED.value)
    if not transition_task(session, task, current, decision, actor=actor, approver_id=approver_id, reason=reason):
        raise InvalidTransition("task was decided concurrently")
    if not transition_approval(session, task.build_id, ApprovalStatus.PENDING, target, actor=actor,
                               reason=reason, where=converted):
        raise Conflict("the build has not converted or was already decided",
                       details={"build_id": str(task.build_id)})
    session.execute(update(Build).where(Build.id == task.build_id).values(pending_task_id=None)
                    .execution_options(synchronize_session=False))


def auto_approve_if_enabled(session: Session, build_id: uuid.UUID, task_id: uuid.UUID) -> bool:
    """Approve as SYSTEM when the build's app has `auto_approve`. True when it did."""
    enabled = session.execute(
        select(App.auto_approve).join(Build, Build.app_id == App.id).where(Build.id == build_id)).scalar_one()
    if not enabled:
        return False
    task = session.get(Task, task_id)
    if task is None:
        raise NotFound("task vanished")
    decide_task(session, task, TaskStatus.SUCCESS, approver_id=None, reason="auto_approve")
    return True
