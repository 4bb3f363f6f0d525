"""`/v1/builds`: submit a conversion (CCM's convert-app endpoint), read, list, cancel."""
from __future__ import annotations

import functools
import json
import re
import uuid
from collections.abc import Mapping
from typing import Any

from flask import Response, jsonify, request, url_for
from flask.views import MethodView
from flask_smorest import Blueprint
from marshmallow import ValidationError
from sqlalchemy import Row

from api.auth import caller, principal
from api.context import db, settings
from api.presenters import build_view, page_metadata
from api.schemas.builds import (
    BuildListQuerySchema,
    BuildListSchema,
    BuildSchema,
    BuildUpdateSchema,
    ConversionRequestSchema,
    ConversionSubmitQuerySchema,
)
from api.services import builds
from common.errors import ValidationFailed
from common.store.accounts import Role
from common.store.sealing import Sealer

# The Build routes answer with build_view's JSON as it is: it already is BuildSchema's dump (a test holds them
# equal), and a dump per Build cost more than the rest of a GET. The schemas still document the responses.
blp = Blueprint("builds", __name__, url_prefix="/v1/builds", description="Builds (converted images)")
_PREFER_WAIT = re.compile(r"(?:^|[,;\s])wait=(\d+)")
_PREFER_ASYNC = re.compile(r"(?:^|[,;\s])respond-async(?:$|[,;\s])", re.IGNORECASE)
_IDEMPOTENCY_KEY = re.compile(r"[\x21-\x7e]{1,255}")


@functools.cache
def sealer(secret: bytes) -> Sealer:
    return Sealer.from_secrets(secret)


def _view(row: Row[Any]) -> dict[str, object]:
    return build_view(row, row.app_name, row.app_description, row.app_group_id)


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


_REQUEST = ConversionRequestSchema()
_NO_QUERY = ConversionSubmitQuerySchema().load({})


def _plain_body() -> dict[str, object] | None:
    """The loaded body of a submission webargs would take as it is: no query string, an `application/json` body
    of an object that loads. None for anything else, which then goes through webargs and its errors."""
    if request.query_string or request.mimetype != "application/json":
        return None
    try:
        data = json.loads(request.get_data(cache=True))
        return _REQUEST.load(data) if isinstance(data, dict) else None
    except (ValueError, RecursionError, ValidationError):  # bad JSON or UTF-8, an invalid request: webargs answers
        return None


def _submit(body: dict[str, object], query: Mapping[str, object]) -> Response:
    me = caller()
    s = settings()
    account_hint = me.account_id if me.account_id is not None else principal().require(Role.WRITER)
    try:
        key = _idempotency_key()
        draft = builds.draft(s, sealer(s.secret_key), body)
    except Exception:
        principal().require(Role.WRITER)  # a caller without the role hears that first, as on every route
        raise
    # The role is checked by the submission's own statement, read from the database as on every request.
    submitted = builds.submit(db, s, draft, account_id=account_hint, user_id=me.user_id, body=body,
                              idempotency_key=key, session_id=me.session_id)
    account = submitted.account_id
    wait = _wait_seconds(query)
    if wait and builds.wait_for_end(db(), account, submitted.build_id, wait):
        status, view = 200, _view(builds.get(db(), account, submitted.build_id))
    else:
        # CCM documents 200 for the accepted conversion; `Prefer: respond-async` (RFC 7240) asks for 202.
        status = 202 if _PREFER_ASYNC.search(request.headers.get("Prefer", "")) else 200
        view = build_view(submitted.build, submitted.app_name, submitted.app_description, submitted.app_group_id)
    response = jsonify(view)
    response.status_code = status
    response.headers["Location"] = url_for("builds.Build", build_id=submitted.build_id)
    return response


# Instances, not classes: webargs would build a schema (and its nested ones) on every request.
@blp.arguments(ConversionSubmitQuerySchema(), location="query", as_kwargs=True)
@blp.arguments(ConversionRequestSchema())
@blp.response(200, BuildSchema, headers={"Location": {"schema": {"type": "string"}}},
              description="the Build (PENDING, conversion QUEUED; finished with ?wait / Prefer: wait)")
@blp.alt_response(202, schema=BuildSchema, description="the Build, with `Prefer: respond-async`",
                  headers={"Location": {"schema": {"type": "string"}}})
def _documented_post(_: MethodView, body: dict[str, object], **query: object) -> Response:
    return _submit(body, query)


@blp.route("/convert-app/nitro-enclaves")
class Convert(MethodView):
    def post(self) -> Response:
        """Convert a docker image into a Nitro Enclaves image (the seed's wrapped form or flat)."""
        # A plain submission skips the webargs and flask-smorest wrappers (a tenth of the API's CPU per
        # submission); they still parse, answer the errors of and document everything else.
        body = _plain_body()
        return _submit(body, _NO_QUERY) if body is not None else _documented_post(self)

    post._apidoc = _documented_post._apidoc  # type: ignore[attr-defined]  # what flask-smorest documents


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

    @blp.arguments(BuildUpdateSchema())
    @blp.response(200, BuildSchema)
    def patch(self, body: dict[str, object], build_id: uuid.UUID) -> Response:
        """CCM's update of a build: attach application configs by id (an object), or detach them (null)."""
        account = principal().require(Role.WRITER)
        builds.update_configs(db(), account, build_id, body["configs"])  # type: ignore[arg-type]
        return jsonify(_view(builds.get(db(), account, build_id)))

    @blp.response(204)
    def delete(self, build_id: uuid.UUID) -> None:
        """Delete the build (CCM); a conversion still running is cancelled first."""
        me = principal()
        builds.delete(settings(), db(), me.require(Role.WRITER), build_id, me.user_id)


@blp.route("/<uuid:build_id>/cancel")
class BuildCancel(MethodView):
    @blp.response(202, BuildSchema, description="cancel requested; the worker stops between steps")
    @blp.alt_response(200, schema=BuildSchema, description="cancelled")
    def post(self, build_id: uuid.UUID) -> tuple[Response, int]:
        """Cancel the build's conversion and keep the Build (ours; CCM's DELETE removes it)."""
        me = principal()
        account = me.require(Role.WRITER)
        done = builds.cancel(settings(), db(), account, build_id, me.user_id)
        return jsonify(_view(builds.get(db(), account, build_id))), 200 if done else 202
