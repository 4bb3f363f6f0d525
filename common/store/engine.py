"""Database engines and sessions; creating the database when missing; the migration entry point."""
from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.orm import Session, sessionmaker

from common.errors import DatabaseUnavailable

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"


@functools.cache
def engine_for(database_url: str, pool_size: int = 10) -> Engine:
    """One pooled engine per URL per process.

    No pre-ping (it costs a round trip per request): a connection that died with Postgres fails its
    first statement, SQLAlchemy then invalidates the whole pool, and the next checkout reconnects, so
    the service recovers by itself. connect_timeout bounds a request while Postgres is unreachable.
    """
    return create_engine(
        make_url(database_url).set(drivername="postgresql+psycopg2"),
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_timeout=5,
        pool_recycle=1800,
        connect_args={"connect_timeout": 3, "application_name": "nitroconv"},
    )


@functools.cache
def session_factory(database_url: str) -> sessionmaker[Session]:
    return sessionmaker(bind=engine_for(database_url), expire_on_commit=False)


@contextmanager
def session_scope(database_url: str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error; DB outages become DatabaseUnavailable."""
    session = session_factory(database_url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_connection_error(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and (
        exc.connection_invalidated or type(exc.orig).__name__ in {"OperationalError", "InterfaceError"})


def ping(database_url: str) -> None:
    """Raise DatabaseUnavailable unless a `SELECT 1` round-trips."""
    try:
        with engine_for(database_url).connect() as conn:
            conn.execute(text("SELECT 1"))
    except DBAPIError as exc:
        raise DatabaseUnavailable("the database is unreachable") from exc


def create_database_if_missing(database_url: str) -> bool:
    """Create the URL's database via the server's `postgres` database. True when it was created."""
    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    name = url.database
    if not name:
        raise ValueError("database URL names no database")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT",
                          connect_args={"connect_timeout": 5})
    try:
        with admin.connect() as conn:
            exists = conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).scalar()
            if exists:
                return False
            quoted = conn.dialect.identifier_preparer.quote(name)
            conn.execute(text(f"CREATE DATABASE {quoted}"))
            return True
    finally:
        admin.dispose()


def drop_database(database_url: str) -> None:
    """Drop the URL's database (tests), terminating its other sessions first."""
    url = make_url(database_url).set(drivername="postgresql+psycopg2")
    admin = create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            quoted = conn.dialect.identifier_preparer.quote(url.database or "")
            conn.execute(text(f"DROP DATABASE IF EXISTS {quoted} WITH (FORCE)"))
    finally:
        admin.dispose()


def migrate(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade head` without an ini file, so every caller migrates the same way."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    command.upgrade(config, revision)
