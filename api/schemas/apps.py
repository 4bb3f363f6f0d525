"""Schemas of the App resource (with default build settings and auto-approve)."""
from __future__ import annotations

from marshmallow import Schema, fields, validate

from api.schemas.builds import ConverterOptionsSchema, NitroEnclavesOptionsSchema, image_reference
from api.schemas.common import MAX_OFFSET, PageMetadataSchema


class NitroDefaultsSchema(NitroEnclavesOptionsSchema):
    converter_options = fields.Nested(ConverterOptionsSchema, load_default=None, allow_none=True)


class DefaultBuildSettingsSchema(Schema):
    nitro_enclaves = fields.Nested(NitroDefaultsSchema, load_default=None, allow_none=True)


class AppCreateSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    description = fields.String(load_default="", validate=validate.Length(max=4096))
    input_image_name = fields.String(load_default=None, allow_none=True, validate=image_reference)
    output_image_name = fields.String(load_default=None, allow_none=True, validate=image_reference)
    default_build_settings = fields.Nested(DefaultBuildSettingsSchema, load_default=None, allow_none=True)
    auto_approve = fields.Boolean(load_default=False)


class AppUpdateSchema(Schema):
    name = fields.String(validate=validate.Length(min=1, max=255))
    description = fields.String(validate=validate.Length(max=4096))
    input_image_name = fields.String(allow_none=True, validate=image_reference)
    output_image_name = fields.String(allow_none=True, validate=image_reference)
    default_build_settings = fields.Nested(DefaultBuildSettingsSchema, allow_none=True)
    auto_approve = fields.Boolean()


class AppSchema(Schema):
    app_id = fields.UUID(required=True)
    acct_id = fields.UUID(required=True)
    name = fields.String(required=True)
    description = fields.String(required=True)
    input_image_name = fields.String(required=True, allow_none=True)
    output_image_name = fields.String(required=True, allow_none=True)
    default_build_settings = fields.Dict(required=True)
    auto_approve = fields.Boolean(required=True)
    created_at = fields.Integer(required=True)
    updated_at = fields.Integer(required=True)


class AppListQuerySchema(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET))
    name = fields.String(load_default=None)


class AppListSchema(Schema):
    metadata = fields.Nested(PageMetadataSchema, required=True)
    items = fields.List(fields.Nested(AppSchema), required=True)
