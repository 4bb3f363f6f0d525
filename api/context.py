"""Per-app settings and per-request database sessions."""
from __future__ import annotations

from flask import current_app, g
from sqlalchemy.orm import Session

from common.settings import Settings
from common.store.engine import session_factory


def settings() -> Settings:
    value = current_app.extensions["nitroconv.settings"]
    assert isinstance(value, Settings)
    return value


def db() -> Session:
    """The request's session, opened on first use and closed at teardown."""
    session = g.get("db_session")
    if session is None:
        session = session_factory(settings().database_url)()
        g.db_session = session
    return session


def close_db(_: BaseException | None = None) -> None:
    session = g.pop("db_session", None)
    if session is not None:
        try:
            session.close()
        except Exception:  # noqa: BLE001 - a dead connection must not turn a response into a 500
            pass
