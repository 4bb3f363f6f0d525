"""Accounts, users and memberships: creation and lookup shared by the API and the bootstrap."""
from __future__ import annotations

import enum
import uuid

from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from common.store.models import Account, Membership, User
from common.store.passwords import dummy_hash, hash_password, verify_password


class Role(enum.StrEnum):
    READER = "READER"
    WRITER = "WRITER"
    MANAGER = "MANAGER"


RANK = {Role.READER: 0, Role.WRITER: 1, Role.MANAGER: 2}


def normalise_email(email: str) -> str:
    return email.strip().lower()


def authenticate(session: Session, email: str, password: str) -> User | None:
    user = session.execute(select(User).where(User.email == normalise_email(email))).scalar_one_or_none()
    if user is None:
        verify_password(dummy_hash(), password)
        return None
    return user if verify_password(user.password_hash, password) else None


def create_user(session: Session, email: str, password: str) -> User:
    user = User(id=uuid.uuid4(), email=normalise_email(email), password_hash=hash_password(password))
    session.add(user)
    session.flush()
    return user


def create_account(session: Session, name: str, manager: User) -> Account:
    """A new account whose creator is its MANAGER (CCM behaviour)."""
    account = Account(id=uuid.uuid4(), name=name)
    session.add(account)
    session.flush()
    session.add(Membership(user_id=manager.id, account_id=account.id, role=Role.MANAGER.value))
    session.flush()
    return account


# Built once: every API request runs it, and a prebuilt statement skips SQLAlchemy's per-call cache key work
# (the API also prepares it on each connection: api/prepared.py).
ROLE_STATEMENT = select(Membership.role).where(Membership.user_id == bindparam("user_id"),
                                              Membership.account_id == bindparam("account_id"))


def role_in(session: Session, user_id: uuid.UUID, account_id: uuid.UUID) -> Role | None:
    role = session.connection().execute(ROLE_STATEMENT, {"user_id": user_id, "account_id": account_id}).scalar_one_or_none()
    return Role(role) if role else None


def first_account(session: Session, user_id: uuid.UUID) -> uuid.UUID | None:
    """The first account the user may act in: enabled, and the user not disabled there."""
    return session.execute(
        select(Membership.account_id).join(Account, Account.id == Membership.account_id)
        .where(Membership.user_id == user_id, Membership.disabled.is_(False), Account.enabled.is_(True))
        .order_by(Membership.created_at, Membership.account_id).limit(1)).scalar_one_or_none()


def disabled_everywhere(session: Session, user_id: uuid.UUID) -> bool:
    """The user is a member somewhere and DISABLED in every account they are a member of."""
    flags = session.execute(select(Membership.disabled).where(Membership.user_id == user_id)).scalars().all()
    return bool(flags) and all(flags)


def ensure_admin(session: Session, email: str, password: str, account_name: str = "default") -> uuid.UUID:
    """Make sure the bootstrap admin exists, knows `password`, and manages an account. Returns the user id."""
    user = session.execute(select(User).where(User.email == normalise_email(email))).scalar_one_or_none()
    if user is None:
        user = create_user(session, email, password)
    elif not verify_password(user.password_hash, password):
        user.password_hash = hash_password(password)
    if first_account(session, user.id) is None:
        create_account(session, account_name, user)
    return user.id
