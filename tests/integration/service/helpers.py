"""Response checks against the API's own schemas, a driver that walks a build as a worker would, rows written
straight through the store, and threads started at once for races."""
from __future__ import annotations

import functools
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from celery import Celery
from marshmallow import Schema
from sqlalchemy import update

from api.schemas.builds import BuildSchema
from api.schemas.common import ErrorSchema
from common.queue.publish import broker_transport_options
from common.settings import Settings
from common.store import builds as buildstore
from common.store.engine import session_scope
from common.store.models import Account, App, Build
from common.store.status import ConversionState

PCRS = {"pcr0": "a" * 96, "pcr1": "b" * 96, "pcr2": "c" * 96}


def ok(resp, schema: type[Schema] | None, status: int = 200) -> dict:  # noqa: ANN001
    """Assert the status and that the body is exactly what `schema` documents."""
    assert resp.status_code == status, (resp.status_code, resp.json)
    if schema is None:
        return {}
    problems = schema().validate(resp.json)
    assert problems == {}, problems
    return resp.json


def err(resp, status: int, code: str | None = None) -> dict:  # noqa: ANN001
    assert resp.status_code == status, (resp.status_code, resp.json)
    assert ErrorSchema().validate(resp.json) == {}, resp.json
    if code is not None:
        assert resp.json["error"]["code"] == code, resp.json
    assert resp.json["error"]["request_id"]
    return resp.json["error"]


def body(app_id: str, **over: object) -> dict:
    request = {"app_id": app_id, "input_image": {"name": "127.0.0.1:5000/in:1"},
               "output_image": {"name": "127.0.0.1:5000/out:1"}, "converter_options": {}}
    request.update(over)
    return {"request": request, "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 512}}


def submit(client, headers: dict[str, str], request: dict) -> str:  # noqa: ANN001
    """Submit a conversion through the API (Flask test client); assert the 200 and its documented body."""
    resp = client.post("/v1/builds/convert-app/nitro-enclaves", json=request, headers=headers)
    return str(ok(resp, BuildSchema, 200)["build_id"])


def convert_request(app_id: str, src: str, dst: str, auth: dict | None = None, env: str = "GREETING=hi") -> dict:
    """A conversion request of `src` into `dst` with one environment variable (and input credentials)."""
    return {"request": {"app_id": app_id, "input_image": {"name": src, "auth_config": auth},
                        "output_image": {"name": dst}, "converter_options": {"env_vars": [env]}},
            "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 512}}


def wait_ended(client, headers: dict[str, str], build_id: str, timeout: float = 240.0,  # noqa: ANN001
               every: float = 0.5) -> dict:
    """The Build, read through the API every `every` seconds until its conversion ended."""
    deadline = time.monotonic() + timeout
    while True:
        build = ok(client.get(f"/v1/builds/{build_id}", headers=headers), BuildSchema)
        if build["conversion"]["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}:
            return build
        if time.monotonic() > deadline:
            raise AssertionError(f"conversion {build_id} did not end: {build['conversion']}")
        time.sleep(every)


def drive_to_success(s: Settings, build_id: str) -> None:
    """What a worker records, through the real store: claim, every stage, success and task. A build waiting for an
    identical one (common/store/followers.py) is released first, as a leader's worker releases one it does not serve."""
    bid = uuid.UUID(build_id)
    with session_scope(s.database_url) as session:
        session.execute(update(Build).where(Build.id == bid).values(waits_for=None))
        claim = buildstore.claim(session, bid, lease_seconds=60)
        assert claim is not None
        state = ConversionState.PULLING
        for nxt in (ConversionState.BUILDING, ConversionState.MEASURING, ConversionState.PUSHING):
            assert buildstore.transition_conversion(session, bid, state, nxt, actor="test", fence=claim.fence)
            state = nxt
        task_id = buildstore.succeed(session, bid, claim.fence, buildstore.Outcome(
            input_digest="sha256:" + "1" * 64, output_digest="sha256:" + "2" * 64, output_size=3 << 20,
            eif_size=1 << 20, eif_sha256="3" * 64, pcr8=None, exposed_ports=((8080, "tcp"),), warnings=(),
            docker_version=None, **PCRS))
        assert task_id is not None
        buildstore.auto_approve_if_enabled(session, bid, task_id)


def new_account(url: str) -> tuple[uuid.UUID, uuid.UUID]:
    """An account with one app (no users: the store does not need them), as (account id, app id)."""
    with session_scope(url) as session:
        account = Account(id=uuid.uuid4(), name=f"acct-{uuid.uuid4().hex[:6]}")
        session.add(account)
        session.flush()
        app = App(id=uuid.uuid4(), account_id=account.id, name="app", description="", default_build_settings={},
                  auto_approve=False)
        session.add(app)
        return account.id, app.id


def new_build(account: tuple[uuid.UUID, uuid.UUID], **over: Any) -> buildstore.NewBuild:
    """A submission of `account`'s app as the API would insert it; `over` changes fields."""
    return replace(buildstore.NewBuild(
        build_id=uuid.uuid4(), account_id=account[0], app_id=account[1], created_by=None,
        input_image_name="127.0.0.1:5000/in:1", output_image_name="127.0.0.1:5000/out:1", input_username=None,
        output_username=None, input_credentials=None, output_credentials=None, converter_options={},
        cpu_count=2, mem_size=512, enable_overlay_filesystem_persistence=True, request_fingerprint="f" * 64), **over)


def race(target: Callable[[], None], threads: int, timeout: float = 60) -> None:
    """Run `target` in `threads` threads at once and wait for them all."""
    started = [threading.Thread(target=target) for _ in range(threads)]
    for t in started:
        t.start()
    for t in started:
        t.join(timeout=timeout)


@functools.cache
def celery_producer(redis_url: str, visibility_timeout: int) -> Celery:
    """A publish-only Celery app, as a client other than the API would send tasks: the reference the API's own
    hand-built conversion message is compared with (common.queue.publish), and a way to send a sweep."""
    app = Celery("nitroconv-test-producer", broker=redis_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    broker_transport_options=broker_transport_options(visibility_timeout))
    return app
