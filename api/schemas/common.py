"""Schemas shared by every resource: the error envelope and the CCM pagination envelope."""
from __future__ import annotations

from marshmallow import Schema, fields, validate

# Offsets reach Postgres as a BIGINT-bounded OFFSET; past this an offset is only an overflow (a 500).
MAX_OFFSET = 2**31 - 1


class ErrorBodySchema(Schema):
    code = fields.String(required=True, metadata={"description": "stable lower_snake error code"})
    message = fields.String(required=True)
    details = fields.Dict(required=True, keys=fields.String(), values=fields.Raw())
    request_id = fields.String(required=True, allow_none=True)


class ErrorSchema(Schema):
    """Every non-2xx response."""

    error = fields.Nested(ErrorBodySchema, required=True)


class PageMetadataSchema(Schema):
    page = fields.Integer(required=True)
    pages = fields.Integer(required=True)
    limit = fields.Integer(required=True)
    total_count = fields.Integer(required=True)
    filtered_count = fields.Integer(required=True)


class PageQuerySchema(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET))
    sort_by = fields.String(load_default=None, metadata={"description": "`key:ASC` or `key:DESC`"})


class StatusSchema(Schema):
    status = fields.String(required=True)
    status_updated_at = fields.Integer(required=True)
