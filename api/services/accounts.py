"""Session, account and user use cases: sign-in, account switch, account and member management."""
from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import func, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.errors import Conflict, Forbidden, NotFound, Unauthenticated, ValidationFailed
from common.store.accounts import (
    Role,
    authenticate,
    create_account,
    create_user,
    disabled_everywhere,
    first_account,
    normalise_email,
)
from common.store.models import Account, Membership, User
from common.store.passwords import hash_password


def sign_in(session: Session, email: str, password: str) -> tuple[User, uuid.UUID | None]:
    user = authenticate(session, email, password)
    if user is None:
        raise Unauthenticated("wrong e-mail or password")
    if disabled_everywhere(session, user.id):
        raise Forbidden("you are disabled in every account you are a member of; a MANAGER of one can enable you",
                        code="user_disabled")
    return user, first_account(session, user.id)


def disabled_in(session: Session, user_id: uuid.UUID) -> set[uuid.UUID]:
    """The accounts the user is DISABLED in."""
    return set(session.execute(select(Membership.account_id).where(
        Membership.user_id == user_id, Membership.disabled.is_(True))).scalars())


def member_status(user: User, membership: Membership | None) -> str:
    """CCM's user_account_status: DISABLED by a MANAGER, PENDING until given a password, else ACTIVE."""
    if membership is not None and membership.disabled:
        return "DISABLED"
    return "PENDING" if user.password_hash == "!" else "ACTIVE"  # "!": invited, never given a password


_ACCOUNT_SORT = {"name": lambda a: a.name.casefold(), "created_at": lambda a: a.created_at, "acct_id": lambda a: str(a.id)}


def account_page(session: Session, user_id: uuid.UUID, q: Mapping[str, object]) -> list[tuple[Account, str]]:
    """CCM's getAccounts over the caller's accounts (a user has few): sorted by `sort_by` (then id), the page of
    `limit` after `previous_id` (an id not in the list is a 422: the client's page no longer exists)."""
    if q["scope"] == "SYSTEM":
        raise Forbidden("the SYSTEM scope is a system administrator's; there are none here",
                        code="system_scope_forbidden")
    rows = sorted(memberships(session, user_id), key=lambda r: str(r[0].id))
    for part in reversed(str(q["sort_by"]).split(",")):  # stable sorts, last key first
        key, _, direction = part.partition(":")
        rows.sort(key=lambda r, k=key: _ACCOUNT_SORT[k](r[0]), reverse=direction == "DESC")  # type: ignore[misc]
    start = 0
    if q.get("previous_id") is not None:
        ids = [a.id for a, _ in rows]
        if q["previous_id"] not in ids:
            raise ValidationFailed("The request is invalid.", details={
                "fields": {"previous_id": ["not one of your accounts"]}})
        start = ids.index(q["previous_id"]) + 1  # type: ignore[arg-type]
    return rows[start:start + int(q["limit"])]  # type: ignore[call-overload]


def memberships(session: Session, user_id: uuid.UUID) -> list[tuple[Account, str]]:
    rows = session.execute(select(Account, Membership.role).join(Membership, Membership.account_id == Account.id)
                           .where(Membership.user_id == user_id).order_by(Membership.created_at, Account.id)).all()
    return [(r[0], r[1]) for r in rows]


def user_email(session: Session, user_id: uuid.UUID) -> str:
    email = session.execute(select(User.email).where(User.id == user_id)).scalar_one_or_none()
    if email is None:
        raise Unauthenticated("the user no longer exists")
    return email


def require_member(session: Session, user_id: uuid.UUID, account_id: uuid.UUID) -> None:
    """The user may act in the account: a member (else 404), not disabled there, and the account enabled."""
    row = session.execute(select(Account.enabled, Membership.disabled)
                          .join(Membership, Membership.account_id == Account.id)
                          .where(Membership.user_id == user_id, Account.id == account_id)).one_or_none()
    if row is None:
        raise NotFound("no such account")
    if not row.enabled:
        raise Forbidden("the account is deactivated; a MANAGER of it can enable it again (PATCH /v1/accounts/{id})",
                        code="account_deactivated")
    if row.disabled:
        raise Forbidden("you are disabled in this account; a MANAGER of it can enable you again",
                        code="user_disabled")


