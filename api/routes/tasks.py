"""`/v1/tasks`: BUILD_WHITELIST approval tasks; a MANAGER approves or denies."""
from __future__ import annotations

import uuid

from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import principal
from api.context import db
from api.presenters import page_metadata, task_view
from api.schemas.tasks import TaskDecisionSchema, TaskListQuerySchema, TaskListSchema, TaskSchema
from api.services import tasks
from common.store.accounts import Role

blp = Blueprint("tasks", __name__, url_prefix="/v1/tasks", description="Approval tasks")


@blp.route("")
class TaskList(MethodView):
    @blp.arguments(TaskListQuerySchema, location="query")
    @blp.response(200, TaskListSchema)
    def get(self, query: dict[str, object]) -> dict[str, object]:
        """Tasks of the caller's account, newest first."""
        rows, total, filtered = tasks.list_tasks(db(), principal().require(Role.READER), query)
        return {"metadata": page_metadata(int(query["limit"]), int(query["offset"]), total, filtered),  # type: ignore[call-overload]
                "items": [task_view(*row) for row in rows]}


@blp.route("/<uuid:task_id>")
class Task(MethodView):
    @blp.response(200, TaskSchema)
    def get(self, task_id: uuid.UUID) -> dict[str, object]:
        """One task."""
        return task_view(*tasks.get(db(), principal().require(Role.READER), task_id))

    @blp.arguments(TaskDecisionSchema)
    @blp.response(200, TaskSchema)
    def patch(self, body: dict[str, object], task_id: uuid.UUID) -> dict[str, object]:
        """APPROVED whitelists the build, DENIED rejects it (MANAGER)."""
        me = principal()
        return task_view(*tasks.decide(db(), me.require(Role.MANAGER), task_id, me.user_id, body))

    @blp.response(204)
    def delete(self, task_id: uuid.UUID) -> None:
        """Delete a decided task (WRITER); one awaiting a decision is a 409 `task_in_progress`."""
        tasks.delete_task(db(), principal().require(Role.WRITER), task_id)


@blp.route("/status/<uuid:task_id>")
class TaskStatusView(MethodView):
    @blp.response(200, TaskSchema, description="the Task, which is also CCM's TaskResult (task_id, task_type, "
                  "task_status, build_id)")
    def get(self, task_id: uuid.UUID) -> dict[str, object]:
        """CCM's task status."""
        return task_view(*tasks.get(db(), principal().require(Role.READER), task_id))
