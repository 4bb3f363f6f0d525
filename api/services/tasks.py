"""Task use cases: list, read, and approve or deny a BUILD_WHITELIST task."""
from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import func, select
from sqlalchemy.orm import Session, aliased

from common.buildstore import decide_task
from common.errors import NotFound
from common.models import Build, Task, User
from common.status import TaskStatus

TaskRow = tuple[Task, Build, str | None, str | None]

_Requester = aliased(User)
_Approver = aliased(User)


def _query() -> object:
    return (select(Task, Build, _Requester.email, _Approver.email)
            .join(Build, Build.id == Task.build_id)
            .outerjoin(_Requester, _Requester.id == Task.requester_id)
            .outerjoin(_Approver, _Approver.id == Task.approver_id))


def get(session: Session, account_id: uuid.UUID, task_id: uuid.UUID) -> TaskRow:
    row = session.execute(_query().where(Task.id == task_id, Task.account_id == account_id)  # type: ignore[attr-defined]
                          ).one_or_none()
    if row is None:
        raise NotFound("no such task")
    return row[0], row[1], row[2], row[3]


def list_tasks(session: Session, account_id: uuid.UUID, q: Mapping[str, object]) -> tuple[list[TaskRow], int, int]:
    filters = [Task.account_id == account_id]
    total = session.execute(select(func.count()).select_from(Task).where(*filters)).scalar_one()
    if q.get("status"):
        filters.append(Task.status == q["status"])
    if q.get("build_id"):
        filters.append(Task.build_id == q["build_id"])
    filtered = session.execute(select(func.count()).select_from(Task).where(*filters)).scalar_one()
    rows = session.execute(_query().where(*filters).order_by(Task.created_at.desc(), Task.id)  # type: ignore[attr-defined]
                           .limit(int(q["limit"])).offset(int(q["offset"]))).all()  # type: ignore[call-overload]
    return [(r[0], r[1], r[2], r[3]) for r in rows], total, filtered


def decide(session: Session, account_id: uuid.UUID, task_id: uuid.UUID, user_id: uuid.UUID,
           body: Mapping[str, object]) -> TaskRow:
    """APPROVED or DENIED by a MANAGER; a Conflict rolls both the task and the build back."""
    task, _, _, _ = get(session, account_id, task_id)
    decision = TaskStatus.SUCCESS if body["status"] == "APPROVED" else TaskStatus.DENIED
    reason = body.get("denial_reason") if decision is TaskStatus.DENIED else None
    try:
        decide_task(session, task, decision, approver_id=user_id,
                    reason=str(reason) if reason else ("denied" if decision is TaskStatus.DENIED else None))
        session.commit()
    except BaseException:
        session.rollback()
        raise
    session.expire_all()
    return get(session, account_id, task_id)