def new_account(session: Session, user_id: uuid.UUID, name: str) -> Account:
    user = session.get(User, user_id)
    if user is None:
        raise Unauthenticated("the user no longer exists")
    account = create_account(session, name, user)
    session.commit()
    return account


_USER_SORT = {"user_email": User.email, "first_name": User.first_name, "last_name": User.last_name,
              "created_at": Membership.created_at}


def list_members(session: Session, account_id: uuid.UUID, q: Mapping[str, object] | None = None
                 ) -> tuple[list[tuple[User, Membership]], int, int]:
    """(a page of the account's members, members in all, members matching `all_search`)."""
    q = q or {"limit": 1000, "offset": 0, "sort_by": "created_at:ASC"}
    filters = [Membership.account_id == account_id]
    total = session.execute(select(func.count()).select_from(Membership).where(*filters)).scalar_one()
    if q.get("all_search"):
        needle = "%" + str(q["all_search"]).replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        filters.append(or_(*(column.ilike(needle, escape="\\")
                             for column in (User.email, User.first_name, User.last_name))))
    joined = select(User, Membership).join(Membership, Membership.user_id == User.id).where(*filters)
    filtered = session.execute(select(func.count()).select_from(joined.subquery())).scalar_one()
    order = []
    for part in str(q.get("sort_by") or "created_at:ASC").split(","):
        key, _, direction = part.partition(":")
        column = _USER_SORT[key]
        order.append(column.desc().nulls_last() if direction == "DESC" else column.asc().nulls_last())
    rows = session.execute(joined.order_by(*order, User.id).limit(int(q["limit"]))  # type: ignore[call-overload]
                           .offset(int(q["offset"]))).all()  # type: ignore[call-overload]
    return [(r[0], r[1]) for r in rows], total, filtered


def update_user(session: Session, account_id: uuid.UUID, caller: uuid.UUID, caller_role: Role,
                user_id: uuid.UUID, body: Mapping[str, object]) -> tuple[User, Membership]:
    """CCM's UpdateUser within the session's account: roles by a MANAGER, names by the user or a MANAGER, the
    e-mail by the user only; the account status can only stay what it is."""
    user, membership = _member(session, account_id, user_id)
    own = user_id == caller
    roles = [str(body["role"])] if body.get("role") else [str(r) for r in body.get("roles") or ()]  # type: ignore[attr-defined]
    if (roles or (not own and ("first_name" in body or "last_name" in body))) and caller_role is not Role.MANAGER:
        raise Forbidden("this needs the MANAGER role")
    if "user_email" in body and not own:
        raise Forbidden("only a user's own e-mail can be changed", code="not_own_user")
    status, wanted = member_status(user, membership), body.get("user_account_status")
    if wanted not in (None, status):
        enabled_status = member_status(user, None)
        if wanted not in ("DISABLED", enabled_status):
            raise ValidationFailed("The request is invalid.", code="user_account_status_unsupported", details={
                "fields": {"user_account_status": [
                    f"the member is {status}: a MANAGER can set DISABLED or, on a disabled member, "
                    f"{enabled_status}; PENDING ends when the member is given a password"]}})
        if caller_role is not Role.MANAGER:
            raise Forbidden("this needs the MANAGER role")
        if own:
            raise Forbidden("a MANAGER cannot disable themself", code="cannot_disable_self")
        membership.disabled = wanted == "DISABLED"
    if roles:
        role = max((Role(r) for r in roles), key=list(Role).index).value
        if membership.role == Role.MANAGER.value and role != Role.MANAGER.value and _managers(session, account_id) <= 1:
            raise Forbidden("an account keeps at least one MANAGER")
        membership.role = role
    for key in ("first_name", "last_name"):
        if key in body:
            setattr(user, key, body[key] or None)
    if "user_email" in body:
        user.email = normalise_email(str(body["user_email"]))
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("another user has this e-mail", code="email_taken") from None
    return user, membership


