"""`/v1/accounts`, `/v1/user` and `/v1/users`: accounts of the caller, the caller, and members of the current
account, as CCM's API document has them."""
from __future__ import annotations

import uuid

from flask import Response, jsonify
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import principal
from api.context import db
from api.presenters import epoch, page_metadata
from api.schemas.sys import (
    ROLES,
    AccountCreateSchema,
    AccountListQuerySchema,
    AccountListSchema,
    AccountQuerySchema,
    AccountSchema,
    AccountUpdateSchema,
    InviteUserSchema,
    UserCreateSchema,
    UserListQuerySchema,
    UserListSchema,
    UserSchema,
    UserUpdateSchema,
)
from api.services import accounts
from common.errors import ValidationFailed
from common.store.accounts import Role
from common.store.models import Account, Membership, User

accounts_blp = Blueprint("accounts", __name__, url_prefix="/v1/accounts", description="Accounts")
users_blp = Blueprint("users", __name__, url_prefix="/v1/users", description="Members of the current account")
user_blp = Blueprint("user", __name__, url_prefix="/v1/user", description="The signed-in user")


def _account(account: Account, role: str, totals: bool = False, disabled: bool = False) -> dict[str, object]:
    """`disabled`: the caller is DISABLED in the account (their `status` there)."""
    return {"acct_id": account.id, "name": account.name, "created_at": epoch(account.created_at), "role": role,
            "roles": [role], "status": "DISABLED" if disabled else "ACTIVE",
            "account_status": "Active" if account.enabled else "Deactivated",
            "node_enrollment": dict(account.node_enrollment), "component": account.component,
            "custom_logo": account.custom_logo,
            "auth_configs": {accounts.auth_config_id(account.id): accounts.PASSWORD_CONFIG},
            "totals": {"datasets": 0, "final_workflows": 0, "nodes": 0} if totals else None,
            "default_group_id": account.default_group_id, "marketplace_group_id": account.marketplace_group_id,
            "azure_cvm_pcr_priority": account.azure_cvm_pcr_priority}


def _user(user: User, membership: Membership | None) -> dict[str, object]:
    role = membership.role if membership is not None else None
    return {"user_id": user.id, "user_email": user.email, "role": role, "roles": [role] if role else [],
            "status": accounts.member_status(user, None),
            "user_account_status": accounts.member_status(user, membership), "first_name": user.first_name,
            "last_name": user.last_name,
            "created_at": epoch(membership.created_at if membership is not None else user.created_at)}


@accounts_blp.route("")
class AccountList(MethodView):
    @accounts_blp.arguments(AccountCreateSchema)
    @accounts_blp.response(200, AccountSchema)
    def post(self, body: dict[str, object]) -> dict[str, object]:
        """Create an account; the caller becomes its MANAGER."""
        me = principal()
        accounts.check_auth_configs(body.get("auth_configs"), "auth_configs")
        account = accounts.new_account(db(), me.user_id, str(body["name"]))
        account, role = accounts.update_account(db(), me.user_id, account.id, {
            key: body[key] for key in ("custom_logo", "node_enrollment", "component")})
        return _account(account, role)

    @accounts_blp.arguments(AccountListQuerySchema, location="query")
    @accounts_blp.response(200, AccountListSchema)
    def get(self, query: dict[str, object]) -> dict[str, object]:
        """The caller's accounts (scope USER), a page after `previous_id`."""
        me = principal()
        off = accounts.disabled_in(db(), me.user_id)
        return {"items": [_account(a, r, disabled=a.id in off)
                          for a, r in accounts.account_page(db(), me.user_id, query)]}


@accounts_blp.route("/<uuid:acct_id>")
class AccountItem(MethodView):
    @accounts_blp.arguments(AccountQuerySchema, location="query")
    @accounts_blp.response(200, AccountSchema)
    def get(self, query: dict[str, object], acct_id: uuid.UUID) -> dict[str, object]:
        """One of the caller's accounts."""
        me = principal()
        return _account(*accounts.member_account(db(), me.user_id, acct_id), bool(query["with_totals"]),
                        acct_id in accounts.disabled_in(db(), me.user_id))

    @accounts_blp.arguments(AccountUpdateSchema)
    @accounts_blp.response(200, AccountSchema)
    def patch(self, body: dict[str, object], acct_id: uuid.UUID) -> dict[str, object]:
        """Change an account (its MANAGER). `enabled: false` / `account_status: Deactivated` deactivates it: its
        data is kept, but no member can act in it (sessions, tokens and submissions there are refused with
        `account_deactivated`) until one of its MANAGERs enables it again with `enabled: true` / `account_status:
        Active`, the only change a deactivated account accepts (it can still be deleted)."""
        return _account(*accounts.update_account(db(), principal().user_id, acct_id, body))

    @accounts_blp.response(204)
    def delete(self, acct_id: uuid.UUID) -> None:
        """Delete an account with its apps, builds and tasks (its MANAGER)."""
        accounts.delete_account(db(), principal().user_id, acct_id)


