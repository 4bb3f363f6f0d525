"""Service integration fixtures: a database per run, a Redis DB index, the API app, tenants, Celery workers."""
from __future__ import annotations

import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from redis import Redis
from sqlalchemy import text

from api.app import create_app
from common.queue.tasknames import QUEUES
from common.settings import Settings
from common.store.engine import session_scope
from tests.fixtures.devblobs import build_dev_blobs, build_shim
from tests.fixtures.emulator import emulator_qemu
from tests.fixtures.repo import REPO
from tests.fixtures.service import (
    REDIS_BASE,
    REDIS_DB,
    Tenant,
    fresh_database,
    new_tenant,
    worker_env,
)


@pytest.fixture(scope="session")
def service_db() -> Iterator[str]:
    with fresh_database("nitroconv_test") as url:
        yield url


@pytest.fixture(scope="module")
def own_queue_db() -> Iterator[str]:
    """A database for this module alone: the claim looks at every QUEUED build, so other tests' builds must not
    be there."""
    with fresh_database("nitroconv_fair") as url:
        yield url


@pytest.fixture
def queue_db(own_queue_db: str) -> str:
    """The module's own database with no builds in it (each test starts from an empty queue)."""
    with session_scope(own_queue_db) as session:
        session.execute(text("DELETE FROM builds"))
    return own_queue_db


@pytest.fixture(scope="session")
def service_redis() -> Iterator[str]:
    url = f"{REDIS_BASE}/{REDIS_DB}"
    Redis.from_url(url).flushdb()
    yield url
    Redis.from_url(url).flushdb()


@pytest.fixture(scope="session")
def service_settings(service_db: str, service_redis: str, tmp_path_factory: pytest.TempPathFactory) -> Settings:
    state = tmp_path_factory.mktemp("state")
    return Settings(database_url=service_db, redis_url=service_redis, state_dir=state,
                    blobs_dir=Path(os.environ.get("NITROCONV_BLOBS_DIR", REPO / ".state" / "blobs")),
                    runtime_dir=Path(os.environ.get("NITROCONV_RUNTIME_DIR", REPO / ".state" / "runtime")),
                    secret_key=secrets.token_urlsafe(32).encode(), lease_seconds=6, requeue_after_seconds=5,
                    sweep_interval_seconds=2, max_attempts=3, soft_time_limit=300, time_limit=330,
                    visibility_timeout=900, insecure_registries=frozenset({"127.0.0.1:5000"}),
                    emulator_qemu=emulator_qemu())


@pytest.fixture(scope="session")
def flask_app(service_settings: Settings):  # noqa: ANN201
    return create_app(service_settings)


@pytest.fixture
def client(flask_app):  # noqa: ANN001, ANN201
    return flask_app.test_client()


@pytest.fixture
def make_tenant(service_settings: Settings, client):  # noqa: ANN001, ANN201
    return lambda: new_tenant(service_settings, client)


@pytest.fixture
def tenant(make_tenant) -> Tenant:  # noqa: ANN001
    return make_tenant()


@dataclass
class CeleryProcess:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=40)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_celery(s: Settings, name: str, *extra: str, ready_marker: str = "ready.",
                 env: Mapping[str, str] | None = None) -> CeleryProcess:
    """A `celery` process with `worker_env(s)`, plus `env` for settings Settings does not carry."""
    log = s.state_dir / f"{name}.log"
    # A worker starts as the deploy files start it (`python -m worker`: Celery's worker command alone).
    cmd = ([sys.executable, "-m", "worker", *extra[1:]] if extra[:1] == ("worker",)
           else [sys.executable, "-m", "celery", "-A", "worker.celery_app", *extra])
    out = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env={**worker_env(s), **(env or {})}, stdout=out,
                            stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery {name} exited: {log.read_text()[-3000:]}")
        if ready_marker in log.read_text(errors="replace"):
            return CeleryProcess(proc, log)
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"celery {name} not ready: {log.read_text()[-3000:]}")


def start_worker(s: Settings, name: str, queues: str = ",".join(QUEUES),
                 env: Mapping[str, str] | None = None) -> CeleryProcess:
    return start_celery(s, name, "worker", "-Q", queues, "-c", "1", "-n", f"{name}@%h",
                        "--without-gossip", "--without-mingle", "-l", "info", env=env)


@pytest.fixture(scope="session")
def celery_worker(service_settings: Settings) -> Iterator[CeleryProcess]:
    """A real `celery worker` process on the test Redis DB (never eager)."""
    worker = start_worker(service_settings, f"w{os.getpid()}")
    yield worker
    worker.stop()


def settings_for_own_worker(service_settings: Settings, *hosts: str) -> Settings:
    """Settings for a module that runs its own worker: the dev blobs and shim built, `hosts` trusted, and no work of
    other modules left to it (the worker would consume their broker messages, and claim or sweep their QUEUED
    rows). Call it before the module's app exists: kombu remembers the queue bindings it declared, and a flush
    after that would leave its messages routed nowhere."""
    build_dev_blobs(service_settings.blobs_dir)
    build_shim(service_settings.runtime_dir)
    s = replace(service_settings, insecure_registries=frozenset(hosts))
    Redis.from_url(s.redis_url).flushdb()
    cancel_queued(s.database_url)
    return s


def cancel_queued(database_url: str) -> None:
    """End every build other tests left QUEUED (API-only tests submit and never convert): a claim takes the fairest
    QUEUED build of the whole database, not the one its message names."""
    with session_scope(database_url) as session:
        session.execute(text("UPDATE builds SET conversion_state='CANCELLED', approval_status='REJECTED' "
                             "WHERE conversion_state='QUEUED'"))


class Flow(NamedTuple):
    """A module's own real worker process and the API app, on settings that trust the test registries."""

    s: Settings
    client: Any
    worker: CeleryProcess

    def tenant(self) -> Tenant:
        """A fresh tenant whose calls go to this flow's app."""
        return new_tenant(self.s, self.client)


@pytest.fixture(scope="module")
def flow(service_settings: Settings, registry, basic_registry) -> Iterator[Flow]:  # noqa: ANN001
    s = settings_for_own_worker(service_settings, registry.host, basic_registry.host)
    worker = start_worker(s, f"flow{uuid.uuid4().hex[:6]}")
    try:
        yield Flow(s, create_app(s).test_client(), worker)
    finally:
        worker.stop()


@pytest.fixture
def settings_with(service_settings: Settings):  # noqa: ANN201
    def make(**changes: object) -> Settings:
        return replace(service_settings, **changes)

    return make
