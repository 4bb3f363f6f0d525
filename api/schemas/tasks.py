"""Schemas of BUILD_WHITELIST tasks and their approval or denial."""
from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.common import MAX_OFFSET, PageMetadataSchema


class PersonSchema(Schema):
    user_id = fields.UUID(required=True, allow_none=True)
    user_name = fields.String(required=True)


TASK_STATUSES = ("INPROGRESS", "FAILED", "SUCCESS", "DENIED")


class TaskStatusSchema(Schema):
    """CCM's TaskStatus."""

    status = fields.String(required=True, validate=validate.OneOf(TASK_STATUSES))
    created_at = fields.Integer(required=True)
    status_updated_at = fields.Integer(required=True)


class RequesterInfoSchema(Schema):
    requester_type = fields.String(required=True, validate=validate.OneOf(("USER", "APP", "SYSTEM")))
    user_id = fields.UUID(allow_none=True)
    user_name = fields.String(allow_none=True)
    app_id = fields.UUID(allow_none=True)
    app_name = fields.String(allow_none=True)


class ApprovalInfoSchema(Schema):
    user_id = fields.UUID(required=True, metadata={"description": "the nil UUID for the SYSTEM (auto-approve)"})
    user_name = fields.String(allow_none=True)
    status = fields.String(allow_none=True, validate=validate.OneOf(("APPROVED", "DENIED")))
    denial_reason = fields.String(allow_none=True)


class TaskSchema(Schema):
    task_id = fields.UUID(required=True)
    acct_id = fields.UUID(required=True)
    entity_id = fields.UUID(required=True, metadata={"description": "the build id"})
    build_id = fields.UUID(required=True)
    app_id = fields.UUID(required=True)
    type = fields.String(required=True, validate=validate.OneOf(("BUILD_WHITELIST",)))
    task_type = fields.String(required=True, validate=validate.OneOf(("BUILD_WHITELIST",)))
    status = fields.Nested(TaskStatusSchema, required=True)
    task_status = fields.Nested(TaskStatusSchema, required=True, metadata={
        "description": "the same as `status`: the PATCH answer is also CCM's TaskResult"})
    requester_info = fields.Nested(RequesterInfoSchema, required=True)
    approvals = fields.List(fields.Nested(ApprovalInfoSchema), required=True)
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
    status = fields.String(load_default=None, validate=validate.OneOf(
        ("PENDING", "CLOSED", "INPROGRESS", "SUCCESS", "DENIED", "FAILED")),
        metadata={"description": "CCM's PENDING (INPROGRESS) or CLOSED (decided), or one exact status"})
    build_id = fields.UUID(load_default=None)
    task_type = fields.String(load_default=None, validate=validate.OneOf(
        ("NODE_ATTESTATION", "CERTIFICATE_ISSUANCE", "BUILD_WHITELIST", "DOMAIN_WHITELIST")))
    requester = fields.String(load_default=None, metadata={"description": "the requester's e-mail"})
    approver = fields.String(load_default=None, metadata={"description": "the approver's e-mail"})
    all_search = fields.String(load_default=None, validate=validate.Length(max=255),
                               metadata={"description": "in the requester's e-mail and the build's image names"})
    sort_by = fields.String(load_default="created_at:DESC", validate=validate.Regexp(
        r"^(created_at|updated_at|status)(:(ASC|DESC))?(,(created_at|updated_at|status)(:(ASC|DESC))?){0,2}$"),
        metadata={"description": "CCM's `key1:ASC,key2:DESC` over created_at, updated_at, status"})
    base_filters = fields.String(load_default=None, metadata={
        "description": "accepted and ignored: CCM's document gives it no syntax or meaning"})


class TaskListSchema(Schema):
    metadata = fields.Nested(PageMetadataSchema, required=True)
    items = fields.List(fields.Nested(TaskSchema), required=True)
