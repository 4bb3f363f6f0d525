"""Identical requests in flight are converted once: `builds.waits_for`.

A submission identical to one of its app's builds that no worker has claimed yet (same request fingerprint, same
effective columns: images, usernames, options, enclave size) records that build in `waits_for` and is not
published; when the leader succeeds, its worker serves the waiting builds whose sealed credentials open to the
leader's (common/store/followers.py); any other end releases them to be converted on their own. The sweeper
releases followers whose leader ended or vanished (no foreign key: a deleted leader is just gone).
`nitroconv_submit_build` answers one more column, `waits_for` (the API publishes only when it is NULL), so it is
dropped and created again in this one transaction; its rules are otherwise 0011's.

Revision ID: 0012
Revises: 0011
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = '0012'
down_revision = '0011'
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
               app_group_id uuid, waits_for uuid)
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
    -- An identical request of the app that no worker has claimed yet: this build waits for it and is served by it
    -- (common/store/followers.py), so it is not published. `attempts = 0`: one that failed once leads nothing.
    SELECT b.id INTO waits_for
      FROM builds b
     WHERE b.app_id = p_app_id AND b.request_fingerprint = p_request_fingerprint
       AND b.conversion_state = 'QUEUED' AND b.waits_for IS NULL AND b.attempts = 0 AND NOT b.cancel_requested
       AND b.input_image_name = p_input_image_name AND b.output_image_name = p_output_image_name
       AND b.input_username IS NOT DISTINCT FROM p_input_username
       AND b.output_username IS NOT DISTINCT FROM p_output_username
       AND b.converter_options = p_converter_options AND b.cpu_count = p_cpu_count
       AND b.mem_size IS NOT DISTINCT FROM p_mem_size
       AND b.enable_overlay_filesystem_persistence = p_enable_overlay_filesystem_persistence
     ORDER BY b.created_at
     LIMIT 1;
    INSERT INTO builds AS b (
        id, account_id, app_id, created_by, idempotency_key, request_fingerprint, input_image_name,
        output_image_name, input_username, output_username, input_credentials, output_credentials,
        converter_options, cpu_count, mem_size, enable_overlay_filesystem_persistence, approval_status,
        conversion_state, progress, attempts, cancel_requested, exposed_ports, warnings, enqueued_at, waits_for)
    VALUES (
        p_id, p_account_id, p_app_id, p_user_id, p_idempotency_key, p_request_fingerprint, p_input_image_name,
        p_output_image_name, p_input_username, p_output_username, p_input_credentials, p_output_credentials,
        p_converter_options, p_cpu_count, p_mem_size, p_enable_overlay_filesystem_persistence, 'PENDING',
        'QUEUED', 0.0, 0, false, '[]'::jsonb, '[]'::jsonb, now(), waits_for)
    ON CONFLICT ON CONSTRAINT uq_builds_account_idempotency_key DO NOTHING
    RETURNING b.created_at, b.updated_at, b.approval_updated_at
         INTO stamped_created_at, stamped_updated_at, stamped_approval_updated_at;
    outcome := CASE WHEN FOUND THEN 'created' ELSE 'conflict' END;
    RETURN NEXT;
END
$fn$
"""


def upgrade() -> None:
    op.add_column('builds', sa.Column('waits_for', postgresql.UUID(as_uuid=True), nullable=True))
    # The submission's lookup of a leader, and the workers' and the sweeper's of a leader's followers.
    op.create_index('ix_builds_queued_request', 'builds', ['app_id', 'request_fingerprint'],
                    postgresql_where=sa.text("conversion_state = 'QUEUED' AND waits_for IS NULL"))
    op.create_index('ix_builds_waits_for', 'builds', ['waits_for'], postgresql_where=sa.text('waits_for IS NOT NULL'))
    op.execute(f"DROP FUNCTION nitroconv_submit_build({_SIGNATURE})")
    op.execute(_FUNCTION)


def downgrade() -> None:
    from importlib import import_module

    op.execute(f"DROP FUNCTION nitroconv_submit_build({_SIGNATURE})")
    op.execute(import_module("common.store.migrations.versions.0011_account_status")._FUNCTION)
    op.drop_index('ix_builds_waits_for', table_name='builds')
    op.drop_index('ix_builds_queued_request', table_name='builds')
    op.drop_column('builds', 'waits_for')
