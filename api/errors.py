"""The error envelope and the only mapping from error classes to HTTP status codes."""
from __future__ import annotations

import logging
from collections.abc import Mapping

from flask import Flask, Response, g, jsonify
from flask_smorest import Api
from marshmallow import ValidationError
from sqlalchemy.exc import DBAPIError
from werkzeug.exceptions import HTTPException

from api.schemas.common import ErrorSchema
from common.errors import (
    Conflict,
    Forbidden,
    HostNotAllowed,
    InvalidReference,
    NitroconvError,
    NotFound,
    ServiceUnavailable,
    TooManyRequests,
    Unauthenticated,
    ValidationFailed,
)
from common.store.engine import is_connection_error

log = logging.getLogger(__name__)

_STATUS: dict[type[NitroconvError], int] = {
    ValidationFailed: 422,
    InvalidReference: 422,
    Unauthenticated: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    ServiceUnavailable: 503,
    HostNotAllowed: 422,  # at submit time: the request names a registry the service will never contact
    TooManyRequests: 429,
}


def http_status(exc: NitroconvError) -> int:
    return next((_STATUS[c] for c in type(exc).__mro__ if c in _STATUS), 500)


def envelope(code: str, message: str, status: int, details: Mapping[str, object] | None = None,
             headers: Mapping[str, str] | None = None) -> Response:
    resp = jsonify({"error": {"code": code, "message": message, "details": dict(details or {}),
                              "request_id": g.get("request_id")}})
    resp.status_code = status
    for key, value in (headers or {}).items():
        resp.headers[key] = value
    return resp


class EnvelopeApi(Api):
    """flask-smorest's Api with its HTTP error payload replaced by our envelope (and documented so)."""

    ERROR_SCHEMA = ErrorSchema

    def handle_http_exception(self, error: HTTPException) -> Response:
        data = getattr(error, "data", None) or {}
        status = error.code or 500
        if status == 422 and "messages" in data:
            # webargs nests errors by location (json/query/headers); clients want the fields.
            messages = data["messages"]
            fields_ = messages.get("json", messages.get("query", messages)) if isinstance(messages, dict) \
                else messages
            return envelope("validation_failed", "The request is invalid.", 422, {"fields": fields_})
        code = (error.name or "error").lower().replace(" ", "_")
        headers = data.get("headers") or {}
        if status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="nitroconv"', **headers}
        return envelope(code, str(data.get("message") or error.description or error.name), status,
                        headers=headers)


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(NitroconvError)
    def _domain(exc: NitroconvError) -> Response:
        status = http_status(exc)
        if status >= 500:
            log.warning("dependency error request_id=%s code=%s", g.get("request_id"), exc.code)
        headers = {"Retry-After": "5"} if status == 503 else None
        if status == 401:
            headers = {"WWW-Authenticate": 'Bearer realm="nitroconv"'}
        if status == 429:
            headers = {"Retry-After": str(exc.details.get("retry_after", 60))}
        return envelope(exc.code, exc.message, status, exc.details, headers)

    @app.errorhandler(ValidationError)
    def _invalid(exc: ValidationError) -> Response:
        return envelope("validation_failed", "The request is invalid.", 422, {"fields": exc.messages})

    @app.errorhandler(DBAPIError)
    def _database(exc: DBAPIError) -> Response:
        if is_connection_error(exc):
            log.warning("database unavailable request_id=%s", g.get("request_id"))
            return envelope("database_unavailable", "The database is unavailable; retry shortly.", 503,
                            headers={"Retry-After": "5"})
        log.exception("database error request_id=%s", g.get("request_id"))
        return envelope("internal_error", "Internal error.", 500)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if isinstance(exc, HTTPException):
            return app.extensions["nitroconv.api"].handle_http_exception(exc)
        log.exception("unhandled request_id=%s", g.get("request_id"))
        return envelope("internal_error", "Internal error.", 500)  # never str(exc)
