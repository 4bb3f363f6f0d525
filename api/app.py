"""The Flask app factory: settings, error envelope, request ids, blueprints, OpenAPI and Swagger UI."""
from __future__ import annotations

import contextlib
import functools
import logging
import re
import time
import uuid

from flask import Flask, Response, g, request, send_from_directory
from prometheus_client import Counter, Histogram

from api import prepared
from api.context import close_db
from api.errors import EnvelopeApi, envelope, register_error_handlers
from api.routes import accounts, apps, attestation, builds, health, sys, tasks, unsupported
from api.services.builds import GET_STATEMENT
from api.sessions import SESSION_STATEMENT
from common import logs
from common.settings import Settings, get_settings
from common.store.engine import engine_for

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
REQUESTS = Counter("nitroconv_api_requests_total", "API requests", ["method", "endpoint", "status"])
LATENCY = Histogram("nitroconv_api_request_seconds", "API request latency", ["method", "endpoint"])
# Each label set's child, looked up once rather than by `labels()` on every request (its locking and key checks
# cost more than the count). The sets are few (route templates, methods, status codes).
_requests = functools.cache(REQUESTS.labels)
_latency = functools.cache(LATENCY.labels)
_access = logging.getLogger("nitroconv.access")
SWAGGER_UI_STATIC = "/v1/docs/static"
# The caller's session and a poll of one build, run by most requests: prepared once per connection
# (api/prepared.py; a submission's own statement is api/submission.py's).
_HOT_STATEMENTS = (SESSION_STATEMENT, GET_STATEMENT)


def _nul_in(value: object, path: str) -> str | None:
    """The path of the first string (key or value) holding a NUL character, else None."""
    if isinstance(value, str):
        return path if "\x00" in value else None
    if isinstance(value, dict):
        for key, item in value.items():
            found = _nul_in(key, path) or _nul_in(item, f"{path}.{key}")
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = _nul_in(item, f"{path}[{index}]")
            if found:
                return found
    return None


def _document_both_conversion_forms(api: EnvelopeApi) -> None:
    """The submission takes CCM's wrapped NitroEnclavesConversionRequest and the flat form; flask-smorest
    documents the schema that loads them (the flat one), so the document gets both, as `oneOf`."""
    from api.schemas.builds import WrappedConversionRequestSchema

    api.spec.components.schema("NitroEnclavesConversionRequest", schema=WrappedConversionRequestSchema)
    body = api.spec._paths["/v1/builds/convert-app/nitro-enclaves"]["post"]["requestBody"]  # noqa: SLF001
    flat = body["content"]["application/json"]["schema"]
    body["content"]["application/json"]["schema"] = {"oneOf": [
        {"$ref": "#/components/schemas/NitroEnclavesConversionRequest"}, flat]}


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API; tests pass their own Settings, gunicorn uses the environment's."""
    app = Flask("nitroconv")
    app.extensions["nitroconv.settings"] = (settings or get_settings()).with_secret()
    app.config.update(
        MAX_CONTENT_LENGTH=app.extensions["nitroconv.settings"].max_request_bytes,  # refused before parsing
        JSON_SORT_KEYS=False,
        API_TITLE="nitroconv",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        # Served from the swagger-ui-bundle package below, not a CDN: the docs work on hosts without internet.
        OPENAPI_SWAGGER_UI_URL=SWAGGER_UI_STATIC + "/",
    )
    api = EnvelopeApi(app, spec_kwargs={
        "components": {"securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "basicAuth": {"type": "http", "scheme": "basic"},
        }},
        "security": [{"bearerAuth": []}],
    })
    app.extensions["nitroconv.api"] = api
    for blp in (sys.blp, health.blp, accounts.accounts_blp, accounts.user_blp, accounts.users_blp, apps.blp,
                builds.blp, tasks.blp, attestation.blp, unsupported.blp):
        api.register_blueprint(blp)
    _document_both_conversion_forms(api)
    register_error_handlers(app)

    @app.get(SWAGGER_UI_STATIC + "/<path:filename>")
    def _swagger_ui_asset(filename: str) -> Response:
        from swagger_ui_bundle import swagger_ui_path

        return send_from_directory(swagger_ui_path, filename, max_age=86400)

    @app.before_request
    def _start() -> None:
        supplied = request.headers.get("X-Request-Id", "")
        g.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        g.started = time.perf_counter()
        g.log_context = logs.bind(request_id=g.request_id)

    @app.before_request
    def _refuse_nul() -> Response | None:
        # Postgres text cannot hold NUL: refuse it in any query or JSON string up front (a 422, not a 500).
        where = _nul_in(request.args.to_dict(flat=False), "query") if request.query_string else None
        # A NUL in a JSON string is the escape \u0000 in the raw body (a raw NUL byte is not JSON): only a
        # body holding one is worth walking.
        if (where is None and request.is_json and request.content_length
                and (b"\\u0000" in (raw := request.get_data(cache=True)) or b"\x00" in raw)):
            where = _nul_in(request.get_json(silent=True), "json")
        if where is None:
            return None
        return envelope("validation_failed", "The request is invalid.", 422,
                        {"fields": {where: ["NUL characters are not allowed"]}})

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        _requests(request.method, endpoint, str(response.status_code)).inc()
        elapsed = time.perf_counter() - g.get("started", time.perf_counter())
        _latency(request.method, endpoint).observe(elapsed)
        # The route template, never the raw path or query: the line carries ids and codes, no user data.
        _access.info("%s %s %d", request.method, endpoint, response.status_code,
                     extra={"method": request.method, "route": endpoint, "status": response.status_code,
                            "duration_ms": round(elapsed * 1000, 1)})
        return response

    @app.teardown_request
    def _unbind(_: BaseException | None) -> None:
        token = g.pop("log_context", None)
        if token is not None:
            with contextlib.suppress(ValueError):  # bound in another context (a copied one): nothing to undo
                logs.unbind(token)

    app.teardown_appcontext(close_db)
    prepared.install(engine_for(app.extensions["nitroconv.settings"].database_url), _HOT_STATEMENTS)
    return app
