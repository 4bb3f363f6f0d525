"""Alembic migrations of the service's schema (run by `common.store.engine`)."""
