"""A scratch nitroconv service for one benchmark run: its own Postgres database, Redis DB, API and Celery workers.

Everything is started from this repository the way `deploy/up.sh` starts it (gunicorn with
deploy/gunicorn.conf.py, `python -m worker` (Celery's worker command) with up.sh's flags), on a database created
for the run and dropped after it, and a Redis DB flushed before and after. Every child runs in a session of
its own (a Ctrl-C at the terminal reaches the bench, which then stops them in order) and gets SIGTERM from
the kernel if the bench dies without cleaning up (PR_SET_PDEATHSIG).

A worker is reaped with wait4(), never Popen.poll(): the rusage of its exit (ru_maxrss, which covers the
pool children it reaped) is one of the figures.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ADMIN_EMAIL = "bench@example.test"
_PR_SET_PDEATHSIG = 1

Log = Callable[[str], None]


class StackError(RuntimeError):
    """The stack could not be started: the bench cannot run (as opposed to a figure missing its target)."""


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: if the bench is SIGKILLed, its services do not linger.
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Child:
    """A service process of the stack, its output in `log`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name, self.log = name, log
        self.rusage: object | None = None  # resource.struct_rusage once reaped
        with log.open("wb") as out:
            self.proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509 - no threads yet at spawn

    @property
    def pid(self) -> int:
        return self.proc.pid

    def reap(self, timeout: float) -> bool:
        """Wait up to `timeout` s for the exit; True once reaped (then `rusage` is set)."""
        if self.rusage is not None:
            return True
        deadline = time.monotonic() + timeout
        while True:
            pid, status, usage = os.wait4(self.proc.pid, os.WNOHANG)
            if pid:
                self.rusage = usage
                self.proc.returncode = os.waitstatus_to_exitcode(status)
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def tail(self, limit: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-limit:]
        except OSError:
            return ""

    def wait_for(self, marker: str, timeout: float) -> None:
        """Until `marker` appears in the log; StackError if the process exits or time runs out first."""
        deadline = time.monotonic() + timeout
        while marker not in self.tail(1 << 20):
            if self.reap(0):
                raise StackError(f"{self.name} exited ({self.proc.returncode}) before it was ready:\n{self.tail()}")
            if time.monotonic() >= deadline:
                raise StackError(f"{self.name} not ready after {timeout:.0f}s:\n{self.tail()}")
            time.sleep(0.1)

    def stop(self, grace: float = 60.0) -> None:
        """SIGTERM (a warm shutdown for Celery, graceful for gunicorn), then SIGKILL to its process group."""
        if self.reap(0):
            return
        try:
            os.kill(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not self.reap(grace):
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)  # its own group: start_new_session
            except ProcessLookupError:
                pass
            self.reap(30)


def worker_queues() -> str:
    """The queues of a worker on a conversion host: the settings' default, as deploy/up.sh's default."""
    from common.settings import Settings

    return ",".join(Settings().worker_queues)


@dataclass
class Stack:
    root: Path
    database_url: str
    redis_url: str
    registry: str
    api_url: str
    secret_key: str
    admin_password: str
    log: Log
    children: list[Child] = field(default_factory=list)

    def env(self, state_dir: Path) -> dict[str, str]:
        """The environment of the API and the workers: this run's database, Redis DB, secret and state dir."""
        state = _state_root()
        return {
            **os.environ,
            "NITROCONV_DATABASE_URL": self.database_url,
            "NITROCONV_REDIS_URL": self.redis_url,
            "NITROCONV_SECRET_KEY": self.secret_key,
            "NITROCONV_STATE_DIR": str(state_dir),
            "NITROCONV_REGISTRY_ADDR": self.registry,
            "NITROCONV_INSECURE_REGISTRIES": self.registry,
            "NITROCONV_WORKER_QUEUES": worker_queues(),
            # The figures compare conversions with `docker pull`+`create`+`export`, which boots nothing.
            "NITROCONV_BOOT_CHECK": "0",
            # The kernel blobs and the runtime are the host's, whichever state dir a worker has.
            "NITROCONV_BLOBS_DIR": os.environ.get("NITROCONV_BLOBS_DIR") or str(state / "blobs"),
            "NITROCONV_RUNTIME_DIR": os.environ.get("NITROCONV_RUNTIME_DIR") or str(state / "runtime"),
        }

    def start_worker(self, name: str, state_dir: Path, concurrency: int = 1) -> Child:
        """`python -m worker` with deploy/up.sh's flags and its own state dir (so its own blob cache); waits until ready."""
        state_dir.mkdir(parents=True, exist_ok=True)
        argv = [sys.executable, "-m", "worker", "-Q", worker_queues(),
                "-c", str(concurrency), "-n", f"{name}@%h", "--without-gossip", "-l", "info"]
        child = Child(name, argv, self.env(state_dir), self.root / f"{name}.log")
        self.children.append(child)
        child.wait_for("ready.", timeout=90)
        return child

    def stop_worker(self, child: Child) -> None:
        child.stop()
        if child in self.children:
            self.children.remove(child)


def _state_root() -> Path:
    return Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state").resolve()


def _wait_healthy(url: str, api: Child, timeout: float) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while True:
        try:
            if requests.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        if api.reap(0) or time.monotonic() >= deadline:
            raise StackError(f"the API did not become healthy:\n{api.tail()}")
        time.sleep(0.2)


@contextmanager
def scratch_stack(root: Path, registry: str, redis_url: str, port: int, log: Log,
                  pg: str = "postgresql://postgres@127.0.0.1:5432") -> Iterator[Stack]:
    """A database and Redis DB of the run's own, and the API on 127.0.0.1:`port`; everything stopped and dropped after."""
    from redis import Redis

    from common.store.accounts import ensure_admin
    from common.store.engine import (
        create_database_if_missing,
        drop_database,
        engine_for,
        migrate,
        session_scope,
    )

    root.mkdir(parents=True, exist_ok=True)
    database_url = f"{pg}/nitroconv_bench_service_{secrets.token_hex(4)}"
    stack = Stack(root, database_url, redis_url, registry, f"http://127.0.0.1:{port}", secrets.token_urlsafe(32),
                  secrets.token_urlsafe(16), log)
    with ExitStack() as cleanup:
        log(f"scratch database {database_url.rsplit('/', 1)[1]}, Redis {redis_url}")
        create_database_if_missing(database_url)
        cleanup.callback(drop_database, database_url)
        cleanup.callback(lambda: engine_for(database_url).dispose())
        migrate(database_url)
        with session_scope(database_url) as session:
            ensure_admin(session, ADMIN_EMAIL, stack.admin_password)
        redis = Redis.from_url(redis_url)
        redis.flushdb()
        cleanup.callback(redis.flushdb)

        def stop_all() -> None:
            for child in reversed(stack.children):
                child.stop()
            stack.children.clear()

        cleanup.callback(stop_all)
        api_state = root / "api"
        (api_state / "pids").mkdir(parents=True, exist_ok=True)
        (api_state / "logs").mkdir(exist_ok=True)
        env = {**stack.env(api_state), "NITROCONV_API_ADDR": f"127.0.0.1:{port}",
               # The bench's own polling must not be throttled; what is timed is the conversions.
               "NITROCONV_RATE_LIMIT_PER_MINUTE": "0"}
        api = Child("api", [str(Path(sys.executable).parent / "gunicorn"), "-c", "deploy/gunicorn.conf.py",
                            "api.app:create_app()"], env, root / "api.log")
        stack.children.append(api)
        _wait_healthy(stack.api_url, api, timeout=60)
        yield stack
