"""A build's network policy as measured into its EIF (converter_options.network with the image's defaults filled in).

Revision ID: 0010
Revises: 0009
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0010'
down_revision = '0009'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('builds', sa.Column('network', postgresql.JSONB(), nullable=True))


def downgrade() -> None:
    op.drop_column('builds', 'network')
