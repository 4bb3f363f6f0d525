"""`/v1/accounts` and `/v1/users`: accounts of the caller, and members of the current account."""
from __future__ import annotations

import uuid

from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import principal
from api.context import db
from api.presenters import epoch
from api.schemas.sys import (
    AccountCreateSchema,
    AccountListSchema,
    AccountSchema,
    UserCreateSchema,
    UserListSchema,
    UserSchema,
    UserUpdateSchema,
)
from api.services import accounts
from common.accounts import Role
from common.models import Account, Membership, User

accounts_blp = Blueprint("accounts", __name__, url_prefix="/v1/accounts", description="Accounts")
users_blp = Blueprint("users", __name__, url_prefix="/v1/users", description="Members of the current account")


def _account(account: Account, role: str) -> dict[str, object]:
    return {"acct_id": account.id, "name": account.name, "created_at": epoch(account.created_at), "role": role}


def _user(user: User, membership: Membership) -> dict[str, object]:
    return {"user_id": user.id, "user_email": user.email, "role": membership.role,
            "created_at": epoch(membership.created_at)}


@accounts_blp.route("")
class AccountList(MethodView):
    @accounts_blp.arguments(AccountCreateSchema)
    @accounts_blp.response(201, AccountSchema)
    def post(self, body: dict[str, object]) -> dict[str, object]:
        """Create an account; the caller becomes its MANAGER."""
        return _account(accounts.new_account(db(), principal().user_id, str(body["name"])), Role.MANAGER.value)

    @accounts_blp.response(200, AccountListSchema)
    def get(self) -> dict[str, object]:
        """The caller's accounts."""
        return {"items": [_account(a, r) for a, r in accounts.memberships(db(), principal().user_id)]}


@users_blp.route("")
class UserList(MethodView):
    @users_blp.arguments(UserCreateSchema)
    @users_blp.response(201, UserSchema)
    def post(self, body: dict[str, object]) -> dict[str, object]:
        """Add a user to the account with a role (MANAGER)."""
        return _user(*accounts.add_member(db(), principal().require(Role.MANAGER), body))

    @users_blp.response(200, UserListSchema)
    def get(self) -> dict[str, object]:
        """Members of the account."""
        return {"items": [_user(u, m) for u, m in accounts.list_members(db(), principal().require(Role.READER))]}


@users_blp.route("/<uuid:user_id>")
class UserItem(MethodView):
    @users_blp.arguments(UserUpdateSchema)
    @users_blp.response(200, UserSchema)
    def patch(self, body: dict[str, object], user_id: uuid.UUID) -> dict[str, object]:
        """Change a member's role (MANAGER)."""
        return _user(*accounts.change_role(db(), principal().require(Role.MANAGER), user_id, str(body["role"])))

    @users_blp.response(204)
    def delete(self, user_id: uuid.UUID) -> None:
        """Remove a member from the account (MANAGER)."""
        accounts.remove_member(db(), principal().require(Role.MANAGER), user_id)
