"""Server-side sessions (CCM's, migration 0007): open at sign-in, select an account, refresh, terminate, and
the one indexed query every authenticated request runs to learn who is calling and in which account.

Each API process also keeps a hint per session (its user and account as last seen): the submission's one
statement is handed the hint and checks it against the row (`moved` when the account was changed by a request
another process served), and the rate limit counts against it. Nothing is decided on the hint alone.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import bindparam, delete, func, select, update
from sqlalchemy.orm import Session as DbSession

from common.store.accounts import Role
from common.store.models import Account, Membership, Session

_S = Session.__table__
_LIVE = (_S.c.token_expires_at > func.now(), _S.c.expires_at > func.now())
# Every authenticated request runs this (by the primary keys of sessions and memberships); the API prepares it
# on each connection (api/prepared.py).
SESSION_STATEMENT = (
    select(_S.c.user_id, _S.c.account_id, Membership.role, Membership.disabled, Account.enabled)
    .select_from(_S.outerjoin(Membership, (Membership.user_id == _S.c.user_id)
                              & (Membership.account_id == _S.c.account_id))
                 .outerjoin(Account.__table__, Account.id == _S.c.account_id))
    .where(_S.c.id == bindparam("session_id"), *_LIVE))


@dataclass(frozen=True)
class SessionState:
    session_id: uuid.UUID
    user_id: uuid.UUID
    account_id: uuid.UUID | None
    role: Role | None
    # Why the session's account cannot be acted in (its account_id and role are then None): the stable code.
    refused: str | None = None


def refusal(account_enabled: bool | None, member_disabled: bool | None) -> str | None:
    """The stable code for a member who may not act in an account, or None."""
    if account_enabled is False:
        return "account_deactivated"
    if member_disabled:
        return "user_disabled"
    return None


@dataclass(frozen=True)
class Hint:
    user_id: uuid.UUID
    account_id: uuid.UUID | None


_HINTS: dict[uuid.UUID, Hint] = {}
_HINTS_MAX = 65536


def hint(session_id: uuid.UUID) -> Hint | None:
    return _HINTS.get(session_id)


def remember(session_id: uuid.UUID, user_id: uuid.UUID, account_id: uuid.UUID | None) -> None:
    if len(_HINTS) >= _HINTS_MAX:
        _HINTS.clear()  # bounded; a miss costs one session query
    _HINTS[session_id] = Hint(user_id, account_id)


def forget(session_id: uuid.UUID) -> None:
    _HINTS.pop(session_id, None)


def current(db: DbSession, session_id: uuid.UUID) -> SessionState | None:
    """The live session with the caller's role in its account; None when it is unknown, ended or expired."""
    row = db.connection().execute(SESSION_STATEMENT, {"session_id": session_id}).one_or_none()
    if row is None:
        forget(session_id)
        return None
    remember(session_id, row.user_id, row.account_id)
    role = Role(row.role) if row.role else None
    refused = refusal(row.enabled, row.disabled) if role else None
    if refused:
        role = None
    return SessionState(session_id, row.user_id, row.account_id if role else None, role, refused)


@dataclass(frozen=True)
class Expiries:
    token_expires_at: datetime
    expires_at: datetime


def open_session(db: DbSession, user_id: uuid.UUID, account_id: uuid.UUID | None, *, token_ttl: int,
                 max_seconds: int) -> tuple[uuid.UUID, Expiries]:
    """A new session of the user (committed)."""
    session_id = uuid.uuid4()
    now = db.execute(select(func.now())).scalar_one()
    expires_at = now + timedelta(seconds=max_seconds)
    token_expires_at = min(now + timedelta(seconds=token_ttl), expires_at)
    db.add(Session(id=session_id, user_id=user_id, account_id=account_id, token_expires_at=token_expires_at,
                   expires_at=expires_at))
    # Ended sessions are removed as new ones open: a few rows per sign-in at most, by the expiry index.
    db.execute(delete(Session).where(Session.id.in_(
        select(Session.id).where(Session.expires_at < func.now()).limit(16).scalar_subquery()))
        .execution_options(synchronize_session=False))
    db.commit()
    remember(session_id, user_id, account_id)
    return session_id, Expiries(token_expires_at, expires_at)


def expiries(db: DbSession, session_id: uuid.UUID) -> Expiries:
    row = db.execute(select(Session.token_expires_at, Session.expires_at).where(Session.id == session_id)).one()
    return Expiries(row.token_expires_at, row.expires_at)


def select_account(db: DbSession, session_id: uuid.UUID, user_id: uuid.UUID, account_id: uuid.UUID) -> None:
    """The session now acts in `account_id` (the caller's membership is checked by the caller)."""
    db.execute(update(Session).where(Session.id == session_id).values(account_id=account_id)
               .execution_options(synchronize_session=False))
    db.commit()
    remember(session_id, user_id, account_id)


def refresh(db: DbSession, session_id: uuid.UUID, token_ttl: int) -> Expiries | None:
    """Extend the session's token by `token_ttl` seconds from now, never past the session's end."""
    row = db.execute(update(Session).where(Session.id == session_id, *_LIVE)
                     .values(token_expires_at=func.least(func.now() + timedelta(seconds=token_ttl),
                                                         Session.expires_at))
                     .returning(Session.token_expires_at, Session.expires_at)
                     .execution_options(synchronize_session=False)).one_or_none()
    db.commit()
    return Expiries(row.token_expires_at, row.expires_at) if row is not None else None


def terminate(db: DbSession, session_id: uuid.UUID) -> None:
    db.execute(delete(Session).where(Session.id == session_id).execution_options(synchronize_session=False))
    db.commit()
    forget(session_id)