def add_member(session: Session, account_id: uuid.UUID, body: Mapping[str, object]) -> tuple[User, Membership]:
    email = normalise_email(str(body["email"]))
    user = session.execute(select(User).where(User.email == email)).scalar_one_or_none()
    if user is None:
        if not body.get("password"):
            raise ValidationFailed("The request is invalid.",
                                   details={"fields": {"password": ["required for a new user"]}})
        user = create_user(session, email, str(body["password"]))
        user.first_name, user.last_name = body.get("first_name") or None, body.get("last_name") or None  # type: ignore[assignment]
    elif user.password_hash == "!" and body.get("password"):  # invited, never signed in: this sets the password
        user.password_hash = hash_password(str(body["password"]))
    membership = Membership(user_id=user.id, account_id=account_id, role=Role(str(body["role"])).value)
    session.add(membership)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("the user is already a member of this account", code="member_exists") from None
    return user, membership


def _member(session: Session, account_id: uuid.UUID, user_id: uuid.UUID) -> tuple[User, Membership]:
    row = session.execute(select(User, Membership).join(Membership, Membership.user_id == User.id)
                          .where(Membership.account_id == account_id, User.id == user_id)).one_or_none()
    if row is None:
        raise NotFound("no such user in this account")
    return row[0], row[1]


def _managers(session: Session, account_id: uuid.UUID) -> int:
    """The account's MANAGERs who can act (a disabled one cannot, so does not count)."""
    return len(session.execute(select(Membership.user_id).where(
        Membership.account_id == account_id, Membership.role == Role.MANAGER.value,
        Membership.disabled.is_(False))).all())


def change_role(session: Session, account_id: uuid.UUID, user_id: uuid.UUID, role: str) -> tuple[User, Membership]:
    user, membership = _member(session, account_id, user_id)
    if membership.role == Role.MANAGER.value and role != Role.MANAGER.value and _managers(session, account_id) <= 1:
        raise Forbidden("an account keeps at least one MANAGER")
    membership.role = Role(role).value
    session.commit()
    return user, membership


def remove_member(session: Session, account_id: uuid.UUID, user_id: uuid.UUID) -> None:
    _, membership = _member(session, account_id, user_id)
    if membership.role == Role.MANAGER.value and _managers(session, account_id) <= 1:
        raise Forbidden("an account keeps at least one MANAGER")
    session.delete(membership)
    session.commit()


# --- CCM's account and user operations ------------------------------------------------------------
def member_account(session: Session, user_id: uuid.UUID, account_id: uuid.UUID) -> tuple[Account, str]:
    """The account and the caller's role there; 404 when the caller is not a member (as for any other object)."""
    row = session.execute(select(Account, Membership.role).join(Membership, Membership.account_id == Account.id)
                          .where(Membership.user_id == user_id, Account.id == account_id)).one_or_none()
    if row is None:
        raise NotFound("no such account")
    return row[0], row[1]


# The one way into every account: e-mail and password, no second factor, for every member.
PASSWORD_CONFIG = {"password": {"require_2fa": False, "administrators_only": False}}
_AUTH_CONFIG_NS = uuid.UUID("6d1f3b0e-5a43-4f7b-9c55-0c2f1c7e8a11")


def auth_config_id(account_id: uuid.UUID) -> uuid.UUID:
    """The id of the account's password config (derived: it is the same for the account's whole life)."""
    return uuid.uuid5(_AUTH_CONFIG_NS, str(account_id))


def check_auth_configs(configs: object, field: str) -> None:
    """CCM's AuthenticationConfigs in a request: only the one every account has is accepted."""
    for config in configs or ():  # type: ignore[attr-defined]
        if config != PASSWORD_CONFIG:
            raise ValidationFailed("The request is invalid.", code="auth_method_unsupported", details={"fields": {
                field: ["only password sign-in without 2FA for every member exists here: "
                        "{'password': {'require_2fa': false, 'administrators_only': false}}"]}})


_ACCOUNT_FIELDS = ("name", "custom_logo", "node_enrollment", "component", "default_group_id", "marketplace_group_id",
                   "azure_cvm_pcr_priority")


