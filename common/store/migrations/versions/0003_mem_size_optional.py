"""builds.mem_size may be NULL: an omitted mem_size is sized by the worker from the EIF (issue 5 item 6).

The CHECK `mem_size > 0` of 0001 still holds for every size given or recorded (NULL passes a CHECK).

Revision ID: 0003
Revises: 0002
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.alter_column('builds', 'mem_size', existing_type=sa.BigInteger(), nullable=True)


def downgrade() -> None:
    # A build that never got sized has no honest value; 0 would break the CHECK, so those rows get the
    # service's old fixed default.
    op.execute("UPDATE builds SET mem_size = 2048 WHERE mem_size IS NULL")
    op.alter_column('builds', 'mem_size', existing_type=sa.BigInteger(), nullable=False)
