"""Schemas of the session, account, user, version and health resources."""
from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, pre_load, validate

from api.schemas.common import MAX_OFFSET, PageMetadataSchema

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


class AuthDiscoverQuerySchema(Schema):
    acct_id = fields.UUID(load_default=None, metadata={"description": "every account signs in the same way here"})


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


class AuthConfigPasswordSchema(Schema):
    require_2fa = fields.Boolean(required=True)
    administrators_only = fields.Boolean(required=True)


class AuthenticationConfigSchema(Schema):
    """CCM's AuthenticationConfig. Only password sign-in without 2FA, open to every member, exists here: that is
    what an account's one auth config says; any other is refused with `auth_method_unsupported`."""

    password = fields.Nested(AuthConfigPasswordSchema)
    oauth = fields.Dict(metadata={"description": "refused: no SSO here"})
    cluster_auth_ref = fields.Dict(metadata={"description": "refused: no clusters here"})


ACCOUNT_STATUSES = ("Active", "Deactivated")


def _pcr_priority(value: list[int]) -> None:
    if sorted(value) != list(range(23)):
        raise ValidationError("exactly the integers 0 through 22, each once")


class AccountCreateSchema(Schema):
    name = fields.String(required=True, validate=validate.Length(min=1, max=255))
    auth_configs = fields.List(fields.Nested(AuthenticationConfigSchema), validate=validate.Length(max=10),
                               metadata={"description": "only the password config of every account is accepted"})
    custom_logo = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=1 << 20))
    node_enrollment = fields.Nested(NodeEnrollmentSchema, load_default=lambda: {
        "attestation_enforcement_disabled_insecure": False})
    component = fields.String(load_default="DEFAULT", validate=validate.OneOf(COMPONENTS))


class AccountUpdateSchema(Schema):
    name = fields.String(validate=validate.Length(min=1, max=255))
    custom_logo = fields.String(allow_none=True, validate=validate.Length(max=1 << 20))
    node_enrollment = fields.Nested(NodeEnrollmentSchema)
    component = fields.String(validate=validate.OneOf(COMPONENTS))
    add_auth_configs = fields.List(fields.Nested(AuthenticationConfigSchema), validate=validate.Length(max=10))
    mod_auth_configs = fields.Dict(keys=fields.UUID(), values=fields.Nested(AuthenticationConfigSchema),
                                   validate=validate.Length(max=10))
    del_auth_configs = fields.List(fields.UUID(), validate=validate.Length(max=10))
    enabled = fields.Boolean(metadata={"description": "`false` deactivates the account (data kept, no member can "
                                                      "act in it), `true` enables it again; its MANAGERs'"})
    account_status = fields.String(validate=validate.OneOf(ACCOUNT_STATUSES), metadata={
        "description": "`Deactivated` / `Active`: as `enabled` (both given must agree, else "
                       "`account_status_conflict`)"})
    default_group_id = fields.UUID(allow_none=True, metadata={"description": "recorded (no groups here)"})
    marketplace_group_id = fields.UUID(allow_none=True, metadata={"description": "recorded (no marketplace here)"})
    azure_cvm_pcr_priority = fields.List(fields.Integer(), allow_none=True, validate=_pcr_priority,
                                         metadata={"description": "recorded (no Azure CVMs here)"})


class ObjectCountsSchema(Schema):
    """CCM's ObjectCounts: datasets, workflows and nodes, none of which exist here."""

    datasets = fields.Integer(required=True)
    final_workflows = fields.Integer(required=True)
    nodes = fields.Integer(required=True)


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
    auth_configs = fields.Dict(keys=fields.UUID(), values=fields.Nested(AuthenticationConfigSchema), required=True)
    totals = fields.Nested(ObjectCountsSchema, allow_none=True, metadata={"description": "with `?with_totals=true`"})
    default_group_id = fields.UUID(allow_none=True)
    marketplace_group_id = fields.UUID(allow_none=True)
    azure_cvm_pcr_priority = fields.List(fields.Integer(), allow_none=True)


class AccountQuerySchema(Schema):
    with_totals = fields.Boolean(load_default=False, metadata={"description": "add `totals` (all 0 here)"})


