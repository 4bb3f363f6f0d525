"""Service integration fixtures: a database per run, a Redis DB index, the API app, tenants, Celery workers."""
from __future__ import annotations

import base64
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from redis import Redis

from api.app import create_app
from common import db as database
from common.accounts import create_account, create_user
from common.db import create_database_if_missing, drop_database, migrate, session_scope
from common.models import Membership
from common.settings import Settings
from common.tasknames import QUEUES

REPO = Path(__file__).resolve().parents[3]
PG_BASE = os.environ.get("NITROCONV_TEST_PG", "postgresql://postgres@127.0.0.1:5432")
REDIS_BASE = os.environ.get("NITROCONV_TEST_REDIS", "redis://127.0.0.1:6379")
REDIS_DB = int(os.environ.get("NITROCONV_TEST_REDIS_DB", "11"))
PASSWORD = "correct horse battery"


@pytest.fixture(scope="session")
def service_db() -> Iterator[str]:
    url = f"{PG_BASE}/nitroconv_test_{os.getpid()}_{secrets.token_hex(3)}"
    create_database_if_missing(url)
    migrate(url)
    yield url
    database.engine_for(url).dispose()
    drop_database(url)


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
                    visibility_timeout=900, insecure_registries=frozenset({"127.0.0.1:5000"}))


@pytest.fixture(scope="session")
def flask_app(service_settings: Settings):  # noqa: ANN201
    return create_app(service_settings)


@pytest.fixture
def client(flask_app):  # noqa: ANN001, ANN201
    return flask_app.test_client()


def basic(email: str, password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{email}:{password}".encode()).decode()}


@dataclass
class Tenant:
    """An account with one user per role, and helpers to call the API as each of them."""

    client: object
    account_id: uuid.UUID
    emails: dict[str, str]

    def token(self, role: str = "MANAGER") -> str:
        resp = self.client.post("/v1/sys/auth", headers=basic(self.emails[role], PASSWORD))  # type: ignore[attr-defined]
        assert resp.status_code == 200, resp.json
        return resp.json["access_token"]

    def headers(self, role: str = "MANAGER", **extra: str) -> dict[str, str]:
        cached = self.__dict__.setdefault("_tokens", {})
        if role not in cached:
            cached[role] = self.token(role)
        return {"Authorization": f"Bearer {cached[role]}", **extra}

    def create_app(self, **fields: object) -> str:
        body = {"name": f"app-{secrets.token_hex(4)}", **fields}
        resp = self.client.post("/v1/apps", json=body, headers=self.headers("WRITER"))  # type: ignore[attr-defined]
        assert resp.status_code == 201, resp.json
        return resp.json["app_id"]


def new_tenant(s: Settings, client: object) -> Tenant:
    """A fresh account with one MANAGER, one WRITER and one READER, all with PASSWORD."""
    tag = secrets.token_hex(4)
    with session_scope(s.database_url) as session:
        manager = create_user(session, f"manager-{tag}@example.test", PASSWORD)
        account = create_account(session, f"acct-{tag}", manager)
        emails = {"MANAGER": manager.email}
        for role in ("WRITER", "READER"):
            user = create_user(session, f"{role.lower()}-{tag}@example.test", PASSWORD)
            session.add(Membership(user_id=user.id, account_id=account.id, role=role))
            emails[role] = user.email
        account_id = account.id
    return Tenant(client=client, account_id=account_id, emails=emails)


@pytest.fixture
def make_tenant(service_settings: Settings, client):  # noqa: ANN001, ANN201
    return lambda: new_tenant(service_settings, client)


@pytest.fixture
def tenant(make_tenant) -> Tenant:  # noqa: ANN001
    return make_tenant()


def worker_env(s: Settings) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "NITROCONV_DATABASE_URL": s.database_url, "NITROCONV_REDIS_URL": s.redis_url,
        "NITROCONV_STATE_DIR": str(s.state_dir), "NITROCONV_SECRET_KEY": s.secret_key.decode(),
        "NITROCONV_BLOBS_DIR": str(s.blobs_dir), "NITROCONV_RUNTIME_DIR": str(s.runtime_dir), "NITROCONV_LEASE_SECONDS": str(s.lease_seconds),
        "NITROCONV_REQUEUE_AFTER_SECONDS": str(s.requeue_after_seconds),
        "NITROCONV_SWEEP_INTERVAL_SECONDS": str(s.sweep_interval_seconds),
        "NITROCONV_MAX_ATTEMPTS": str(s.max_attempts), "NITROCONV_SOFT_TIME_LIMIT": str(s.soft_time_limit),
        "NITROCONV_TIME_LIMIT": str(s.time_limit), "NITROCONV_VISIBILITY_TIMEOUT": str(s.visibility_timeout),
        "NITROCONV_INSECURE_REGISTRIES": ",".join(sorted(s.insecure_registries)),
        "NITROCONV_BOOT_CHECK": "1" if s.boot_check else "0",
        "NITROCONV_BOOT_CHECK_TIMEOUT": str(s.boot_check_timeout),
    })
    for name, path in (("SIGNING_KEY", s.signing_key), ("SIGNING_CERT", s.signing_cert), ("CA_BUNDLE", s.ca_bundle)):
        if path is not None:
            env[f"NITROCONV_{name}"] = str(path)
    return env


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


def start_celery(s: Settings, name: str, *extra: str, ready_marker: str = "ready.") -> CeleryProcess:
    log = s.state_dir / f"{name}.log"
    cmd = [sys.executable, "-m", "celery", "-A", "worker.celery_app", *extra]
    out = log.open("wb")
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(s), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"celery {name} exited: {log.read_text()[-3000:]}")
        if ready_marker in log.read_text(errors="replace"):
            return CeleryProcess(proc, log)
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"celery {name} not ready: {log.read_text()[-3000:]}")


def start_worker(s: Settings, name: str, queues: str = ",".join(QUEUES)) -> CeleryProcess:
    return start_celery(s, name, "worker", "-Q", queues, "-c", "1", "-n", f"{name}@%h",
                        "--without-gossip", "--without-mingle", "-l", "info")


@pytest.fixture(scope="session")
def celery_worker(service_settings: Settings) -> Iterator[CeleryProcess]:
    """A real `celery worker` process on the test Redis DB (never eager)."""
    worker = start_worker(service_settings, f"w{os.getpid()}")
    yield worker
    worker.stop()


@pytest.fixture
def settings_with(service_settings: Settings):  # noqa: ANN201
    def make(**changes: object) -> Settings:
        return replace(service_settings, **changes)

    return make
