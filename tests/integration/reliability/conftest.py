"""Fault-injection fixtures: a database and a Redis server per test, killable Celery workers, a beat, a tenant."""
from __future__ import annotations

import hashlib
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import select

from api.app import create_app
from common.queue.tasknames import QUEUES
from common.settings import Settings
from common.store.engine import session_scope
from common.store.models import Build, BuildEvent
from tests.fixtures.registries import free_port
from tests.fixtures.repo import REPO
from tests.fixtures.require import skip_or_fail
from tests.fixtures.service import Tenant, fresh_database, new_tenant, worker_env

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


def blobs_dir() -> Path:
    blobs = Path(os.environ.get("NITROCONV_BLOBS_DIR", REPO / ".state" / "blobs"))
    if not (blobs / "bzImage").exists():
        skip_or_fail(f"no dev blobs in {blobs} (make blobs)")
    return blobs


def runtime_dir() -> Path:
    runtime = Path(os.environ.get("NITROCONV_RUNTIME_DIR", REPO / ".state" / "runtime"))
    if not (runtime / "shim").exists():
        skip_or_fail(f"no runtime binaries in {runtime} (make runtime)")
    return runtime


@dataclass
class RedisServer:
    """A redis-server of the test's own (AOF on, fsync always, noeviction), so the test may stop and kill it."""

    workdir: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.workdir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--maxmemory-policy", "noeviction",
             "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                if Redis.from_url(self.url, socket_timeout=1).ping():
                    return
            except Exception:  # noqa: BLE001 - not listening yet
                time.sleep(0.05)
        raise RuntimeError(f"redis-server on {self.port} did not start")

    def kill(self) -> None:
        """SIGKILL: what survives is what the AOF had on disk."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def client(self) -> Redis:
        return Redis.from_url(self.url)


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def own_db() -> Iterator[str]:
    with fresh_database("nitroconv_rel") as url:
        yield url


@pytest.fixture
def rel_settings(own_db: str, own_redis: RedisServer, tmp_path: Path) -> Settings:
    """Short leases (still 2.5 heartbeats long, for a loaded CI box) and a fast sweeper: a lost worker is
    noticed in seconds."""
    state = tmp_path / "state"
    state.mkdir()
    return Settings(database_url=own_db, redis_url=own_redis.url, state_dir=state, blobs_dir=blobs_dir(),
                    runtime_dir=runtime_dir(),
                    secret_key=secrets.token_urlsafe(32).encode(), lease_seconds=5, requeue_after_seconds=3,
                    sweep_interval_seconds=1, max_attempts=3, soft_time_limit=300, time_limit=330,
                    visibility_timeout=900, insecure_registries=frozenset())


@dataclass
class Proc:
    """A Celery process in its own session, so the test can SIGKILL it with its pool children."""

    proc: subprocess.Popen[bytes]
    log: Path

    def children(self) -> list[int]:
        try:
            return [int(p) for p in Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()]
        except FileNotFoundError:
            return []

    def kill(self) -> None:
        """SIGKILL the worker and its pool: no warm shutdown, no chance to ack, requeue or clean up."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=45)
            except subprocess.TimeoutExpired:
                self.kill()
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)  # a pool child left behind by a cold shutdown
        except ProcessLookupError:
            pass

    def text(self) -> str:
        return self.log.read_text(errors="replace")