ACCOUNT_SORT_KEYS = ("name", "created_at", "acct_id")


class AccountListQuerySchema(Schema):
    """CCM's getAccounts: `scope` USER (the caller's accounts) or SYSTEM (every account: a system administrator's;
    there are none here, so it is refused with `system_scope_forbidden`), keyset pages after `previous_id`."""

    scope = fields.String(load_default="USER", validate=validate.OneOf(("USER", "SYSTEM")))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    previous_id = fields.UUID(load_default=None, metadata={"description": "the last account of the previous page"})
    sort_by = fields.String(load_default="created_at:ASC", validate=validate.Regexp(
        r"^(name|created_at|acct_id)(:(ASC|DESC))?(,(name|created_at|acct_id)(:(ASC|DESC))?){0,2}$"),
        metadata={"description": "CCM's `key1:ASC,key2:DESC` over name, created_at, acct_id"})


class AccountListSchema(Schema):
    items = fields.List(fields.Nested(AccountSchema), required=True)


class UserCreateSchema(Schema):
    """CCM's SignupRequest (user_email, user_password, names, recaptcha_response: no captcha here, a MANAGER
    adds the member) with our `role`; our earlier names `email` and `password` are still taken."""

    @pre_load
    def _our_names(self, data: object, **_: object) -> object:
        if isinstance(data, dict):
            data = dict(data)
            for ours, ccm in (("email", "user_email"), ("password", "user_password")):
                if ours in data and ccm not in data:
                    data[ccm] = data.pop(ours)
        return data

    email = fields.Email(required=True, data_key="user_email", validate=validate.Length(max=320))
    password = fields.String(load_default=None, data_key="user_password", validate=validate.Length(min=8, max=1024),
                             metadata={"description": "required when the e-mail is new to the service"})
    role = fields.String(load_default="READER", validate=validate.OneOf(ROLES))
    first_name = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=255))
    last_name = fields.String(load_default=None, allow_none=True, validate=validate.Length(max=255))
    recaptcha_response = fields.String(load_default=None, allow_none=True, load_only=True,
                                       metadata={"description": "accepted and not checked"})


USER_STATUSES = ("ACTIVE", "PENDING", "DISABLED")


class UserUpdateSchema(Schema):
    """CCM's UpdateUserRequest (and our `role`). Roles are a MANAGER's to change; names the user's own or a
    MANAGER's; the e-mail only the user's own. `user_account_status` is the member's status in this account: a
    MANAGER sets DISABLED (the member can no longer select or act in this account; not themself) and sets a
    disabled member back to ACTIVE (PENDING for one never given a password). PENDING ends only with a password;
    any other change is `user_account_status_unsupported`."""

    role = fields.String(validate=validate.OneOf(ROLES))
    roles = fields.List(fields.String(validate=validate.OneOf(ROLES)), validate=validate.Length(min=1, max=3),
                        metadata={"description": "CCM's form; the highest role given applies"})
    first_name = fields.String(allow_none=True, validate=validate.Length(max=255))
    last_name = fields.String(allow_none=True, validate=validate.Length(max=255))
    user_account_status = fields.String(validate=validate.OneOf(USER_STATUSES))
    user_email = fields.Email(validate=validate.Length(max=320), metadata={"description": "the caller's own only"})


USER_SORT_KEYS = ("user_email", "first_name", "last_name", "created_at")


class UserListQuerySchema(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0, max=MAX_OFFSET))
    all_search = fields.String(load_default=None, validate=validate.Length(max=255),
                               metadata={"description": "in the e-mail, first and last name (case-insensitive)"})
    sort_by = fields.String(load_default="created_at:ASC", validate=validate.Regexp(
        r"^(user_email|first_name|last_name|created_at)(:(ASC|DESC))?"
        r"(,(user_email|first_name|last_name|created_at)(:(ASC|DESC))?){0,3}$"),
        metadata={"description": "CCM's `key1:ASC,key2:DESC` over user_email, first_name, last_name, created_at "
                                 "(the membership's)"})


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
    metadata = fields.Nested(PageMetadataSchema, required=True)
    items = fields.List(fields.Nested(UserSchema), required=True)
