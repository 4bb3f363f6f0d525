"""Where a conversion's time went on the server: the Build's state transitions (`build_events`) as durations.

The bench owns its scratch database, so it reads the rows directly: they carry microsecond timestamps
(Postgres `now()`, the start of each transition's transaction), unlike the API's epoch seconds.
"""
from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime


def durations(created: datetime, transitions: Sequence[tuple[str, datetime]]) -> list[tuple[str, float]]:
    """Seconds spent in each state, from the Build's creation (QUEUED) through each (to_state, at) in order."""
    spans: list[tuple[str, float]] = []
    state, since = "QUEUED", created
    for to_state, at in transitions:
        spans.append((state, (at - since).total_seconds()))
        state, since = to_state, at
    return spans


def describe(spans: Sequence[tuple[str, float]]) -> str:
    return ", ".join(f"{state.lower()} {seconds:.2f}" for state, seconds in spans)


def server_spans(database_url: str, build_id: str) -> list[tuple[str, float]]:
    """The durations of one build's conversion states, read from the run's database."""
    from sqlalchemy import select

    from common.store.engine import session_scope
    from common.store.models import Build, BuildEvent

    key = uuid.UUID(build_id)
    with session_scope(database_url) as session:
        created = session.execute(select(Build.created_at).where(Build.id == key)).scalar_one()
        rows = session.execute(select(BuildEvent.to_state, BuildEvent.at)
                               .where(BuildEvent.build_id == key, BuildEvent.machine == "conversion")
                               .order_by(BuildEvent.id)).all()
    return durations(created, [(str(s), at) for s, at in rows])


def ended(database_url: str, build_ids: Sequence[str], terminal: frozenset[str]) -> dict[str, datetime]:
    """When each of `build_ids` whose conversion has ended reached its terminal state (one query)."""
    from sqlalchemy import select

    from common.store.engine import session_scope
    from common.store.models import BuildEvent

    keys = [uuid.UUID(b) for b in build_ids]
    with session_scope(database_url) as session:
        rows = session.execute(select(BuildEvent.build_id, BuildEvent.at)
                               .where(BuildEvent.build_id.in_(keys), BuildEvent.machine == "conversion",
                                      BuildEvent.to_state.in_(terminal))).all()
    return {str(build_id): at for build_id, at in rows}
