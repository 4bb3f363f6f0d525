"""Session, account and user use cases: sign-in, account switch, account and member management."""
from __future__ import annotations

import uuid
from collections.abc import Mapping

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from common.errors import Conflict, Forbidden, NotFound, Unauthenticated, ValidationFailed
from common.store.accounts import (
    Role,
    authenticate,
    create_account,
    create_user,
    first_account,
    normalise_email,
)
from common.store.models import Account, Membership, User
from common.store.passwords import hash_password


def sign_in(session: Session, email: str, password: str) -> tuple[User, uuid.UUID | None]:
    user = authenticate(session, email, password)
    if user is None:
        raise Unauthenticated("wrong e-mail or password")
    return user, first_account(session, user.id)


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
    if not any(a.id == account_id for a, _ in memberships(session, user_id)):
        raise NotFound("no such account")


def new_account(session: Session, user_id: uuid.UUID, name: str) -> Account:
    user = session.get(User, user_id)
    if user is None:
        raise Unauthenticated("the user no longer exists")
    account = create_account(session, name, user)
    session.commit()
    return account


def list_members(session: Session, account_id: uuid.UUID) -> list[tuple[User, Membership]]:
    rows = session.execute(select(User, Membership).join(Membership, Membership.user_id == User.id)
                           .where(Membership.account_id == account_id).order_by(Membership.created_at, User.id)).all()
    return [(r[0], r[1]) for r in rows]


def add_member(session: Session, account_id: uuid.UUID, body: Mapping[str, object]) -> tuple[User, Membership]:
    email = normalise_email(str(body["email"]))
    user = session.execute(select(User).where(User.email == email)).scalar_one_or_none()
    if user is None:
        if not body.get("password"):
            raise ValidationFailed("The request is invalid.",
                                   details={"fields": {"password": ["required for a new user"]}})
        user = create_user(session, email, str(body["password"]))
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
    return len(session.execute(select(Membership.user_id).where(
        Membership.account_id == account_id, Membership.role == Role.MANAGER.value)).all())


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


def update_account(session: Session, user_id: uuid.UUID, account_id: uuid.UUID,
                   body: Mapping[str, object]) -> tuple[Account, str]:
    account, role = member_account(session, user_id, account_id)
    if role != Role.MANAGER.value:
        raise Forbidden("this needs the MANAGER role")
    for key in ("name", "custom_logo", "node_enrollment", "component"):
        if key in body:
            setattr(account, key, body[key])
    session.commit()
    return account, role


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
        found = User(id=uuid.uuid4(), email=email, password_hash="!")  # no hash verifies against "!"
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
