"""A submission's one round trip: `nitroconv_submit_build` (migration 0006) in autocommit.

The caller's role, the app under the account's lock, the quota check and the insert are one statement and
one transaction: no BEGIN, no COMMIT and three fewer statements per submission than running them one by one.
The statement goes straight to the driver as a prepared statement (api/prepared.py): SQLAlchemy's execution
of one statement with nineteen parameters cost the API more CPU than the rest of the round trip.
"""
from __future__ import annotations

import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

import psycopg2
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError

from api.prepared import PreparedForm, execute_form
from common.store.accounts import RANK, Role

_PARAMS = ("session_id", "user_id", "account_id", "roles", "app_id", "app_settings", "quota", "id", "idempotency_key",
           "request_fingerprint", "input_image_name", "output_image_name", "input_username", "output_username",
           "input_credentials", "output_credentials", "converter_options", "cpu_count", "mem_size",
           "enable_overlay_filesystem_persistence")
SUBMIT_SQL = (
    "SELECT outcome, member_role, app_name, app_description, app_settings, unfinished, stamped_created_at, "
    "stamped_updated_at, stamped_approval_updated_at, session_user_id, session_account_id "
    "FROM nitroconv_submit_build("
    + ", ".join(f"%({name})s" for name in _PARAMS) + ")")
SUBMIT_FORM = PreparedForm.of("nitroconv_submit", SUBMIT_SQL)


@dataclass(frozen=True)
class Outcome:
    """What the function answered; see migrations 0006 and 0007 for the meaning of each `outcome`."""

    outcome: str
    role: str | None
    app_name: str | None
    app_description: str | None
    app_settings: str | None  # the app's default_build_settings as jsonb text
    unfinished: int | None
    created_at: datetime | None
    updated_at: datetime | None
    approval_updated_at: datetime | None
    session_user_id: uuid.UUID | str | None  # with `moved`: the session's user and account now
    session_account_id: uuid.UUID | str | None


def roles_at_least(role: Role) -> list[str]:
    return [r.value for r in Role if RANK[r] >= RANK[role]]


def _driver_value(value: object) -> object:
    # Text for the driver: the function's signature gives each parameter its type.
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, dict):
        return json.dumps(value)
    return value


def submit_build(engine: Engine, values: Mapping[str, object], *, user_id: uuid.UUID, account_id: uuid.UUID,
                 roles: list[str], app_settings: str | None, quota: int | None,
                 session_id: uuid.UUID | None = None) -> Outcome:
    """Run the submission's statement; `values` are the build's columns as buildstore.build_row gives them.

    `app_settings`: the app's default_build_settings (jsonb text) the values were merged with; None when
    not known yet (the answer is then `stale`, with the current ones). `session_id`: the caller's session, which
    must be live and still be `user_id`'s in `account_id` (else `session` or `moved`); None skips the check. A database error is raised as
    SQLAlchemy's DBAPIError (the API's 503 or 500), a lost connection invalidated as SQLAlchemy would.
    """
    params = {name: _driver_value(values[name]) for name in _PARAMS if name in values}
    params.update(session_id=str(session_id) if session_id else None, user_id=str(user_id),
                  account_id=str(account_id), roles=roles, app_settings=app_settings, quota=quota)
    raw = engine.raw_connection()
    try:
        dbapi = raw.dbapi_connection
        assert dbapi is not None
        # Autocommit: the statement is its own transaction, committed by the server as it ends.
        dbapi.autocommit = True
        try:
            cursor = dbapi.cursor()
            try:
                cursor.execute(execute_form(SUBMIT_FORM, raw.info, cursor), params)
                row = cursor.fetchone()
            finally:
                cursor.close()
        finally:
            if not dbapi.closed:
                dbapi.autocommit = False
    except psycopg2.Error as exc:
        lost = engine.dialect.is_disconnect(exc, dbapi, None)
        if lost:
            # What SQLAlchemy does on a lost connection: this one is dropped, and the pool's older ones are
            # replaced at their next checkout (they most likely died with it).
            engine.pool._invalidate(raw, exc)
        raise DBAPIError.instance(SUBMIT_SQL, params, exc, psycopg2.Error, connection_invalidated=lost) from exc
    finally:
        raw.close()
    assert row is not None  # the function always answers one row
    return Outcome(*row)
