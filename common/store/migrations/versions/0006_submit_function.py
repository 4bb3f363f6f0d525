"""A submission in one statement: the caller's role, the app under the account's lock, the quota and the insert.

The API calls `nitroconv_submit_build(...)` in autocommit, so the whole submission is one round trip and one
transaction (api/submission.py). It is a PL/pgSQL function, not one SQL statement with CTEs, because the quota
count must see every submission that committed while this one waited for the account's lock: in READ
COMMITTED each statement of a volatile function takes a fresh snapshot, and the count runs after the lock is
granted; the CTEs of a single statement would all share the snapshot taken before the wait.

The app's `default_build_settings` are merged with the request by the API, which passes the settings it
merged with (as jsonb text): when they are not the app's current ones the function inserts nothing and answers
`stale` with the current ones, so the merge stays in one place (api/services/builds.py).

Outcomes: `role` (no membership, or a role not in `p_roles`), `no_app`, `exists` (the Idempotency-Key was
used before: no lock, no quota), `stale`, `quota` (with the capped count), `created`, `conflict` (a
concurrent submission took the Idempotency-Key first).

Revision ID: 0006
Revises: 0005
"""
from __future__ import annotations

from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# The literal predicate of the partial index ix_builds_unfinished (0005), so the count is served by it.
_UNFINISHED = "conversion_state IN ('QUEUED', 'PULLING', 'BUILDING', 'MEASURING', 'PUSHING')"
_SIGNATURE = ("uuid, uuid, text[], uuid, text, integer, uuid, text, text, text, text, text, text, bytea, bytea, "
              "jsonb, integer, bigint, boolean")

_FUNCTION = f"""
CREATE FUNCTION nitroconv_submit_build(
    p_user_id uuid, p_account_id uuid, p_roles text[], p_app_id uuid, p_app_settings text, p_quota integer,
    p_id uuid, p_idempotency_key text, p_request_fingerprint text,
    p_input_image_name text, p_output_image_name text, p_input_username text, p_output_username text,
    p_input_credentials bytea, p_output_credentials bytea, p_converter_options jsonb,
    p_cpu_count integer, p_mem_size bigint, p_enable_overlay_filesystem_persistence boolean)
RETURNS TABLE (outcome text, member_role text, app_name text, app_description text, app_settings text,
               unfinished integer, stamped_created_at timestamptz, stamped_updated_at timestamptz,
               stamped_approval_updated_at timestamptz)
LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
    v_retry boolean := false;
BEGIN
    SELECT m.role INTO member_role FROM memberships m WHERE m.user_id = p_user_id AND m.account_id = p_account_id;
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
    op.execute(_FUNCTION)


def downgrade() -> None:
    op.execute(f"DROP FUNCTION nitroconv_submit_build({_SIGNATURE})")
