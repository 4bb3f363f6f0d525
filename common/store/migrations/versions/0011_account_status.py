"""Account deactivation and a member's status in an account (CCM's `account_status` and `user_account_status`).

`accounts.enabled`: a deactivated account (`false`) keeps its apps, builds and tasks, but none of its members can
act in it until one of its MANAGERs enables it again. `memberships.disabled`: a member DISABLED in an account
cannot select it or act in it (their other accounts are not affected); a MANAGER enables them again.

`nitroconv_submit_build` keeps its parameters; its answer gains `app_group_id` (the app's group, which is its
Build's `group_id`), so the function is dropped and created again in this one transaction. It gains two answers: `deactivated` (the account is deactivated,
read again under the account's lock so a deactivation that commits first is seen) and `disabled` (the caller is
disabled in the account). Both are given to members only; anyone else is answered `role` as before.

Revision ID: 0011
Revises: 0010
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None

_UNFINISHED = "conversion_state IN ('QUEUED', 'PULLING', 'BUILDING', 'MEASURING', 'PUSHING')"
_SIGNATURE = ("uuid, uuid, uuid, text[], uuid, text, integer, uuid, text, text, text, text, text, text, bytea, bytea, "
              "jsonb, integer, bigint, boolean")

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
               stamped_approval_updated_at timestamptz, session_user_id uuid, session_account_id uuid,
               app_group_id uuid)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_retry boolean := false;
    v_enabled boolean;
    v_disabled boolean;
BEGIN
    IF p_session_id IS NOT NULL THEN
        SELECT s.user_id, s.account_id, m.role, m.disabled, c.enabled
          INTO session_user_id, session_account_id, member_role, v_disabled, v_enabled
          FROM sessions s LEFT JOIN memberships m ON m.user_id = s.user_id AND m.account_id = s.account_id
               LEFT JOIN accounts c ON c.id = s.account_id
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
        SELECT m.role, m.disabled, c.enabled INTO member_role, v_disabled, v_enabled
          FROM memberships m JOIN accounts c ON c.id = m.account_id
         WHERE m.user_id = p_user_id AND m.account_id = p_account_id;
    END IF;
    -- Only a member learns the account's state; anyone else is answered `role`, as before.
    IF member_role IS NOT NULL AND NOT v_enabled THEN
        outcome := 'deactivated';
        RETURN NEXT;
        RETURN;
    END IF;
    IF member_role IS NOT NULL AND v_disabled THEN
        outcome := 'disabled';
        RETURN NEXT;
        RETURN;
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
        SELECT a.name, a.description, a.default_build_settings::text, a.group_id, c.enabled
          INTO app_name, app_description, app_settings, app_group_id, v_enabled
          FROM apps a JOIN accounts c ON c.id = a.account_id
         WHERE a.id = p_app_id AND a.account_id = p_account_id;
    ELSE
        SELECT a.name, a.description, a.default_build_settings::text, a.group_id, c.enabled
          INTO app_name, app_description, app_settings, app_group_id, v_enabled
          FROM apps a JOIN accounts c ON c.id = a.account_id
         WHERE a.id = p_app_id AND a.account_id = p_account_id
           FOR UPDATE OF c;
    END IF;
    IF NOT FOUND THEN
        outcome := 'no_app';
        RETURN NEXT;
        RETURN;
    END IF;
    -- Read again under the account's lock: a deactivation committed while this waited is seen here.
    IF NOT v_enabled THEN
        outcome := 'deactivated';
        app_name := NULL;
        app_description := NULL;
        app_settings := NULL;
        app_group_id := NULL;
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
    op.add_column('accounts', sa.Column('enabled', sa.Boolean(), nullable=False, server_default=sa.true()))
    op.add_column('memberships', sa.Column('disabled', sa.Boolean(), nullable=False, server_default=sa.false()))
    op.execute(f"DROP FUNCTION nitroconv_submit_build({_SIGNATURE})")
    op.execute(_FUNCTION)


def downgrade() -> None:
    # The previous revision's function, as 0007 created it.
    from importlib import import_module
    op.execute(f"DROP FUNCTION nitroconv_submit_build({_SIGNATURE})")
    op.execute(import_module("common.store.migrations.versions.0007_sessions")._FUNCTION)
    op.drop_column('memberships', 'disabled')
    op.drop_column('accounts', 'enabled')
