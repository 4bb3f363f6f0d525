"""Metrics and logs of a real API (over HTTP) and a real worker process: what they export, and no secret in either."""
from __future__ import annotations

import io
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
import requests
from redis import Redis
from sqlalchemy import text
from werkzeug.serving import make_server

from api.app import create_app
from common import logs
from common.settings import Settings
from common.store.engine import session_scope
from tests.fixtures.devblobs import build_dev_blobs, build_shim
from tests.fixtures.images import push_test_image
from tests.fixtures.registries import free_port

from .conftest import CeleryProcess, start_worker

pytestmark = pytest.mark.integration
CANARY = "canary-obs-Pw-93c2e1"
TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


@pytest.fixture(scope="module")
def obs(service_settings: Settings, registry, basic_registry) -> Iterator[tuple[Settings, str, io.StringIO]]:  # noqa: ANN001
    """The API on a loopback port with its log lines (JSON) captured, on a freshly flushed broker."""
    build_dev_blobs(service_settings.blobs_dir)
    build_shim(service_settings.runtime_dir)
    s = replace(service_settings, insecure_registries=frozenset({registry.host, basic_registry.host}))
    Redis.from_url(s.redis_url).flushdb()  # before the app exists (kombu caches the bindings it declared)
    with session_scope(s.database_url) as session:
        session.execute(text("UPDATE builds SET conversion_state='CANCELLED', approval_status='REJECTED' "
                             "WHERE conversion_state='QUEUED'"))
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    captured = io.StringIO()
    logs.configure("json", stream=captured)
    server = make_server("127.0.0.1", free_port(), create_app(s), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield s, f"http://127.0.0.1:{server.server_port}", captured
    finally:
        server.shutdown()
        thread.join(timeout=10)
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


@pytest.fixture(scope="module")
def metered_worker(obs) -> Iterator[tuple[CeleryProcess, int]]:  # noqa: ANN001
    s = obs[0]
    port = free_port()
    extra = {"NITROCONV_WORKER_METRICS_PORT": str(port), "NITROCONV_LOG_FORMAT": "json"}
    worker = start_worker(s, f"obs{uuid.uuid4().hex[:6]}", env=extra)
    yield worker, port
    worker.stop()


def _submit(url: str, headers: dict[str, str], body: dict) -> str:
    resp = requests.post(f"{url}/v1/builds/convert-app/nitro-enclaves", json=body, headers=headers, timeout=30)
    assert resp.status_code == 200, resp.text
    return resp.json()["build_id"]


def _wait(url: str, headers: dict[str, str], build_id: str) -> dict:
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:
        build = requests.get(f"{url}/v1/builds/{build_id}", headers=headers, timeout=30).json()
        if build["conversion"]["state"] in TERMINAL:
            return build
        time.sleep(0.3)
    raise AssertionError(f"build {build_id} did not end")


def _samples(exposition: str, name: str) -> dict[str, float]:
    """`{labels: value}` of one metric family's samples in the text exposition format."""
    found = {}
    for line in exposition.splitlines():
        match = re.fullmatch(rf"{re.escape(name)}(\{{[^}}]*\}})? (\S+)", line)
        if match:
            found[match.group(1) or ""] = float(match.group(2))
    return found


def test_observability_metrics_and_json_logs_without_secrets(obs, metered_worker, tenant, registry,  # noqa: ANN001
                                                              basic_registry):
    s, url, captured = obs
    worker, port = metered_worker
    token = requests.post(f"{url}/v1/sys/auth", auth=(tenant.emails["WRITER"], "correct horse battery"),
                          timeout=30).json()["access_token"]
    headers = {"Authorization": f"Bearer {token}", "X-Request-Id": "obs-req-1"}
    app = requests.post(f"{url}/v1/apps", json={"name": f"obs-{uuid.uuid4().hex[:6]}"}, headers=headers, timeout=30)
    app_id = app.json()["app_id"]
    public = push_test_image(registry, f"obs/app-{uuid.uuid4().hex[:6]}", "1")
    private = push_test_image(basic_registry, f"obs/private-{uuid.uuid4().hex[:6]}", "1")

    def body(src: str, auth: dict | None) -> dict:
        return {"request": {"app_id": app_id, "input_image": {"name": src, "auth_config": auth},
                            "output_image": {"name": f"{registry.host}/obs/out-{uuid.uuid4().hex[:6]}:1"}},
                "nitro_enclaves_options": {"mem_size": 512}}

    submits = '{endpoint="/v1/builds/convert-app/nitro-enclaves",method="POST",status="200"}'
    before = _samples(requests.get(f"{url}/metrics", timeout=10).text, "nitroconv_api_requests_total").get(submits, 0)
    good = _submit(url, headers, body(f"{registry.host}/{public.repo}:1", None))
    bad = _submit(url, headers, body(f"{basic_registry.host}/{private.repo}:1",
                                     {"username": basic_registry.username, "password": CANARY}))
    assert _wait(url, headers, good)["conversion"]["state"] == "SUCCEEDED"
    failed = _wait(url, headers, bad)
    assert failed["conversion"]["error"]["code"] == "unauthorized"

    # Worker metrics: the counters are written by the pool children and served by the MainProcess.
    deadline = time.monotonic() + 30
    while True:
        exported = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
        outcomes = _samples(exported, "nitroconv_conversions_total")
        if outcomes.get('{code="",outcome="succeeded"}', 0) >= 1 and \
                outcomes.get('{code="unauthorized",outcome="failed"}', 0) >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert outcomes.get('{code="",outcome="succeeded"}') == 1.0, outcomes
    assert outcomes.get('{code="unauthorized",outcome="failed"}') == 1.0, outcomes
    steps = _samples(exported, "nitroconv_conversion_step_seconds_count")
    for step in ("pulling", "building", "pushing"):
        assert steps.get(f'{{step="{step}"}}', 0) >= 1, steps
    pulled = _samples(exported, "nitroconv_registry_pulled_bytes_total")[""]
    pushed = _samples(exported, "nitroconv_registry_pushed_bytes_total")[""]
    assert pulled >= sum(len(layer.blob) for layer in public.layers)  # a unique layer: no cache hit
    assert pushed > 0
    depth = _samples(exported, "nitroconv_queue_depth")
    assert set(depth) == {'{queue="convert"}', '{queue="maintenance"}'}

    # API metrics: by route template and status.
    api_metrics = requests.get(f"{url}/metrics", timeout=10).text
    requests_total = _samples(api_metrics, "nitroconv_api_requests_total")
    assert requests_total.get(submits) == before + 2  # the registry is per process: other tests count too
    assert _samples(api_metrics, "nitroconv_api_request_seconds_count").get(
        '{endpoint="/v1/builds/convert-app/nitro-enclaves",method="POST"}', 0) >= 2

    # Logs: the worker's lines are JSON and those of a conversion carry its build_id.
    worker_lines = [json.loads(line) for line in worker.log.read_text().splitlines() if line.startswith("{")]
    assert worker_lines and all({"ts", "level", "logger", "message"} <= set(line) for line in worker_lines)
    assert {line.get("build_id") for line in worker_lines} >= {good, bad}
    api_lines = [json.loads(line) for line in captured.getvalue().splitlines()]
    access = [line for line in api_lines if line["logger"] == "nitroconv.access"]
    assert any(line["request_id"] == "obs-req-1" and line["route"] == "/v1/builds/convert-app/nitro-enclaves"
               and line["status"] == 200 for line in access), access[-5:]

    # The canary password is in none of them.
    for sink in (exported, api_metrics, worker.log.read_text(errors="replace"), captured.getvalue()):
        assert CANARY not in sink
