"""Schemas of the session, account, user, version and health resources."""
from __future__ import annotations

from marshmallow import Schema, fields, validate

ROLES = ("READER", "WRITER", "MANAGER")


class AccountRefSchema(Schema):
    acct_id = fields.UUID(required=True)
    name = fields.String(required=True)
    role = fields.String(required=True, validate=validate.OneOf(ROLES))


class SessionInfoSchema(Schema):
    user_id = fields.UUID(required=True)
    user_email = fields.String(required=True)
    acct_id = fields.UUID(required=True, allow_none=True)
    role = fields.String(required=True, allow_none=True)
    accounts = fields.List(fields.Nested(AccountRefSchema), required=True)
    expires_at = fields.Integer(required=True)


class TokenSchema(Schema):
    access_token = fields.String(required=True)
    token_type = fields.String(required=True)
    expires_in = fields.Integer(required=True)
    session_info = fields.Nested(SessionInfoSchema, required=True)


class VersionSchema(Schema):
    version = fields.String(required=True)
    api_version = fields.String(required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


class AccountCreateSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))


class AccountSchema(Schema):
    acct_id = fields.UUID(required=True)
    name = fields.String(required=True)
    created_at = fields.Integer(required=True)
    role = fields.String(required=True)


class AccountListSchema(Schema):
    items = fields.List(fields.Nested(AccountSchema), required=True)


class UserCreateSchema(Schema):
    email = fields.Email(required=True, validate=validate.Length(max=320))
    password = fields.String(load_default=None, validate=validate.Length(min=8, max=1024),
                             metadata={"description": "required when the e-mail is new to the service"})
    role = fields.String(load_default="READER", validate=validate.OneOf(ROLES))


class UserUpdateSchema(Schema):
    role = fields.String(required=True, validate=validate.OneOf(ROLES))


class UserSchema(Schema):
    user_id = fields.UUID(required=True)
    user_email = fields.String(required=True)
    role = fields.String(required=True)
    created_at = fields.Integer(required=True)


class UserListSchema(Schema):
    items = fields.List(fields.Nested(UserSchema), required=True)
