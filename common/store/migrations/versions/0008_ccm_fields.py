"""The fields CCM's API document gives accounts and apps that the seed did not: an account's `node_enrollment`
and `component` (required in CCM's Account) and `custom_logo`; an app's `isvprodid`, `isvsvn`, `mem_size`,
`threads` (required in CCM's App), `allowed_domains`, `labels`, `custom_metadata` and `advanced_settings`.
They are recorded and returned; builds still take their sizes from `default_build_settings.nitro_enclaves`.

Revision ID: 0008
Revises: 0007
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None

_APP_COLUMNS = (
    ('isvprodid', sa.Integer(), '0'), ('isvsvn', sa.Integer(), '0'), ('mem_size', sa.BigInteger(), '2048'),
    ('threads', sa.Integer(), '2'), ('allowed_domains', postgresql.JSONB(), "'[]'::jsonb"),
    ('labels', postgresql.JSONB(), "'{}'::jsonb"), ('custom_metadata', postgresql.JSONB(), "'{}'::jsonb"),
    ('advanced_settings', postgresql.JSONB(), "'{}'::jsonb"),
)


def upgrade() -> None:
    op.add_column('accounts', sa.Column(
        'node_enrollment', postgresql.JSONB(), nullable=False,
        server_default=sa.text("'{\"attestation_enforcement_disabled_insecure\": false}'::jsonb")))
    op.add_column('accounts', sa.Column('component', sa.String(length=32), nullable=False,
                                        server_default=sa.text("'DEFAULT'")))
    op.add_column('accounts', sa.Column('custom_logo', sa.Text(), nullable=True))
    for name, kind, default in _APP_COLUMNS:
        op.add_column('apps', sa.Column(name, kind, nullable=False, server_default=sa.text(default)))


def downgrade() -> None:
    for name, _, _ in reversed(_APP_COLUMNS):
        op.drop_column('apps', name)
    for name in ('custom_logo', 'component', 'node_enrollment'):
        op.drop_column('accounts', name)
