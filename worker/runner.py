"""One conversion attempt: claim the build, run the engine step by step under a lease, record the end."""
from __future__ import annotations

import errno
import logging
import shutil
import threading
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from celery.exceptions import SoftTimeLimitExceeded
from sqlalchemy import func, select

from common import logs
from common.errors import Cancelled, NitroconvError, ResourceLimit
from common.registry.auth import Credentials
from common.settings import Settings
from common.store import builds as buildstore
from common.store import followers
from common.store.engine import session_scope
from common.store.models import Build
from common.store.sealing import Sealer
from common.store.status import ConversionState, path_to
from worker.followers import publish_released, serve_followers
from worker.scratch import scratch_dir

log = logging.getLogger(__name__)
HEARTBEAT_SECONDS = 2.0  # also the cancel latency while the engine is inside one long step


class LeaseLost(Exception):
    """Another worker took the build over (our lease expired); stop without writing anything."""


@dataclass(frozen=True)
class AttemptResult:
    outcome: str  # succeeded | failed | cancelled | requeued | skipped | lease_lost
    retry_in: float | None = None
    build_id: uuid.UUID | None = None  # the build this attempt claimed (fair claim: not always the message's)


class Engine(Protocol):
    """`worker.pipeline.convert.convert`, injectable for unit tests."""

    def __call__(self, build: Build, creds_in: Credentials | None, creds_out: Credentials | None, *,
                 scratch: Path, on_stage: Callable[[str, float], None],
                 should_cancel: Callable[[], bool]) -> buildstore.Outcome: ...


class _Attempt:
    """The lease holder's view of one attempt: current state, progress, cancel flag, heartbeat thread."""

    def __init__(self, s: Settings, claim: buildstore.Claim) -> None:
        self.s, self.claim = s, claim
        self.state = ConversionState.PULLING
        self.progress = 0.0
        self.cancel = threading.Event()
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._beat, name="lease-heartbeat", daemon=True)

    def __enter__(self) -> _Attempt:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                with self._lock, session_scope(self.s.database_url) as session:
                    ours, cancel = buildstore.heartbeat(session, self.claim.build_id, self.claim.fence,
                                                        self.s.lease_seconds, self.progress)
            except Exception:  # noqa: BLE001 - Postgres blips must not kill the conversion; the lease has slack
                log.warning("heartbeat failed build_id=%s", self.claim.build_id, exc_info=True)
                continue
            if not ours:
                self.lost.set()
            if cancel:
                self.cancel.set()

    def on_stage(self, stage: str, progress: float) -> None:
        """Record entering a stage (walking every skipped state in order) and the overall progress."""
        self.progress = max(0.0, min(1.0, float(progress)))
        target = ConversionState(stage)
        if target == self.state:
            return
        with self._lock, session_scope(self.s.database_url) as session:
            # Between steps is where a cancel is honoured for certain, whatever the heartbeat saw.
            cancel = session.execute(select(Build.cancel_requested).where(
                Build.id == self.claim.build_id, Build.lease_owner == self.claim.fence)).scalar_one_or_none()
            if cancel is None:
                self.lost.set()
                raise LeaseLost()
            if cancel:
                self.cancel.set()
                raise Cancelled("cancelled by the user")
            for nxt in path_to(self.state, target):
                if not buildstore.transition_conversion(
                        session, self.claim.build_id, self.state, nxt, fence=self.claim.fence,
                        actor=buildstore.worker_actor(self.claim.fence),
                        values={"progress": self.progress}):
                    self.lost.set()
                    raise LeaseLost()
                self.state = nxt

    def should_cancel(self) -> bool:
        return self.cancel.is_set() or self.lost.is_set()


def _credentials(sealer: Sealer, sealed: bytes | None, build_id: uuid.UUID) -> Credentials | None:
    return sealer.open_credentials(sealed, str(build_id)) if sealed else None


