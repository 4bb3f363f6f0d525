"""The worker main process's own duties: reap dead attempts' scratch at start, end hard-timed-out builds; and a
new pool child's: end the builds of children the OOM killer ended (worker.oomkill)."""
from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from billiard.exceptions import TimeLimitExceeded
from celery.signals import task_failure, worker_process_init, worker_ready
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session
from sqlalchemy.pool import NullPool

from common.queue.tasknames import CONVERT
from common.settings import Settings, get_settings
from common.store import builds as buildstore
from common.store.models import Build
from common.store.status import RUNNING, ConversionState
from worker import oomkill
from worker.scratch import reap_dead, scratch_dir

log = logging.getLogger(__name__)


@contextmanager
def parent_session(database_url: str) -> Iterator[Session]:
    """A session on an unpooled engine: the main process forks pool children, which must not inherit
    pooled connections (a child closing an inherited socket would end the parent's session too)."""
    engine = create_engine(make_url(database_url).set(drivername="postgresql+psycopg2"), poolclass=NullPool,
                           connect_args={"connect_timeout": 3, "application_name": "nitroconv-worker-main"})
    try:
        with Session(engine) as session, session.begin():
            yield session
    finally:
        engine.dispose()


def end_hard_timeout(s: Settings, session: Session, build_id: uuid.UUID) -> bool:
    """The pool child running `build_id` was killed at the hard time limit: FAILED `timeout`.

    The attempt this host ran is identified by its scratch dir (named by the lease token), so an
    attempt another worker took over meanwhile is never touched. True when the build was ended.
    """
    row = session.execute(select(Build.conversion_state, Build.lease_owner)
                          .where(Build.id == build_id)).one_or_none()
    if row is None or row[1] is None or ConversionState(row[0]) not in RUNNING:
        return False
    state, fence = ConversionState(row[0]), row[1]
    if not scratch_dir(s.state_dir, build_id, fence).exists():
        return False  # not this host's attempt, or it died before starting: the sweeper decides
    return buildstore.end_unsuccessfully(
        session, build_id, state, ConversionState.FAILED, actor=buildstore.worker_actor(fence), code="timeout",
        message=f"the conversion exceeded the hard limit of {s.time_limit} seconds", fence=fence)


def _claim_note(state_dir: Path, task_id: str) -> Path | None:
    # Task ids come off the broker: only a UUID (what we send) names a file, never a path.
    try:
        return state_dir / "claims" / str(uuid.UUID(task_id))
    except (ValueError, TypeError):
        return None


def note_claim(state_dir: Path, task_id: str, build_id: uuid.UUID) -> None:
    """Record, for the main process, which build the pool child running `task_id` claimed: with the fair
    claim it is not always the message's, and a child killed at the hard time limit cannot say."""
    path = _claim_note(state_dir, task_id)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{build_id} {oomkill.note_fields()}")


def forget_claim(state_dir: Path, task_id: str) -> None:
    path = _claim_note(state_dir, task_id)
    if path is not None:
        path.unlink(missing_ok=True)


def claimed_by(state_dir: Path, task_id: str) -> uuid.UUID | None:
    """The build the (dead) child running `task_id` claimed, read once; None when it claimed none."""
    path = _claim_note(state_dir, task_id)
    if path is None:
        return None
    try:
        return uuid.UUID(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    finally:
        path.unlink(missing_ok=True)


@worker_ready.connect
def _reap_at_start(**_: object) -> None:
    s = get_settings()
    try:
        with parent_session(s.database_url) as session:
            reap_dead(s.state_dir, session)
    except Exception:  # noqa: BLE001 - a start-up without Postgres must still start; the sweeper reaps later
        log.warning("could not reap scratch dirs at start", exc_info=True)


@worker_process_init.connect
def _end_oom_killed(**_: object) -> None:
    # In each new pool child: the pool replaces a child the OOM killer ended, so this runs right after one dies.
    s = get_settings()
    found = oomkill.oom_killed_claims(s.state_dir / "claims")
    if not found:
        return
    try:
        with parent_session(s.database_url) as session:
            oomkill.end_oom_killed_attempts(s, session, found)
    except Exception:  # noqa: BLE001 - the lease then expires and the sweeper requeues or fails it
        log.warning("could not record the OOM kill of builds %s", [str(b) for _, b in found], exc_info=True)


@task_failure.connect
def _on_hard_timeout(sender: object = None, task_id: str | None = None, exception: BaseException | None = None,
                     args: object = None, **_: object) -> None:
    if not isinstance(exception, TimeLimitExceeded) or getattr(sender, "name", None) != CONVERT:
        return
    s = get_settings()
    build_id = claimed_by(s.state_dir, str(task_id)) if task_id else None
    if build_id is None:
        try:
            build_id = uuid.UUID(str((args or [task_id])[0]))  # type: ignore[index]
        except (ValueError, TypeError, IndexError):
            return
    try:
        with parent_session(s.database_url) as session:
            ended = end_hard_timeout(s, session, build_id)
            reap_dead(s.state_dir, session)
    except Exception:  # noqa: BLE001 - the lease then expires and the sweeper requeues or fails it
        log.warning("could not record the hard timeout of build_id=%s", build_id, exc_info=True)
        return
    log.warning("hard time limit build_id=%s ended=%s", build_id, ended)
