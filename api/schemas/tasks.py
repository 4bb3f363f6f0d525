"""Schemas of BUILD_WHITELIST tasks and their approval or denial."""
from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import MAX_OFFSET, PageMetadataSchema, StatusSchema


class PersonSchema(Schema):
    user_id = fields.UUID(required=True, allow_none=True)
    user_name = fields.String(required=True)


class TaskSchema(Schema):
    task_id = fields.UUID(required=True)
    acct_id = fields.UUID(required=True)
    entity_id = fields.UUID(required=True, metadata={"description": "the build id"})
    build_id = fields.UUID(required=True)
    app_id = fields.UUID(required=True)
    type = fields.String(required=True, validate=validate.OneOf(("BUILD_WHITELIST",)))
    status = fields.Nested(StatusSchema, required=True)
    requester = fields.Nested(PersonSchema, required=True, allow_none=True)
    approver = fields.Nested(PersonSchema, required=True, allow_none=True)
    denial_reason = fields.String(required=True, allow_none=True)
    description = fields.String(required=True)
    created_at = fields.Integer(required=True)
    updated_at = fields.Integer(required=True)


class TaskDecisionSchema(Schema):
    status = fields.String(required=True, validate=validate.OneOf(("APPROVED", "DENIED")))
    denial_reason = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=4096))


class TaskListQuerySchema(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET))
    status = fields.String(load_default=None, validate=validate.OneOf(("INPROGRESS", "SUCCESS", "DENIED")))
    build_id = fields.UUID(load_default=None)


class TaskListSchema(Schema):
    metadata = fields.Nested(PageMetadataSchema, required=True)
    items = fields.List(fields.Nested(TaskSchema), required=True)