def _end(s: Settings, attempt: _Attempt, dst: ConversionState, code: str, message: str,
         values: Mapping[str, object] | None = None) -> bool:
    """Record the attempt's unsuccessful end. False when the build is no longer this attempt's (its lease was
    taken over): whatever went wrong here is then a stale attempt's, not the build's."""
    with session_scope(s.database_url) as session:
        ended = buildstore.end_unsuccessfully(session, attempt.claim.build_id, attempt.state, dst,
                                              actor=buildstore.worker_actor(attempt.claim.fence), code=code,
                                              message=message, fence=attempt.claim.fence, values=values)
        # Builds waiting for this one are converted on their own: its failure need not be theirs.
        released = followers.release(session, attempt.claim.build_id) if ended else []
    publish_released(s, released)
    return ended


def _ended(recorded: bool, outcome: str) -> AttemptResult:
    if not recorded:
        log.warning("the attempt's end was not recorded: another attempt owns the build now")
    return AttemptResult(outcome if recorded else "lease_lost")


def _failure_values(exc: NitroconvError) -> dict[str, object]:
    """Columns a failure records besides its error: a failed boot check keeps its console for the user."""
    boot = exc.details.get("boot_check")
    return {"boot_check": dict(boot)} if isinstance(boot, Mapping) else {}


_EXHAUSTION_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})


def _host_exhausted(exc: BaseException) -> ResourceLimit | None:
    """The host ran out of disk or memory somewhere under `exc` (a library may have wrapped the OSError).

    Both links of every exception are followed (`__cause__`: what it was raised from; `__context__`: what was
    being handled when it was raised): the OSError may sit behind either, and one missed becomes a retry storm.
    """
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo:
        cur = todo.pop()
        if id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in _EXHAUSTION_ERRNOS:
            return ResourceLimit("the worker ran out of disk space during the conversion",
                                 details={"errno": errno.errorcode.get(cur.errno or 0, "")})
        if isinstance(cur, MemoryError):
            return ResourceLimit("the worker ran out of memory during the conversion")
        todo.extend(link for link in (cur.__context__, cur.__cause__) if link is not None)
    return None


def _not_claimable(s: Settings, build_id: uuid.UUID) -> AttemptResult:
    """Nothing was claimable. A QUEUED message build that was cancelled ends here; one still waiting gets
    its token back (this message may have been its only one): after its retry backoff, or at once when
    the claim only missed it because another transaction held its row (SKIP LOCKED)."""
    with session_scope(s.database_url) as session:
        row = session.execute(select(Build.conversion_state, Build.cancel_requested, Build.attempts,
                                     func.extract("epoch", Build.not_before - func.now()), Build.waits_for)
                              .where(Build.id == build_id)).one_or_none()
        if row is None or ConversionState(row[0]) is not ConversionState.QUEUED:
            return AttemptResult("skipped")
        _, cancel_requested, attempts, backoff_left, waits_for = row
        if waits_for is not None and not cancel_requested:
            return AttemptResult("skipped")  # its leader serves or releases it (or the sweeper does)
        if cancel_requested:
            buildstore.end_unsuccessfully(session, build_id, ConversionState.QUEUED, ConversionState.CANCELLED,
                                          actor=buildstore.SYSTEM, code="cancelled", message="cancelled by the user")
            return AttemptResult("cancelled")
        if attempts >= s.max_attempts:
            return AttemptResult("skipped")  # the next message for it records the exhaustion
        if backoff_left is not None and backoff_left > 0:
            return AttemptResult("skipped", retry_in=min(float(backoff_left) + 0.5, 60.0), build_id=build_id)
    return AttemptResult("skipped", retry_in=1.0, build_id=build_id)


def run(build_id: uuid.UUID, s: Settings, engine: Engine,
        on_claim: Callable[[uuid.UUID], None] | None = None) -> AttemptResult:
    """One attempt, started by the message of `build_id`. Safe to call for any id, any number of times.

    The attempt converts the fairest claimable build (`buildstore.claim_next`), which is `build_id`
    unless another account's or an older build should go first; `on_claim` learns which one.
    """
    with session_scope(s.database_url) as session:
        exhausted = session.execute(select(Build.attempts).where(
            Build.id == build_id, Build.conversion_state == ConversionState.QUEUED.value)).scalar_one_or_none()
        if exhausted is not None and exhausted >= s.max_attempts:
            buildstore.end_unsuccessfully(
                session, build_id, ConversionState.QUEUED, ConversionState.FAILED, actor=buildstore.SYSTEM,
                code="attempts_exhausted", message=f"gave up after {exhausted} attempts")
            return AttemptResult("failed")
        claim = buildstore.claim_next(session, lease_seconds=s.lease_seconds, max_attempts=s.max_attempts)
    if claim is None:
        return _not_claimable(s, build_id)
    if claim.build_id != build_id:
        log.info("message of build_id=%s claimed the fairer build_id=%s", build_id, claim.build_id)
    build_id = claim.build_id
    if on_claim is not None:
        on_claim(build_id)
    with logs.bound(build_id=build_id):
        return replace(_attempt(build_id, s, engine, claim), build_id=build_id)


