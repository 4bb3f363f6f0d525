"""The Flask app factory: settings, error envelope, request ids, blueprints, OpenAPI and Swagger UI."""
from __future__ import annotations

import re
import time
import uuid

from flask import Flask, Response, g, request
from prometheus_client import Counter, Histogram

from api.context import close_db
from api.errors import EnvelopeApi, register_error_handlers
from api.routes import accounts, apps, builds, health, sys, tasks
from common.settings import Settings, get_settings

_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,128}")
REQUESTS = Counter("nitroconv_api_requests_total", "API requests", ["method", "endpoint", "status"])
LATENCY = Histogram("nitroconv_api_request_seconds", "API request latency", ["method", "endpoint"])


def create_app(settings: Settings | None = None) -> Flask:
    """Build the API; tests pass their own Settings, gunicorn uses the environment's."""
    app = Flask("nitroconv")
    app.extensions["nitroconv.settings"] = (settings or get_settings()).with_secret()
    app.config.update(
        MAX_CONTENT_LENGTH=1 << 20,  # a conversion request is a few KiB; refuse bodies before parsing
        JSON_SORT_KEYS=False,
        API_TITLE="nitroconv",
        API_VERSION="v1",
        OPENAPI_VERSION="3.0.3",
        OPENAPI_URL_PREFIX="/v1",
        OPENAPI_JSON_PATH="openapi.json",
        OPENAPI_SWAGGER_UI_PATH="/docs",
        OPENAPI_SWAGGER_UI_URL="https://cdn.jsdelivr.net/npm/swagger-ui-dist/",
    )
    api = EnvelopeApi(app, spec_kwargs={
        "components": {"securitySchemes": {
            "bearerAuth": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"},
            "basicAuth": {"type": "http", "scheme": "basic"},
        }},
        "security": [{"bearerAuth": []}],
    })
    app.extensions["nitroconv.api"] = api
    for blp in (sys.blp, health.blp, accounts.accounts_blp, accounts.users_blp, apps.blp, builds.blp, tasks.blp):
        api.register_blueprint(blp)
    register_error_handlers(app)

    @app.before_request
    def _start() -> None:
        supplied = request.headers.get("X-Request-Id", "")
        g.request_id = supplied if _REQUEST_ID.fullmatch(supplied) else uuid.uuid4().hex
        g.started = time.perf_counter()

    @app.after_request
    def _finish(response: Response) -> Response:
        response.headers["X-Request-Id"] = g.get("request_id", "")
        endpoint = request.url_rule.rule if request.url_rule else "unmatched"
        REQUESTS.labels(request.method, endpoint, str(response.status_code)).inc()
        LATENCY.labels(request.method, endpoint).observe(time.perf_counter() - g.get("started", time.perf_counter()))
        return response

    app.teardown_appcontext(close_db)
    return app