@user_blp.route("")
class Me(MethodView):
    @user_blp.response(200, UserSchema)
    def get(self) -> dict[str, object]:
        """The signed-in user, with the role in the session's account."""
        me = principal()
        found = accounts.user(db(), me.user_id)
        if me.account_id is None:
            return _user(found, None)
        return _user(*accounts.member(db(), me.account_id, me.user_id))


@users_blp.route("")
class UserList(MethodView):
    @users_blp.arguments(UserCreateSchema)
    @users_blp.response(201, UserSchema)
    def post(self, body: dict[str, object]) -> dict[str, object]:
        """Add a user to the account with a role (MANAGER)."""
        return _user(*accounts.add_member(db(), principal().require(Role.MANAGER), body))

    @users_blp.arguments(UserListQuerySchema, location="query")
    @users_blp.response(200, UserListSchema)
    def get(self, query: dict[str, object]) -> dict[str, object]:
        """Members of the account, CCM's pagination envelope."""
        rows, total, filtered = accounts.list_members(db(), principal().require(Role.READER), query)
        return {"metadata": page_metadata(int(query["limit"]), int(query["offset"]), total, filtered),  # type: ignore[call-overload]
                "items": [_user(u, m) for u, m in rows]}


@users_blp.route("/invite")
class Invite(MethodView):
    @users_blp.arguments(InviteUserSchema)
    @users_blp.response(201, UserSchema)
    def post(self, body: dict[str, object]) -> dict[str, object]:
        """Invite a user by e-mail into the account (MANAGER); the highest of `roles` applies."""
        found, membership, _ = accounts.invite(db(), principal().require(Role.MANAGER), body)
        return _user(found, membership)


@users_blp.route("/<uuid:user_id>")
class UserItem(MethodView):
    @users_blp.response(200, UserSchema)
    def get(self, user_id: uuid.UUID) -> dict[str, object]:
        """A member of the account."""
        return _user(*accounts.member(db(), principal().require(Role.READER), user_id))

    @users_blp.arguments(UserUpdateSchema)
    @users_blp.response(200, UserSchema)
    def patch(self, body: dict[str, object], user_id: uuid.UUID) -> dict[str, object]:
        """Change a member: the role (MANAGER; `role`, or CCM's `roles`: the highest applies), the names (the user
        or a MANAGER), the e-mail (the user's own)."""
        me = principal()
        account = me.require(Role.READER)
        assert me.role is not None
        return _user(*accounts.update_user(db(), account, me.user_id, me.role, user_id, body))

    @users_blp.response(204)
    def delete(self, user_id: uuid.UUID) -> None:
        """Remove a member from the account (MANAGER)."""
        accounts.remove_member(db(), principal().require(Role.MANAGER), user_id)


@users_blp.route("/<uuid:user_id>/accounts")
class UserAccounts(MethodView):
    @users_blp.response(200, {"type": "object", "additionalProperties": {
        "type": "object", "required": ["roles", "status"],
        "properties": {"roles": {"type": "array", "items": {"type": "string", "enum": list(ROLES)}},
                       "status": {"type": "string", "enum": ["ACTIVE", "PENDING", "DISABLED"]}}}},
        description="account id -> the user's roles and status there (CCM's GetUserAccountsResponse)")
    def get(self, user_id: uuid.UUID) -> Response:
        """The accounts of the caller (CCM: the user's own); another user's are a 404."""
        me = principal()
        if user_id != me.user_id:
            accounts.member(db(), me.require(Role.READER), user_id)  # 404 outside the account
            raise ValidationFailed("The request is invalid.", code="not_own_user",
                                   details={"fields": {"user_id": ["only a user's own accounts are listed"]}})
        off = accounts.disabled_in(db(), user_id)
        return jsonify({str(a.id): {"roles": [r], "status": "DISABLED" if a.id in off else "ACTIVE"}
                        for a, r in accounts.memberships(db(), user_id)})

    @users_blp.response(204)
    def delete(self, user_id: uuid.UUID) -> None:
        """The user leaves the session's account (themself, or removed by a MANAGER)."""
        me = principal()
        account = me.require(Role.READER)
        assert me.role is not None
        accounts.leave_account(db(), account, user_id, me.user_id, me.role)