def _attempt(build_id: uuid.UUID, s: Settings, engine: Engine, claim: buildstore.Claim) -> AttemptResult:
    log.info("claimed build_id=%s attempt=%d", build_id, claim.attempt)
    scratch = scratch_dir(s.state_dir, build_id, claim.fence)
    with _Attempt(s, claim) as attempt:
        try:
            with session_scope(s.database_url) as session:
                build = session.execute(select(Build).where(Build.id == build_id)).scalar_one()
                session.expunge(build)
            sealer = Sealer.from_secrets(s.secret_key)
            # Unsealed only now, held in this frame, never logged or written back.
            creds_in = _credentials(sealer, build.input_credentials, build_id)
            creds_out = _credentials(sealer, build.output_credentials, build_id)
            scratch.mkdir(parents=True, exist_ok=True, mode=0o700)
            outcome = engine(build, creds_in, creds_out, scratch=scratch, on_stage=attempt.on_stage,
                             should_cancel=attempt.should_cancel)
            attempt.on_stage(ConversionState.PUSHING.value, 1.0)
            with session_scope(s.database_url) as session:
                task_id = buildstore.succeed(session, build_id, claim.fence, outcome)
                if task_id is None:
                    raise LeaseLost()
                buildstore.auto_approve_if_enabled(session, build_id, task_id)
            serve_followers(s, build_id, claim.fence, sealer, (creds_in, creds_out))
            del creds_in, creds_out
            return AttemptResult("succeeded")
        except LeaseLost:
            log.warning("lease lost build_id=%s; another attempt owns it", build_id)
            return AttemptResult("lease_lost")
        except Cancelled as exc:
            if attempt.lost.is_set():
                return AttemptResult("lease_lost")
            return _ended(_end(s, attempt, ConversionState.CANCELLED, exc.code, exc.message), "cancelled")
        except SoftTimeLimitExceeded:
            return _ended(_end(s, attempt, ConversionState.FAILED, "timeout",
                               f"the conversion exceeded {s.soft_time_limit} seconds"), "failed")
        except NitroconvError as exc:
            exc = _host_exhausted(exc) or exc
            if exc.retryable and claim.attempt < s.max_attempts:
                backoff = min(300.0, 5.0 * 2 ** claim.attempt)
                log.warning("attempt %d of build_id=%s failed, retry in %.0f s: %s: %s", claim.attempt, build_id,
                            backoff, exc.code, exc.message)
                with session_scope(s.database_url) as session:
                    buildstore.requeue(session, build_id, attempt.state, fence=claim.fence,
                                       actor=buildstore.worker_actor(claim.fence), reason=f"{exc.code}: {exc.message}",
                                       backoff_seconds=backoff)
                return AttemptResult("requeued", retry_in=backoff)
            return _ended(_end(s, attempt, ConversionState.FAILED, exc.code, exc.message, _failure_values(exc)),
                          "failed")
        except Exception as exc:
            if (full := _host_exhausted(exc)) is not None:
                # Scratch is removed below; the same image would exhaust the host again, so no retry.
                log.warning("resource limit build_id=%s: %s", build_id, full.message)
                return _ended(_end(s, attempt, ConversionState.FAILED, full.code, full.message), "failed")
            log.exception("conversion crashed build_id=%s", build_id)
            return _ended(_end(s, attempt, ConversionState.FAILED, "internal_error",
                               "internal error; see the worker log"), "failed")
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