def update_account(session: Session, user_id: uuid.UUID, account_id: uuid.UUID,
                   body: Mapping[str, object]) -> tuple[Account, str]:
    account, role = member_account(session, user_id, account_id)
    if role != Role.MANAGER.value:
        raise Forbidden("this needs the MANAGER role")
    if user_id in _disabled_members(session, account_id):
        raise Forbidden("you are disabled in this account; another MANAGER of it can enable you again",
                        code="user_disabled")
    enabled = _wanted_enabled(body)
    if not account.enabled and enabled is not True:
        raise Forbidden("the account is deactivated: enable it (`enabled: true` or `account_status: Active`) "
                        "to change it", code="account_deactivated")
    check_auth_configs(body.get("add_auth_configs"), "add_auth_configs")
    mods = body.get("mod_auth_configs") or {}
    assert isinstance(mods, Mapping)
    check_auth_configs(mods.values(), "mod_auth_configs")
    own = auth_config_id(account_id)
    deleted = body.get("del_auth_configs") or []
    assert isinstance(deleted, list)
    for config_id in [*mods, *deleted]:
        if config_id != own:
            raise NotFound(f"no auth config {config_id} in this account", code="auth_config_not_found")
    if deleted:
        raise ValidationFailed("The request is invalid.", code="auth_config_required", details={"fields": {
            "del_auth_configs": ["password sign-in is the only way into an account here: it cannot be removed"]}})
    for key in _ACCOUNT_FIELDS:
        if key in body:
            setattr(account, key, body[key])
    if enabled is not None:
        account.enabled = enabled
    session.commit()
    return account, role


def _disabled_members(session: Session, account_id: uuid.UUID) -> set[uuid.UUID]:
    return set(session.execute(select(Membership.user_id).where(
        Membership.account_id == account_id, Membership.disabled.is_(True))).scalars())


def _wanted_enabled(body: Mapping[str, object]) -> bool | None:
    """What `enabled` and CCM's `account_status` ask for together (None: neither is given)."""
    asked = set()
    if body.get("enabled") is not None:
        asked.add(bool(body["enabled"]))
    if body.get("account_status") is not None:
        asked.add(body["account_status"] == "Active")
    if len(asked) > 1:
        raise ValidationFailed("The request is invalid.", code="account_status_conflict", details={"fields": {
            "account_status": ["`enabled` and `account_status` disagree"]}})
    return asked.pop() if asked else None


def delete_account(session: Session, user_id: uuid.UUID, account_id: uuid.UUID) -> None:
    """Delete the account with its apps, builds and tasks (MANAGER of it); sessions in it keep no account."""
    account, role = member_account(session, user_id, account_id)
    if role != Role.MANAGER.value:
        raise Forbidden("this needs the MANAGER role")
    session.delete(account)
    session.commit()


def user(session: Session, user_id: uuid.UUID) -> User:
    found = session.get(User, user_id)
    if found is None:
        raise Unauthenticated("the user no longer exists")
    return found


def member(session: Session, account_id: uuid.UUID, user_id: uuid.UUID) -> tuple[User, Membership]:
    return _member(session, account_id, user_id)


def invite(session: Session, account_id: uuid.UUID, body: Mapping[str, object]) -> tuple[User, Membership, bool]:
    """Add a user to the account by e-mail (CCM's invite). An e-mail new to the service gets a user who cannot sign
    in until a password is set for them (`POST /v1/users` with a password); the third value says so."""
    email = normalise_email(str(body["user_email"]))
    found = session.execute(select(User).where(User.email == email)).scalar_one_or_none()
    pending = found is None
    if found is None:
        found = User(id=uuid.uuid4(), email=email, password_hash="!",  # no hash verifies against "!"
                     first_name=body.get("first_name") or None, last_name=body.get("last_name") or None)
        session.add(found)
        session.flush()
    roles = list(body["roles"])  # type: ignore[call-overload]
    top = max((Role(str(r)) for r in roles), key=list(Role).index)
    membership = Membership(user_id=found.id, account_id=account_id, role=top.value)
    session.add(membership)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        raise Conflict("the user is already a member of this account", code="member_exists") from None
    return found, membership, pending


def leave_account(session: Session, account_id: uuid.UUID, user_id: uuid.UUID, caller: uuid.UUID,
                  caller_role: Role) -> None:
    """CCM's DELETE /v1/users/{id}/accounts: a user leaves the current account (themself, or a MANAGER removes
    them)."""
    if user_id != caller and caller_role is not Role.MANAGER:
        raise Forbidden("this needs the MANAGER role")
    remove_member(session, account_id, user_id)