class Stack:
    """The processes of one test; every one of them is killed at teardown."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.procs: list[Proc] = []

    def celery_process(self, name: str, args: list[str], ready: str, env: dict[str, str] | None = None) -> Proc:
        log = self.s.state_dir.parent / f"{name}.log"
        out = log.open("wb")
        # A worker starts as the deploy files start it (`python -m worker`: Celery's worker command alone).
        argv = ([sys.executable, "-m", "worker", *args[1:]] if args[:1] == ["worker"]
                else [sys.executable, "-m", "celery", "-A", "worker.celery_app", *args])
        proc = subprocess.Popen(argv, cwd=REPO,
                                env={**worker_env(self.s), "NITROCONV_RUNTIME_DIR": str(self.s.runtime_dir), **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        p = Proc(proc, log)
        self.procs.append(p)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"celery {name} exited: {p.text()[-3000:]}")
            if ready in p.text():
                return p
            time.sleep(0.1)
        raise RuntimeError(f"celery {name} not ready: {p.text()[-3000:]}")

    def worker(self, name: str | None = None, **env: str) -> Proc:
        name = name or f"w{uuid.uuid4().hex[:6]}"
        return self.celery_process(name, ["worker", "-Q", ",".join(QUEUES), "-c", "1", "-n", f"{name}@%h",
                                   "--without-gossip", "--without-mingle", "-l", "info"], "ready.", env)

    def beat(self) -> Proc:
        schedule = self.s.state_dir.parent / "beat-schedule"
        return self.celery_process("beat", ["beat", "-s", str(schedule), "-l", "info"], "beat: Starting")

    def close(self) -> None:
        for p in self.procs:
            p.kill()


@pytest.fixture
def stack(rel_settings: Settings) -> Iterator[Callable[[Settings], Stack]]:
    made: list[Stack] = []

    def make(s: Settings) -> Stack:
        st = Stack(s)
        made.append(st)
        return st

    yield make
    for st in made:
        st.close()


@dataclass
class Api:
    s: Settings
    client: object
    tenant: Tenant
    app_id: str

    def submit(self, src: str, dst: str, auth: dict[str, str] | None = None, expect: int = 200, *,
               output_auth: dict[str, str] | None = None, responses: list[str] | None = None) -> str:
        body = {"request": {"app_id": self.app_id, "input_image": {"name": src, "auth_config": auth},
                            "output_image": {"name": dst, "auth_config": output_auth}, "converter_options": {}},
                "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 512}}
        resp = self.client.post("/v1/builds/convert-app/nitro-enclaves", json=body,  # type: ignore[attr-defined]
                                headers=self.tenant.headers("WRITER"))
        if responses is not None:
            responses.append(resp.get_data(as_text=True))
        assert resp.status_code == expect, (resp.status_code, resp.json)
        return resp.json["build_id"] if expect == 200 else ""


def api_for(s: Settings) -> Api:
    client = create_app(s).test_client()
    tenant = new_tenant(s, client)
    return Api(s, client, tenant, tenant.create_app())


def row(s: Settings, build_id: str) -> Build:
    with session_scope(s.database_url) as session:
        build = session.execute(select(Build).where(Build.id == uuid.UUID(build_id))).scalar_one()
        session.expunge(build)
        return build


def events(s: Settings, build_id: str, machine: str = "conversion") -> list[tuple[str, str, str]]:
    with session_scope(s.database_url) as session:
        rows = session.execute(select(BuildEvent.from_state, BuildEvent.to_state, BuildEvent.actor)
                               .where(BuildEvent.build_id == uuid.UUID(build_id), BuildEvent.machine == machine)
                               .order_by(BuildEvent.id)).all()
    return [(r[0], r[1], r[2]) for r in rows]


def wait_for(predicate: Callable[[], object], timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_terminal(s: Settings, build_id: str, timeout: float = 180.0) -> Build:
    wait_for(lambda: row(s, build_id).conversion_state in TERMINAL, timeout, f"build {build_id} to end")
    return row(s, build_id)


def scratch_dirs(s: Settings) -> list[Path]:
    root = s.state_dir / "scratch"
    return sorted(root.iterdir()) if root.exists() else []


def blob_cache_is_sound(state: Path) -> None:
    """Every blob in the cache hashes to its name, and no partial download was left in it."""
    blobs = state / "cache" / "blobs"
    for path in blobs.rglob("*") if blobs.exists() else []:
        if path.is_file() and path.parent.name in ("sha256", "sha512"):
            assert hashlib.new(path.parent.name, path.read_bytes()).hexdigest() == path.name, path
        elif path.is_file():
            assert path.name == ".lock", f"left in the blob cache: {path}"


def with_hosts(s: Settings, *hosts: str) -> Settings:
    return replace(s, insecure_registries=frozenset(hosts))


def with_short_visibility(s: Settings) -> Settings:
    """A broker visibility timeout of seconds (time limits below it), so the unacked message of a lost worker
    comes back within the test."""
    return replace(s, soft_time_limit=12, time_limit=15, visibility_timeout=20)
