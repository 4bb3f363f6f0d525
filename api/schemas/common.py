"""Schemas shared by every resource: the error envelope and the CCM pagination envelope."""
from __future__ import annotations

import json
import uuid
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate

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


def group_ids(value: str) -> list[uuid.UUID]:
    """CCM's `filter` of apps and builds ("currently supports list of groups"), in the JSON syntax CCM documents for
    its other filters: `{"groups": ["<group id>", ...]}`."""
    try:
        parsed = json.loads(value)
        groups = parsed["groups"]
        if not isinstance(parsed, dict) or set(parsed) != {"groups"} or not isinstance(groups, list) \
                or len(groups) > 100:
            raise ValueError
        return [uuid.UUID(str(group)) for group in groups]
    except (ValueError, TypeError, KeyError):
        raise ValidationError('{"groups": ["<group id>", ...]} (at most 100 ids)') from None


def group_filter(**kwargs: Any) -> fields.String:
    return fields.String(validate=group_ids, metadata={
        "description": 'CCM\'s group filter: {"groups": ["<group id>", ...]}'}, **kwargs)
