"""Flower and the API docs as an operator sees them: headless Chromium (Debian `chromium`) against real processes."""
from __future__ import annotations

import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import requests
from redis import Redis
from sqlalchemy import text
from werkzeug.serving import make_server

from api.app import create_app
from common.settings import Settings
from common.store.engine import session_scope
from tests.fixtures.devblobs import build_dev_blobs, build_shim
from tests.fixtures.images import push_test_image
from tests.fixtures.registries import free_port
from tests.fixtures.repo import REPO
from tests.fixtures.require import skip_or_fail
from tests.fixtures.service import PASSWORD

from .conftest import CeleryProcess, start_celery, start_worker

pytestmark = pytest.mark.integration
FLOWER_USER, FLOWER_PASSWORD = "ops", "flower-Pw-5d1c"


def chromium(url: str, tmp: Path, *, screenshot: Path | None = None, budget_ms: int = 15000) -> str:
    """The DOM of `url` after scripts ran (virtual time), optionally with a screenshot; headless, offline."""
    binary = shutil.which("chromium")
    if binary is None:
        skip_or_fail("Debian chromium is not installed (deploy/apt-deps.sh)")
    profile = tmp / f"chromium-{uuid.uuid4().hex[:6]}"
    base = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage", f"--user-data-dir={profile}",
            f"--virtual-time-budget={budget_ms}", "--window-size=1280,1000"]
    if screenshot is not None:
        shot = subprocess.run([*base, f"--screenshot={screenshot}", url], capture_output=True, text=True, timeout=120)
        assert shot.returncode == 0 and screenshot.stat().st_size > 0, shot.stderr[-2000:]
    done = subprocess.run([*base, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.fixture(scope="module")
def browser_stack(service_settings: Settings, registry) -> Iterator[tuple[Settings, str, int, CeleryProcess]]:  # noqa: ANN001
    """The API over HTTP, Flower (basic auth) and one worker, on a freshly flushed broker."""
    build_dev_blobs(service_settings.blobs_dir)
    build_shim(service_settings.runtime_dir)
    s = replace(service_settings, insecure_registries=frozenset({registry.host}))
    Redis.from_url(s.redis_url).flushdb()  # before the app exists (kombu caches the bindings it declared)
    with session_scope(s.database_url) as session:
        session.execute(text("UPDATE builds SET conversion_state='CANCELLED', approval_status='REJECTED' "
                             "WHERE conversion_state='QUEUED'"))
    server = make_server("127.0.0.1", free_port(), create_app(s), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    flower_port = free_port()
    extra = {"NITROCONV_FLOWER_ADDR": f"127.0.0.1:{flower_port}",
             "NITROCONV_FLOWER_BASIC_AUTH": f"{FLOWER_USER}:{FLOWER_PASSWORD}"}
    # Flower first: it builds its view from events, so it must be listening before the task runs.
    flower = start_celery(s, f"flower{uuid.uuid4().hex[:6]}", "flower", f"--conf={REPO}/deploy/flowerconfig.py",
                          ready_marker="Visit me at", env=extra)
    worker = start_worker(s, f"web{uuid.uuid4().hex[:6]}", env=extra)
    try:
        yield s, f"http://127.0.0.1:{server.server_port}", flower_port, worker
    finally:
        worker.stop()
        flower.stop()
        server.shutdown()
        thread.join(timeout=10)


def test_browser_flower_shows_the_worker_and_the_finished_conversion(browser_stack, tenant, registry,  # noqa: ANN001
                                                                     tmp_path: Path):
    s, url, flower_port, worker = browser_stack
    token = requests.post(f"{url}/v1/sys/auth", auth=(tenant.emails["WRITER"], PASSWORD), timeout=30).json()
    headers = {"Authorization": f"Bearer {token['access_token']}"}
    app_id = requests.post(f"{url}/v1/apps", json={"name": f"web-{uuid.uuid4().hex[:6]}"}, headers=headers,
                           timeout=30).json()["app_id"]
    image = push_test_image(registry, f"web/app-{uuid.uuid4().hex[:6]}", "1")
    body = {"request": {"app_id": app_id, "input_image": {"name": f"{registry.host}/{image.repo}:1"},
                        "output_image": {"name": f"{registry.host}/web/out-{uuid.uuid4().hex[:6]}:1"}},
            "nitro_enclaves_options": {"mem_size": 512}}
    build_id = requests.post(f"{url}/v1/builds/convert-app/nitro-enclaves?wait=240", json=body, headers=headers,
                             timeout=300).json()["build_id"]
    assert requests.get(f"{url}/v1/builds/{build_id}", headers=headers, timeout=30).json()["conversion"][
        "state"] == "SUCCEEDED"

    flower = f"http://127.0.0.1:{flower_port}"
    # Without credentials Flower refuses (its auth is on, from settings).
    assert requests.get(f"{flower}/workers", timeout=10).status_code == 401
    deadline = time.monotonic() + 30  # the task-succeeded event reaches Flower asynchronously
    while requests.get(f"{flower}/api/task/info/{build_id}", auth=(FLOWER_USER, FLOWER_PASSWORD),
                       timeout=10).json().get("state") != "SUCCESS" and time.monotonic() < deadline:
        time.sleep(0.5)

    logged_in = f"http://{FLOWER_USER}:{FLOWER_PASSWORD}@127.0.0.1:{flower_port}"
    workers_dom = chromium(f"{logged_in}/workers", tmp_path)
    node = worker.log.read_text(errors="replace").split(" ready.")[0].rsplit(" ", 1)[-1]  # name@host
    assert node and node in workers_dom, workers_dom[-3000:]

    screenshot = tmp_path / "flower-task.png"
    task_dom = chromium(f"{logged_in}/task/{build_id}", tmp_path, screenshot=screenshot)
    assert "nitroconv.convert.v1" in task_dom
    assert "SUCCESS" in task_dom
    # The build id is the task's only argument (and its id), so an operator can go to /v1/builds/{id}.
    assert f"[&#39;{build_id}&#39;]" in task_dom or f"['{build_id}']" in task_dom, task_dom[-3000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_browser_api_docs_render_offline_with_the_convert_operation(browser_stack, tmp_path: Path):  # noqa: ANN001
    _, url, _, _ = browser_stack
    page = requests.get(f"{url}/v1/docs", timeout=10).text
    assert "cdn." not in page and "https://" not in page.split("<body")[0]  # every asset is served locally
    screenshot = tmp_path / "docs.png"
    dom = chromium(f"{url}/v1/docs", tmp_path, screenshot=screenshot)
    # Rendered by Swagger UI's script (not in the served HTML): the operation's block and its summary.
    assert 'class="swagger-ui' in dom and "opblock" in dom, dom[-3000:]
    assert "/v1/builds/convert-app/nitro-enclaves" in dom
    assert "/v1/builds/convert-app/nitro-enclaves" not in page
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
