"""Flower restarted or blind while conversions end (RELIABILITY.md §B 24): its event-built view drifts from
Postgres (a finished build still shows STARTED, a build converted while it was down is unknown to it); the API
reads Postgres only, so what users see is right regardless."""
from __future__ import annotations

import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
import requests

from tests.fixtures.registries import free_port

from .conftest import Proc, Stack, api_for, row, wait_for, wait_terminal
from .gate import gated_pull

pytestmark = pytest.mark.integration


def _flower(procs: Stack, port: int, db: Path) -> Proc:
    # Persistent with a periodic snapshot, as an operator would run it to survive restarts.
    return procs.celery_process(f"flower-{uuid.uuid4().hex[:4]}", [
        "flower", "--address=127.0.0.1", f"--port={port}", "--persistent=True", f"--db={db}",
        "--state_save_interval=300"], "Visit me at", env={"FLOWER_UNAUTHENTICATED_API": "true"})


def _flower_state(port: int, task_id: str) -> str | None:
    resp = requests.get(f"http://127.0.0.1:{port}/api/tasks", timeout=10)
    resp.raise_for_status()
    task = resp.json().get(task_id)
    return task.get("state") if task else None


def _flower_counts(port: int) -> Counter[str]:
    resp = requests.get(f"http://127.0.0.1:{port}/api/tasks", timeout=10)
    resp.raise_for_status()
    return Counter(str(t.get("state")) for t in resp.json().values() if t.get("name") == "nitroconv.convert.v1")


def test_flower_restart_drifts_from_postgres_and_the_api_follows_postgres(
        registry, hostile_front, rel_settings, stack, tmp_path):
    pull = gated_pull(registry, hostile_front, rel_settings, "flower")
    s, gate = pull.settings, pull.gate
    api = api_for(s)
    procs = stack(s)
    port, db = free_port(), tmp_path / "flower.db"
    flower = _flower(procs, port, db)
    procs.worker()
    running = api.submit(pull.src, f"{registry.host}/rel/flower-out-{uuid.uuid4().hex[:6]}:1")
    try:
        wait_for(lambda: _flower_state(port, running) == "STARTED", 60, "Flower to see the conversion start")
        time.sleep(1.5)  # a few snapshots (every 0.3 s) with the conversion STARTED
        flower.kill()  # a crash or redeploy: the events emitted while it is gone are lost to it
        gate.open.set()
        finished = wait_terminal(s, running)
        unseen = api.submit(f"{registry.host}/{pull.image.repo}:1", f"{registry.host}/rel/flower-out2-{uuid.uuid4().hex[:6]}:1")
        converted_blind = wait_terminal(s, unseen)
    finally:
        gate.open.set()
    assert finished.conversion_state == converted_blind.conversion_state == "SUCCEEDED"
    flower = _flower(procs, port, db)  # back, from its last snapshot
    assert _flower_state(port, running) == "STARTED"  # the drift: a finished build still "running"
    assert _flower_state(port, unseen) is None  # and one it never heard of
    assert _flower_counts(port) != Counter({"SUCCESS": 2})
    # Users and dashboards read Postgres through the API: both builds are SUCCEEDED there.
    for build_id in (running, unseen):
        resp = api.client.get(f"/v1/builds/{build_id}", headers=api.tenant.headers("READER"))
        assert resp.status_code == 200
        assert resp.json["conversion"]["state"] == "SUCCEEDED"
        assert row(s, build_id).conversion_state == "SUCCEEDED"
    listed = api.client.get("/v1/builds?limit=10", headers=api.tenant.headers("READER"))
    assert listed.status_code == 200
    assert Counter(b["conversion"]["state"] for b in listed.json["items"]) == Counter({"SUCCEEDED": 2})
    assert flower.proc.poll() is None
