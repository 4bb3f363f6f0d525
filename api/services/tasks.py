"""Task use cases: list, read, and approve or deny a BUILD_WHITELIST task."""
from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import delete, false, func, or_, select
from sqlalchemy.orm import Session, aliased

from common.errors import Conflict, NotFound
from common.store.builds import decide_task
from common.store.models import Build, Task, User
from common.store.status import TaskStatus

TaskRow = tuple[Task, Build, str | None, str | None]
# CCM's task filter: PENDING (awaiting a decision) and CLOSED (decided or failed), besides our exact statuses.
_STATUS_GROUPS = {"PENDING": (TaskStatus.INPROGRESS.value,),
                  "CLOSED": (TaskStatus.SUCCESS.value, TaskStatus.DENIED.value, "FAILED")}


def like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")

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
    status = q.get("status")
    if status:
        filters.append(Task.status.in_(_STATUS_GROUPS.get(str(status), (str(status),))))
    if q.get("build_id"):
        filters.append(Task.build_id == q["build_id"])
    if q.get("task_type") and q["task_type"] != "BUILD_WHITELIST":
        filters.append(false())  # the only type of task here
    if q.get("requester"):
        filters.append(Task.requester_id.in_(select(User.id).where(User.email == str(q["requester"]).lower())))
    if q.get("approver"):
        filters.append(Task.approver_id.in_(select(User.id).where(User.email == str(q["approver"]).lower())))
    if q.get("all_search"):
        needle = f"%{like_escape(str(q['all_search']))}%"
        filters.append(or_(
            Task.requester_id.in_(select(User.id).where(User.email.ilike(needle, escape="\\"))),
            Task.build_id.in_(select(Build.id).where(Build.account_id == account_id, or_(
                Build.input_image_name.ilike(needle, escape="\\"),
                Build.output_image_name.ilike(needle, escape="\\"))))))
    filtered = session.execute(select(func.count()).select_from(Task).where(*filters)).scalar_one()
    columns = {"created_at": Task.created_at, "updated_at": Task.updated_at, "status": Task.status}
    order = [columns[k].desc() if d == "DESC" else columns[k].asc()
             for k, _, d in (part.partition(":") for part in str(q.get("sort_by") or "created_at:DESC").split(","))]
    rows = session.execute(_query().where(*filters).order_by(*order, Task.id)  # type: ignore[attr-defined]
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


def delete_task(session: Session, account_id: uuid.UUID, task_id: uuid.UUID) -> None:
    """Delete a decided task (its build keeps its status); one still awaiting a decision is a 409."""
    task, _, _, _ = get(session, account_id, task_id)
    if task.status == TaskStatus.INPROGRESS.value:
        raise Conflict("the task awaits a decision: approve or deny it first", code="task_in_progress")
    session.execute(delete(Task).where(Task.id == task_id, Task.account_id == account_id)
                    .execution_options(synchronize_session=False))
    session.commit()
