"""Builds that wait for an identical build in flight (`builds.waits_for`, migration 0012).

The submission function makes a build wait instead of queueing it when an identical request of the same app is
QUEUED and unclaimed. Its leader's worker, once the leader SUCCEEDED, serves the followers whose credentials are
the leader's (the worker compares them unsealed; the database only holds them sealed): each walks QUEUED → … →
SUCCEEDED with the leader's results, `reused_from` naming the leader, and gets its approval task. Any follower it
does not serve is released: it stops waiting and gets a broker message of its own. Followers whose leader ended
some other way, or vanished, are released by the sweeper (`release_orphans`). Like common/store/builds.py, every
status write here is a compare-and-set with its `build_events` rows in the same statement.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, text
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.orm import Session

from common.store.status import PIPELINE, ConversionState

# The path a served follower walks, in the status machine's order: one event per edge, as a worker would write.
_PATH = (ConversionState.QUEUED, *PIPELINE, ConversionState.SUCCEEDED)
_STEPS = ", ".join(f"({n}, '{a.value}', '{b.value}')" for n, (a, b) in enumerate(zip(_PATH, _PATH[1:], strict=False)))
_UNFINISHED = ", ".join(f"'{s.value}'" for s in (ConversionState.QUEUED, *PIPELINE))
# The results a follower takes from its leader (the columns `builds.succeed` writes).
_RESULTS = ("input_digest", "output_digest", "output_size", "eif_size", "eif_sha256", "pcr0", "pcr1", "pcr2", "pcr8",
            "exposed_ports", "warnings", "docker_version", "mem_size", "boot_check", "network")

_WAITING = text(
    "SELECT id, input_credentials, output_credentials FROM builds "
    "WHERE waits_for = :leader AND conversion_state = 'QUEUED' AND NOT cancel_requested "
    "ORDER BY created_at FOR UPDATE SKIP LOCKED")

_SERVE = text(f"""
WITH served AS (
    UPDATE builds f
       SET conversion_state = 'SUCCEEDED', waits_for = NULL, progress = 1.0, updated_at = now(), started_at = now(),
           claimed_at = now(), finished_at = now(), reused_from = l.id::text, pending_task_id = gen_random_uuid(),
           {", ".join(f"{c} = l.{c}" for c in _RESULTS)}
      FROM builds l
     WHERE l.id = :leader AND l.conversion_state = 'SUCCEEDED'
       AND f.id = ANY(:ids) AND f.waits_for = :leader AND f.conversion_state = 'QUEUED' AND NOT f.cancel_requested
    RETURNING f.id, f.account_id, f.created_by, f.pending_task_id
), steps(n, src, dst) AS (VALUES {_STEPS}
), conversion_events AS (
    INSERT INTO build_events (build_id, machine, from_state, to_state, actor, reason)
    SELECT served.id, 'conversion', steps.src, steps.dst, :actor, :reason FROM served CROSS JOIN steps
     ORDER BY served.id, steps.n
), tasks AS (
    INSERT INTO tasks (id, account_id, build_id, type, status, requester_id, approved_by_system)
    SELECT pending_task_id, account_id, id, 'BUILD_WHITELIST', 'INPROGRESS', created_by, false FROM served
), task_events AS (
    INSERT INTO build_events (build_id, machine, from_state, to_state, actor, reason)
    SELECT id, 'task', '', 'INPROGRESS', 'system', 'conversion succeeded' FROM served
)
SELECT id, pending_task_id FROM served
""").bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))

_RELEASE = text(
    "UPDATE builds SET waits_for = NULL, enqueued_at = now() "
    "WHERE waits_for = :leader AND conversion_state = 'QUEUED' AND (CAST(:ids AS uuid[]) IS NULL OR id = ANY(:ids)) "
    "RETURNING id").bindparams(bindparam("ids", type_=ARRAY(UUID(as_uuid=True))))

_RELEASE_ORPHANS = text(f"""
UPDATE builds SET waits_for = NULL, enqueued_at = now()
 WHERE id IN (SELECT f.id FROM builds f
               WHERE f.waits_for IS NOT NULL AND f.conversion_state = 'QUEUED'
                 AND NOT EXISTS (SELECT 1 FROM builds l WHERE l.id = f.waits_for AND l.conversion_state IN ({_UNFINISHED}))
               ORDER BY f.created_at LIMIT :limit FOR UPDATE SKIP LOCKED)
RETURNING id
""")


@dataclass(frozen=True)
class Waiting:
    """A follower as its leader's worker sees it: the credentials stay sealed until the worker compares them."""

    build_id: uuid.UUID
    input_credentials: bytes | None
    output_credentials: bytes | None


def waiting(session: Session, leader: uuid.UUID) -> list[Waiting]:
    """The leader's followers still waiting, oldest first, locked until the transaction ends (others are skipped)."""
    return [Waiting(row[0], _bytes(row[1]), _bytes(row[2])) for row in session.execute(_WAITING, {"leader": leader})]


def _bytes(value: object) -> bytes | None:
    # A textual query's bytea comes back as the driver's buffer (psycopg2: memoryview), not as bytes.
    return None if value is None else bytes(value)  # type: ignore[call-overload]


def serve(session: Session, leader: uuid.UUID, build_ids: Sequence[uuid.UUID], *, actor: str
          ) -> list[tuple[uuid.UUID, uuid.UUID]]:
    """The followers `build_ids` of the SUCCEEDED `leader` take its results; (build id, task id) of each served.

    A follower that stopped waiting meanwhile (cancelled, released) is left alone.
    """
    if not build_ids:
        return []
    rows = session.execute(_SERVE, {"leader": leader, "ids": list(build_ids), "actor": actor,
                                    "reason": f"served by the identical build {leader}"})
    return [(row[0], row[1]) for row in rows]


def release(session: Session, leader: uuid.UUID, build_ids: Sequence[uuid.UUID] | None = None) -> list[uuid.UUID]:
    """Followers of `leader` (all, or those of `build_ids`) stop waiting; the caller publishes the ids returned
    after the commit (until then, or if that publish is lost, the sweeper's re-send covers them)."""
    if build_ids is not None and not build_ids:
        return []
    ids = list(build_ids) if build_ids is not None else None
    return list(session.execute(_RELEASE, {"leader": leader, "ids": ids}).scalars())


def release_orphans(session: Session, limit: int) -> list[uuid.UUID]:
    """Followers whose leader ended without serving them (failed, cancelled, its worker died after succeeding) or
    no longer exists; they stop waiting, and the caller publishes them."""
    return list(session.execute(_RELEASE_ORPHANS, {"limit": limit}).scalars())
