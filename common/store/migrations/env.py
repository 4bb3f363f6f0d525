"""Alembic environment: migrations run online against the configured URL only."""
from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from common.store.models import Base

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    url = make_url(config.get_main_option("sqlalchemy.url") or "").set(drivername="postgresql+psycopg2")
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, target_metadata=target_metadata)
            with context.begin_transaction():
                # Concurrent `make up`s or test sessions migrate one at a time.
                connection.exec_driver_sql("SELECT pg_advisory_xact_lock(7361223)")
                context.run_migrations()
    finally:
        engine.dispose()


run_migrations_online()
