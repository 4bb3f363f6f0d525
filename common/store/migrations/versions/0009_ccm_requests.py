"""What CCM's documented requests set that 0008 left out: an app's `certificate_policy`, `signers` and
`group_id`; an account's `default_group_id`, `marketplace_group_id` and `azure_cvm_pcr_priority`; a user's
`first_name` and `last_name`; a build's `configs` (application configs attached to it, by config id).
They are recorded and returned, and `GET /v1/builds?config_id=` finds builds by their configs.

Revision ID: 0009
Revises: 0008
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None

_COLUMNS = (
    ('apps', 'certificate_policy', postgresql.JSONB(), None),
    ('apps', 'signers', postgresql.JSONB(), "'[]'::jsonb"),
    ('apps', 'group_id', postgresql.UUID(as_uuid=True), None),
    ('accounts', 'default_group_id', postgresql.UUID(as_uuid=True), None),
    ('accounts', 'marketplace_group_id', postgresql.UUID(as_uuid=True), None),
    ('accounts', 'azure_cvm_pcr_priority', postgresql.JSONB(), None),
    ('users', 'first_name', sa.String(length=255), None),
    ('users', 'last_name', sa.String(length=255), None),
    ('builds', 'configs', postgresql.JSONB(), "'{}'::jsonb"),
)


def upgrade() -> None:
    for table, name, kind, default in _COLUMNS:
        op.add_column(table, sa.Column(name, kind, nullable=default is None,
                                       server_default=sa.text(default) if default else None))
    # `?config_id=` asks which builds carry a key of `configs`.
    op.create_index('ix_builds_configs', 'builds', ['configs'], postgresql_using='gin')


def downgrade() -> None:
    op.drop_index('ix_builds_configs', table_name='builds')
    for table, name, _, _ in reversed(_COLUMNS):
        op.drop_column(table, name)
