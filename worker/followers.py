"""A leader's worker serves the builds that waited for it (common/store/followers.py) or sends them on their own."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterable

from common.errors import QueueUnavailable
from common.queue.publish import enqueue_conversion
from common.registry.auth import Credentials
from common.settings import Settings
from common.store import builds as buildstore
from common.store import followers
from common.store.engine import session_scope
from common.store.models import App, Build
from common.store.sealing import Sealer

log = logging.getLogger(__name__)

Pair = tuple[Credentials | None, Credentials | None]


def _opened(sealer: Sealer, sealed: bytes | None, build_id: uuid.UUID) -> Credentials | None:
    return sealer.open_credentials(sealed, str(build_id)) if sealed else None


def _same_credentials(sealer: Sealer, waiting: followers.Waiting, leader: Pair) -> bool:
    """The follower's credentials, unsealed only here, are the leader's: the leader's pull and push are what the
    follower's own would have done. Credentials that do not open count as different."""
    try:
        return (_opened(sealer, waiting.input_credentials, waiting.build_id),
                _opened(sealer, waiting.output_credentials, waiting.build_id)) == leader
    except Exception:  # noqa: BLE001 - a follower sealed under another key converts on its own
        return False


def serve_followers(s: Settings, leader: uuid.UUID, fence: uuid.UUID, sealer: Sealer, creds: Pair) -> None:
    """After `leader` SUCCEEDED: its followers with its credentials take its results, the others are released.

    Best effort: on any error the followers keep waiting and the sweeper releases them (converted on their own).
    """
    try:
        with session_scope(s.database_url) as session:
            same: list[uuid.UUID] = []
            other: list[uuid.UUID] = []
            for waiting in followers.waiting(session, leader):
                (same if _same_credentials(sealer, waiting, creds) else other).append(waiting.build_id)
            served = followers.serve(session, leader, same, actor=buildstore.worker_actor(fence))
            released = followers.release(session, leader, other)
            if served and session.query(App.auto_approve).join(Build, Build.app_id == App.id).filter(
                    Build.id == leader).scalar():
                for build_id, task_id in served:
                    buildstore.auto_approve_if_enabled(session, build_id, task_id)
    except Exception:  # noqa: BLE001 - the leader's success stands whatever happens to its followers
        log.warning("could not serve the builds waiting for build_id=%s; the sweeper releases them", leader,
                    exc_info=True)
        return
    if served:
        log.info("served %d identical builds from build_id=%s", len(served), leader)
    publish_released(s, released)


def publish_released(s: Settings, build_ids: Iterable[uuid.UUID]) -> None:
    """A broker message for each released follower (committed already); a lost one is re-sent by the sweeper."""
    for build_id in build_ids:
        try:
            enqueue_conversion(s.redis_url, s.visibility_timeout, str(build_id))
        except QueueUnavailable:
            log.warning("could not publish the released build_id=%s; the sweeper re-sends it", build_id)
            return
