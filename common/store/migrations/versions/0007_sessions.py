"""Server-side sessions (CCM's): a bearer token names a session; the session holds the user, the selected
account and the expiries, so select_account, refresh and terminate act on the calling session at once.

A session has two expiries, as CCM's SessionInfo: `token_expires_at` (moved forward by
/v1/sys/session/refresh) and `expires_at` (the session's end; refresh never passes it). Terminating a session
deletes its row: its token is refused from the next request on.

`nitroconv_submit_build` gains the session as its first parameter, so a submission stays one round trip: it
reads the session with the membership (by primary keys) and answers `session` for an unknown, terminated or
expired one, or `moved` (with the session's user and account) when the caller's view of the session is not
the current one (an account selected meanwhile, in another API process); the API then retries with it.
A NULL session skips the check (callers inside the service, and tests of the quota logic).

Revision ID: 0007
Revises: 0006
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_UNFINISHED = "conversion_state IN ('QUEUED', 'PULLING', 'BUILDING', 'MEASURING', 'PUSHING')"
_OLD_SIGNATURE = ("uuid, uuid, text[], uuid, text, integer, uuid, text, text, text, text, text, text, bytea, bytea, "
                  "jsonb, integer, bigint, boolean")
_SIGNATURE = "uuid, " + _OLD_SIGNATURE

_FUNCTION = f"""
CREATE FUNCTION nitroconv_submit_build(
    p_session_id uuid,
    p_user_id uuid, p_account_id uuid, p_roles text[], p_app_id uuid, p_app_settings text, p_quota integer,
    p_id uuid, p_idempotency_key text, p_request_fingerprint text,
    p_input_image_name text, p_output_image_name text, p_input_username text, p_output_username text,
    p_input_credentials bytea, p_output_credentials bytea, p_converter_options jsonb,
    p_cpu_count integer, p_mem_size bigint, p_enable_overlay_filesystem_persistence boolean)
RETURNS TABLE (outcome text, member_role text, app_name text, app_description text, app_settings text,
               unfinished integer, stamped_created_at timestamptz, stamped_updated_at timestamptz,
               stamped_approval_updated_at timestamptz, session_user_id uuid, session_account_id uuid)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_retry boolean := false;
BEGIN
    IF p_session_id IS NOT NULL THEN
        SELECT s.user_id, s.account_id, m.role INTO session_user_id, session_account_id, member_role
          FROM sessions s LEFT JOIN memberships m ON m.user_id = s.user_id AND m.account_id = s.account_id
         WHERE s.id = p_session_id AND s.token_expires_at > now() AND s.expires_at > now();
        IF NOT FOUND THEN
            outcome := 'session';
            RETURN NEXT;
            RETURN;
        END IF;
        IF session_user_id <> p_user_id OR session_account_id IS DISTINCT FROM p_account_id THEN
            outcome := 'moved';
            RETURN NEXT;
            RETURN;
        END IF;
        -- Returned only with `moved`: two uuids fewer to send and parse on every other answer.
        session_user_id := NULL;
        session_account_id := NULL;
    ELSE
        SELECT m.role INTO member_role FROM memberships m WHERE m.user_id = p_user_id AND m.account_id = p_account_id;
    END IF;
    IF member_role IS NULL OR NOT member_role = ANY (p_roles) THEN
        outcome := 'role';
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_idempotency_key IS NOT NULL THEN
        v_retry := EXISTS (SELECT 1 FROM builds b
                           WHERE b.account_id = p_account_id AND b.idempotency_key = p_idempotency_key);
    END IF;
    -- A retried submission returns its build even when the account is at its quota: no lock, no count.
    IF v_retry THEN
        SELECT a.name, a.description, a.default_build_settings::text INTO app_name, app_description, app_settings
          FROM apps a JOIN accounts c ON c.id = a.account_id
         WHERE a.id = p_app_id AND a.account_id = p_account_id;
    ELSE
        SELECT a.name, a.description, a.default_build_settings::text INTO app_name, app_description, app_settings
          FROM apps a JOIN accounts c ON c.id = a.account_id
         WHERE a.id = p_app_id AND a.account_id = p_account_id
           FOR UPDATE OF c;
    END IF;
    IF NOT FOUND THEN
        outcome := 'no_app';
        RETURN NEXT;
        RETURN;
    END IF;
    IF v_retry THEN
        outcome := 'exists';
        RETURN NEXT;
        RETURN;
    END IF;
    IF p_app_settings IS NULL OR app_settings <> p_app_settings THEN
        outcome := 'stale';
        RETURN NEXT;
        RETURN;
    END IF;
    -- A new statement, so a new snapshot: it sees every submission committed before the lock was granted.
    IF p_quota IS NOT NULL THEN
        SELECT count(*) INTO unfinished
          FROM (SELECT 1 FROM builds b WHERE b.account_id = p_account_id AND b.{_UNFINISHED} LIMIT p_quota) capped;
        IF unfinished >= p_quota THEN
            outcome := 'quota';
            RETURN NEXT;
            RETURN;
        END IF;
    END IF;
    INSERT INTO builds AS b (
        id, account_id, app_id, created_by, idempotency_key, request_fingerprint, input_image_name,
        output_image_name, input_username, output_username, input_credentials, output_credentials,
        converter_options, cpu_count, mem_size, enable_overlay_filesystem_persistence, approval_status,
        conversion_state, progress, attempts, cancel_requested, exposed_ports, warnings, enqueued_at)
    VALUES (
        p_id, p_account_id, p_app_id, p_user_id, p_idempotency_key, p_request_fingerprint, p_input_image_name,
        p_output_image_name, p_input_username, p_output_username, p_input_credentials, p_output_credentials,
        p_converter_options, p_cpu_count, p_mem_size, p_enable_overlay_filesystem_persistence, 'PENDING',
        'QUEUED', 0.0, 0, false, '[]'::jsonb, '[]'::jsonb, now())
    ON CONFLICT ON CONSTRAINT uq_builds_account_idempotency_key DO NOTHING
    RETURNING b.created_at, b.updated_at, b.approval_updated_at
         INTO stamped_created_at, stamped_updated_at, stamped_approval_updated_at;
    outcome := CASE WHEN FOUND THEN 'created' ELSE 'conflict' END;
    RETURN NEXT;
END
$fn$
"""


def upgrade() -> None:
    op.create_table(
        'sessions',
        sa.Column('id', postgresql.UUID(as_uuid=True), primary_key=True),
        sa.Column('user_id', postgresql.UUID(as_uuid=True), sa.ForeignKey('users.id', ondelete='CASCADE'),
                  nullable=False),
        sa.Column('account_id', postgresql.UUID(as_uuid=True), sa.ForeignKey('accounts.id', ondelete='SET NULL'),
                  nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.Column('token_expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index('ix_sessions_user_id', 'sessions', ['user_id'])
    op.create_index('ix_sessions_expires_at', 'sessions', ['expires_at'])
    op.execute(f"DROP FUNCTION nitroconv_submit_build({_OLD_SIGNATURE})")
    op.execute(_FUNCTION)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION nitroconv_submit_build({_SIGNATURE})")
    # The previous revision's function, as it created it.
    from importlib import import_module
    import_module("common.store.migrations.versions.0006_submit_function").upgrade()
    op.drop_index('ix_sessions_expires_at', table_name='sessions')
    op.drop_index('ix_sessions_user_id', table_name='sessions')
    op.drop_table('sessions')
