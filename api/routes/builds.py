"""`/v1/builds`: submit a conversion (CCM's convert-app endpoint), read, list, cancel."""
from __future__ import annotations

import functools
import re
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Response, jsonify, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from sqlalchemy import Row

from api.auth import principal
from api.context import db, settings
from api.presenters import build_view, page_metadata
from api.schemas.builds import (
    BuildListQuerySchema,
    BuildListSchema,
    BuildSchema,
    ConversionRequestSchema,
    ConversionSubmitQuerySchema,
)
from api.services import builds
from common.accounts import Role
from common.errors import ValidationFailed
from common.sealing import Sealer

# The Build routes answer with build_view's JSON as it is: it already is BuildSchema's dump (a test holds them
# equal), and a dump per Build cost more than the rest of a GET. The schemas still document the responses.
blp = Blueprint("builds", __name__, url_prefix="/v1/builds", description="Builds (converted images)")
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+)")
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@functools.cache
def sealer(secret: bytes) -> Sealer:
    return Sealer.from_secrets(secret)


def _view(row: Row[Any]) -> dict[str, object]:
    return build_view(row, row.app_name, row.app_description)


def _wait_seconds(query: Mapping[str, object]) -> int:
    wait = query.get("wait")
    if wait is None:
        match = _PREFER_WAIT.search(request.headers.get("Prefer", ""))
        wait = int(match.group(1)) if match else 0
    return min(int(wait), settings().max_wait_seconds)  # type: ignore[call-overload]


def _idempotency_key() -> str | None:
    key = request.headers.get("Idempotency-Key")
    if key is None:
        return None
    if not _IDEMPOTENCY_KEY.fullmatch(key):
        raise ValidationFailed("The request is invalid.", details={
            "fields": {"Idempotency-Key": ["1 to 255 printable ASCII characters"]}})
    return key


@blp.route("/convert-app/nitro-enclaves")
class Convert(MethodView):
    # Instances, not classes: webargs would build a schema (and its nested ones) on every request.
    @blp.arguments(ConversionSubmitQuerySchema(), location="query", as_kwargs=True)
    @blp.arguments(ConversionRequestSchema())
    @blp.response(202, BuildSchema, headers={"Location": {"schema": {"type": "string"}}})
    @blp.alt_response(200, schema=BuildSchema, description="the finished Build, with ?wait / Prefer: wait")
    def post(self, body: dict[str, object], **query: object) -> tuple[Response, int, dict[str, str]]:
        """Convert a docker image into a Nitro Enclaves image (the seed's wrapped form or flat)."""
        me = principal()
        account = me.require(Role.WRITER)
        s = settings()
        submitted = builds.submit(db(), s, sealer(s.secret_key), account_id=account,
                                  user_id=me.user_id, body=body, idempotency_key=_idempotency_key())
        wait = _wait_seconds(query)
        if wait and builds.wait_for_end(db(), account, submitted.build_id, wait):
            status, view = 200, _view(builds.get(db(), account, submitted.build_id))
        else:
            status, view = 202, build_view(submitted.build, submitted.app.name, submitted.app.description)
        return jsonify(view), status, {
            "Location": url_for("builds.Build", build_id=submitted.build_id)}


@blp.route("")
class BuildList(MethodView):
    @blp.arguments(BuildListQuerySchema(), location="query")
    @blp.response(200, BuildListSchema)
    def get(self, query: dict[str, object]) -> Response:
        """Builds of the caller's account, CCM's pagination envelope."""
        account = principal().require(Role.READER)
        rows, total, filtered = builds.list_builds(db(), account, query)
        return jsonify({"metadata": page_metadata(int(query["limit"]), int(query["offset"]), total, filtered),  # type: ignore[call-overload]
                        "items": [_view(row) for row in rows]})


@blp.route("/<uuid:build_id>")
class Build(MethodView):
    @blp.response(200, BuildSchema)
    def get(self, build_id: uuid.UUID) -> Response:
        """One build."""
        account = principal().require(Role.READER)
        return jsonify(_view(builds.get(db(), account, build_id)))

    @blp.response(202, BuildSchema, description="cancel requested; the worker stops between steps")
    @blp.alt_response(200, schema=BuildSchema, description="cancelled")
    def delete(self, build_id: uuid.UUID) -> tuple[Response, int]:
        """Cancel the build's conversion."""
        me = principal()
        account = me.require(Role.WRITER)
        done = builds.cancel(db(), account, build_id, me.user_id)
        return jsonify(_view(builds.get(db(), account, build_id))), 200 if done else 202
