"""`/v1/apps`: the applications builds belong to, with default build settings and auto-approve."""
from __future__ import annotations

import uuid

from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import principal
from api.context import db
from api.presenters import app_view, page_metadata
from api.schemas.apps import (
    AppCreateSchema,
    AppListQuerySchema,
    AppListSchema,
    AppSchema,
    AppUpdateSchema,
    LabelsCountSchema,
)
from api.services import apps
from common.store.accounts import Role

blp = Blueprint("apps", __name__, url_prefix="/v1/apps", description="Applications")


@blp.route("")
class AppList(MethodView):
    @blp.arguments(AppCreateSchema)
    @blp.response(200, AppSchema)
    def post(self, body: dict[str, object]) -> dict[str, object]:
        """Create an app (WRITER)."""
        return app_view(apps.create(db(), principal().require(Role.WRITER), body))

    @blp.arguments(AppListQuerySchema, location="query")
    @blp.response(200, AppListSchema)
    def get(self, query: dict[str, object]) -> dict[str, object]:
        """Apps of the caller's account."""
        items, total, filtered = apps.list_apps(db(), principal().require(Role.READER), query)
        return {"metadata": page_metadata(int(query["limit"]), int(query["offset"]), total, filtered),  # type: ignore[call-overload]
                "items": [app_view(a) for a in items]}


@blp.route("/unique_labels/count")
class LabelCounts(MethodView):
    @blp.response(200, LabelsCountSchema)
    def get(self) -> dict[str, object]:
        """How many apps of the account carry each label key and value (CCM's LabelsCount)."""
        return {"items": apps.label_counts(db(), principal().require(Role.READER))}


@blp.route("/<uuid:app_id>")
class App(MethodView):
    @blp.response(200, AppSchema)
    def get(self, app_id: uuid.UUID) -> dict[str, object]:
        """One app."""
        return app_view(apps.get(db(), principal().require(Role.READER), app_id))

    @blp.arguments(AppUpdateSchema)
    @blp.response(200, AppSchema)
    def patch(self, body: dict[str, object], app_id: uuid.UUID) -> dict[str, object]:
        """Change an app (WRITER)."""
        return app_view(apps.update(db(), principal().require(Role.WRITER), app_id, body))

    @blp.response(204)
    def delete(self, app_id: uuid.UUID) -> None:
        """Delete an app and its builds (WRITER)."""
        apps.delete(db(), principal().require(Role.WRITER), app_id)
