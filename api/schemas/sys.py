"""Schemas of the session, account, user, version and health resources."""
from __future__ import annotations

from marshmallow import Schema, fields, pre_load, validate

ROLES = ("READER", "WRITER", "MANAGER")


class AccountRefSchema(Schema):
    acct_id = fields.UUID(required=True)
    name = fields.String(required=True)
    role = fields.String(required=True, validate=validate.OneOf(ROLES))


class SessionInfoSchema(Schema):
    # CCM's SessionInfo
    subject_id = fields.UUID(required=True)
    session_expires_at = fields.Integer(required=True, metadata={"description": "epoch seconds: the session's end"})
    session_token_expires_at = fields.Integer(required=True, metadata={
        "description": "epoch seconds: the token's expiry (POST /v1/sys/session/refresh extends it)"})
    selected_account_id = fields.UUID(allow_none=True)
    # ours
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


class SessionResponseSchema(Schema):
    """CCM's SelectAccountResponse and RefreshResponse: the calling session, its token unchanged."""

    session_info = fields.Nested(SessionInfoSchema, required=True)


class AuthDiscoverSchema(Schema):
    user_email = fields.String(load_default=None, validate=validate.Length(max=320))


class AuthMethodSchema(Schema):
    password = fields.Dict(required=True)


class AuthDiscoverResponseSchema(Schema):
    auth_methods = fields.List(fields.Nested(AuthMethodSchema), required=True)


class VersionSchema(Schema):
    version = fields.String(required=True)
    api_version = fields.String(required=True)


class HealthSchema(Schema):
    status = fields.String(required=True)
    checks = fields.Dict(keys=fields.String(), values=fields.String(), required=True)


COMPONENTS = ("DEFAULT", "CONFIDENTIAL_AI")


class NodeEnrollmentSchema(Schema):
    attestation_enforcement_disabled_insecure = fields.Boolean(required=True)


class AccountCreateSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    custom_logo = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=1 << 20))
    node_enrollment = fields.Nested(NodeEnrollmentSchema, load_default=lambda: {
        "attestation_enforcement_disabled_insecure": False})
    component = fields.String(load_default="DEFAULT", validate=validate.OneOf(COMPONENTS))


class AccountUpdateSchema(Schema):
    name = fields.String(validate=validate.Length(min=1, max=255))
    custom_logo = fields.String(allow_none=True, validate=validate.Length(max=1 << 20))
    node_enrollment = fields.Nested(NodeEnrollmentSchema)
    component = fields.String(validate=validate.OneOf(COMPONENTS))


class AccountSchema(Schema):
    acct_id = fields.UUID(required=True)
    name = fields.String(required=True)
    created_at = fields.Integer(required=True)
    roles = fields.List(fields.String(validate=validate.OneOf(ROLES)), required=True)
    status = fields.String(required=True, validate=validate.OneOf(("ACTIVE", "PENDING", "DISABLED")))
    account_status = fields.String(required=True, validate=validate.OneOf(("Active", "Deactivated")))
    node_enrollment = fields.Nested(NodeEnrollmentSchema, required=True)
    component = fields.String(required=True, validate=validate.OneOf(COMPONENTS))
    custom_logo = fields.String(allow_none=True)
    role = fields.String(required=True, metadata={"description": "ours: the caller's role (CCM: roles)"})


class AccountListSchema(Schema):
    items = fields.List(fields.Nested(AccountSchema), required=True)


class UserCreateSchema(Schema):
    """Ours (email, password, role) or CCM's SignupRequest names (user_email, user_password)."""

    @pre_load
    def _ccm_names(self, data: object, **_: object) -> object:
        if isinstance(data, dict):
            data = dict(data)
            for ccm, ours in (("user_email", "email"), ("user_password", "password")):
                if ccm in data and ours not in data:
                    data[ours] = data.pop(ccm)
            for ignored in ("first_name", "last_name", "recaptcha_response"):
                data.pop(ignored, None)
        return data

    email = fields.Email(required=True, validate=validate.Length(max=320))
    password = fields.String(load_default=None, validate=validate.Length(min=8, max=1024),
                             metadata={"description": "required when the e-mail is new to the service"})
    role = fields.String(load_default="READER", validate=validate.OneOf(ROLES))


class UserUpdateSchema(Schema):
    role = fields.String(validate=validate.OneOf(ROLES))
    roles = fields.List(fields.String(validate=validate.OneOf(ROLES)), validate=validate.Length(min=1, max=3),
                        metadata={"description": "CCM's form; the highest role given applies"})


class UserSchema(Schema):
    user_id = fields.UUID(required=True)
    user_email = fields.String(required=True)
    role = fields.String(required=True, allow_none=True, metadata={"description": "ours: the role in the account"})
    roles = fields.List(fields.String(validate=validate.OneOf(ROLES)), required=True)
    status = fields.String(required=True, validate=validate.OneOf(("ACTIVE", "PENDING", "DISABLED")))
    user_account_status = fields.String(required=True, validate=validate.OneOf(("ACTIVE", "PENDING", "DISABLED")))
    first_name = fields.String(allow_none=True)
    last_name = fields.String(allow_none=True)
    created_at = fields.Integer(required=True)


class InviteUserSchema(Schema):
    user_email = fields.Email(required=True, validate=validate.Length(max=320))
    roles = fields.List(fields.String(validate=validate.OneOf(ROLES)), required=True,
                        validate=validate.Length(min=1, max=3))
    first_name = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=255))
    last_name = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=255))


class UserAccountInfoSchema(Schema):
    roles = fields.List(fields.String(validate=validate.OneOf(ROLES)), required=True)
    status = fields.String(required=True, validate=validate.OneOf(("ACTIVE", "PENDING", "DISABLED")))


class UserListSchema(Schema):
    items = fields.List(fields.Nested(UserSchema), required=True)
