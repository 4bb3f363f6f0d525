"""Per-attempt scratch directories: their names (build id + lease token) and reaping those of dead attempts."""
from __future__ import annotations

import logging
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from common.store.models import Build
from common.store.status import RUNNING

log = logging.getLogger(__name__)
SCRATCH = "scratch"


def scratch_root(state_dir: Path) -> Path:
    return state_dir / SCRATCH


def scratch_dir(state_dir: Path, build_id: uuid.UUID, fence: uuid.UUID) -> Path:
    """The directory of one attempt; the lease token in its name ties it to exactly one lease."""
    return scratch_root(state_dir) / f"{build_id}.{fence.hex}"


def parse_name(name: str) -> tuple[uuid.UUID, uuid.UUID] | None:
    """(build id, lease token) from a scratch dir name; None for anything we did not create."""
    build, sep, fence = name.partition(".")
    if not sep:
        return None
    try:
        return uuid.UUID(build), uuid.UUID(hex=fence)
    except ValueError:
        return None


def reap(state_dir: Path, live_leases: Callable[[Iterable[uuid.UUID]], set[tuple[uuid.UUID, uuid.UUID]]]) -> list[Path]:
    """Remove the scratch dirs whose lease is no longer held. Returns what was removed.

    `live_leases(build_ids)` answers which (build id, lease token) pairs still hold a lease; it is the
    system of record (Postgres), so a dir is only removed once no attempt can still be writing to it:
    a worker whose lease was taken over stops at its next heartbeat without writing anything.
    """
    root = scratch_root(state_dir)
    try:
        entries = [(p, parse_name(p.name)) for p in root.iterdir()]
    except FileNotFoundError:
        return []
    ours = [(p, key) for p, key in entries if key is not None]
    if not ours:
        return []
    live = live_leases({key[0] for _, key in ours})
    removed = []
    for path, key in ours:
        if key in live:
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            removed.append(path)
    if removed:
        log.info("reaped %d scratch dir(s) of dead attempts", len(removed))
    return removed


def live_leases(session: Session, build_ids: Iterable[uuid.UUID]) -> set[tuple[uuid.UUID, uuid.UUID]]:
    """The (build id, lease token) pairs of `build_ids` whose attempt is still running."""
    rows = session.execute(select(Build.id, Build.lease_owner).where(
        Build.id.in_(list(build_ids)), Build.conversion_state.in_([st.value for st in RUNNING]),
        Build.lease_owner.is_not(None))).all()
    return {(row[0], row[1]) for row in rows if row[1] is not None}


def reap_dead(state_dir: Path, session: Session) -> list[Path]:
    """`reap` with Postgres as the judge of which leases are live."""
    return reap(state_dir, lambda ids: live_leases(session, ids))
