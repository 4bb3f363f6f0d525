"""Initial schema: accounts, users, memberships, apps, builds, tasks, build_events.

Revision ID: 0001
Revises: (none)
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('accounts',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('users',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('password_hash', sa.String(length=255), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('email')
    )
    op.create_table('apps',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('account_id', sa.UUID(), nullable=False),
    sa.Column('name', sa.String(length=255), nullable=False),
    sa.Column('description', sa.Text(), server_default='', nullable=False),
    sa.Column('input_image_name', sa.Text(), nullable=True),
    sa.Column('output_image_name', sa.Text(), nullable=True),
    sa.Column('default_build_settings', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'{}'"), nullable=False),
    sa.Column('auto_approve', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'name', name='uq_apps_account_name')
    )
    op.create_index(op.f('ix_apps_account_id'), 'apps', ['account_id'], unique=False)
    op.create_table('memberships',
    sa.Column('user_id', sa.UUID(), nullable=False),
    sa.Column('account_id', sa.UUID(), nullable=False),
    sa.Column('role', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['user_id'], ['users.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('user_id', 'account_id'),
    sa.CheckConstraint("role IN ('READER','WRITER','MANAGER')", name='ck_memberships_role'),
    )
    op.create_table('builds',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('account_id', sa.UUID(), nullable=False),
    sa.Column('app_id', sa.UUID(), nullable=False),
    sa.Column('created_by', sa.UUID(), nullable=True),
    sa.Column('idempotency_key', sa.String(length=255), nullable=True),
    sa.Column('request_fingerprint', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('input_image_name', sa.Text(), nullable=False),
    sa.Column('output_image_name', sa.Text(), nullable=False),
    sa.Column('input_username', sa.Text(), nullable=True),
    sa.Column('output_username', sa.Text(), nullable=True),
    sa.Column('input_credentials', sa.LargeBinary(), nullable=True),
    sa.Column('output_credentials', sa.LargeBinary(), nullable=True),
    sa.Column('converter_options', postgresql.JSONB(astext_type=sa.Text()), nullable=False),
    sa.Column('cpu_count', sa.Integer(), nullable=False),
    sa.Column('mem_size', sa.BigInteger(), nullable=False),
    sa.Column('enable_overlay_filesystem_persistence', sa.Boolean(), nullable=False),
    sa.Column('approval_status', sa.String(length=16), nullable=False),
    sa.Column('approval_updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('approval_reason', sa.Text(), nullable=True),
    sa.Column('pending_task_id', sa.UUID(), nullable=True),
    sa.Column('conversion_state', sa.String(length=16), nullable=False),
    sa.Column('progress', sa.Float(), server_default=sa.text('0'), nullable=False),
    sa.Column('error_code', sa.String(length=64), nullable=True),
    sa.Column('error_message', sa.Text(), nullable=True),
    sa.Column('attempts', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('lease_owner', sa.UUID(), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('enqueued_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('finished_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('input_digest', sa.String(length=80), nullable=True),
    sa.Column('output_digest', sa.String(length=80), nullable=True),
    sa.Column('output_size', sa.BigInteger(), nullable=True),
    sa.Column('eif_size', sa.BigInteger(), nullable=True),
    sa.Column('eif_sha256', sa.String(length=64), nullable=True),
    sa.Column('pcr0', sa.String(length=96), nullable=True),
    sa.Column('pcr1', sa.String(length=96), nullable=True),
    sa.Column('pcr2', sa.String(length=96), nullable=True),
    sa.Column('pcr8', sa.String(length=96), nullable=True),
    sa.Column('exposed_ports', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"), nullable=False),
    sa.Column('warnings', postgresql.JSONB(astext_type=sa.Text()), server_default=sa.text("'[]'"), nullable=False),
    sa.Column('docker_version', sa.String(length=64), nullable=True),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['app_id'], ['apps.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('account_id', 'idempotency_key', name='uq_builds_account_idempotency_key'),
    # The machines' state names, so a write that bypasses the store still cannot invent one.
    sa.CheckConstraint("conversion_state IN ('QUEUED','PULLING','BUILDING','MEASURING','PUSHING',"
                       "'SUCCEEDED','FAILED','CANCELLED')", name='ck_builds_conversion_state'),
    sa.CheckConstraint("approval_status IN ('PENDING','WHITELISTED','REJECTED')", name='ck_builds_approval_status'),
    sa.CheckConstraint('cpu_count >= 1 AND mem_size > 0', name='ck_builds_resources'),
    )
    op.create_index('ix_builds_account_created', 'builds', ['account_id', 'created_at'], unique=False)
    op.create_index(op.f('ix_builds_app_id'), 'builds', ['app_id'], unique=False)
    op.create_index('ix_builds_conversion_state', 'builds', ['conversion_state'], unique=False)
    op.create_table('build_events',
    sa.Column('id', sa.BigInteger(), autoincrement=True, nullable=False),
    sa.Column('build_id', sa.UUID(), nullable=False),
    sa.Column('machine', sa.String(length=16), nullable=False),
    sa.Column('from_state', sa.String(length=16), nullable=False),
    sa.Column('to_state', sa.String(length=16), nullable=False),
    sa.Column('actor', sa.String(length=80), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_index(op.f('ix_build_events_build_id'), 'build_events', ['build_id'], unique=False)
    op.create_table('tasks',
    sa.Column('id', sa.UUID(), nullable=False),
    sa.Column('account_id', sa.UUID(), nullable=False),
    sa.Column('build_id', sa.UUID(), nullable=False),
    sa.Column('type', sa.String(length=32), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('requester_id', sa.UUID(), nullable=True),
    sa.Column('approver_id', sa.UUID(), nullable=True),
    sa.Column('approved_by_system', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('denial_reason', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), server_default=sa.text('now()'), nullable=False),
    sa.ForeignKeyConstraint(['account_id'], ['accounts.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['build_id'], ['builds.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('build_id'),
    sa.CheckConstraint("status IN ('INPROGRESS','SUCCESS','DENIED')", name='ck_tasks_status'),
    )
    op.create_index('ix_tasks_account_created', 'tasks', ['account_id', 'created_at'], unique=False)


def downgrade() -> None:
    op.drop_index('ix_tasks_account_created', table_name='tasks')
    op.drop_table('tasks')
    op.drop_index(op.f('ix_build_events_build_id'), table_name='build_events')
    op.drop_table('build_events')
    op.drop_index('ix_builds_conversion_state', table_name='builds')
    op.drop_index(op.f('ix_builds_app_id'), table_name='builds')
    op.drop_index('ix_builds_account_created', table_name='builds')
    op.drop_table('builds')
    op.drop_table('memberships')
    op.drop_index(op.f('ix_apps_account_id'), table_name='apps')
    op.drop_table('apps')
    op.drop_table('users')
    op.drop_table('accounts')
