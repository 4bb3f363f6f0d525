"""Fair scheduling and cheap quotas (issue 8, "Scale").

`not_before` holds a requeued conversion back for its retry backoff (any worker may claim any QUEUED
build, so the backoff must live in the row, not only in a delayed message). `claimed_at` is when a
worker last claimed the build: the claim serves the account served least recently first. The partial
index holds only unfinished builds, so the per-account quota count and the running count per account
cost the unfinished rows, not an account's whole history.

Revision ID: 0005
Revises: 0004
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None

_UNFINISHED = "conversion_state IN ('QUEUED', 'PULLING', 'BUILDING', 'MEASURING', 'PUSHING')"


def upgrade() -> None:
    op.add_column('builds', sa.Column('not_before', sa.DateTime(timezone=True), nullable=True))
    op.add_column('builds', sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=True))
    op.create_index('ix_builds_account_claimed', 'builds', ['account_id', 'claimed_at'])
    op.create_index('ix_builds_unfinished', 'builds', ['account_id', 'conversion_state', 'created_at'],
                    postgresql_where=sa.text(_UNFINISHED))


def downgrade() -> None:
    op.drop_index('ix_builds_unfinished', table_name='builds')
    op.drop_index('ix_builds_account_claimed', table_name='builds')
    op.drop_column('builds', 'claimed_at')
    op.drop_column('builds', 'not_before')
