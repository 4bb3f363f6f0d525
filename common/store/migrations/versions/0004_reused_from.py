"""Builds record which earlier conversion they reused (issue 8, conversion cache); NULL when converted afresh.

Revision ID: 0004
Revises: 0003
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('builds', sa.Column('reused_from', sa.String(length=200), nullable=True))


def downgrade() -> None:
    op.drop_column('builds', 'reused_from')
