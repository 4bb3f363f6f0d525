"""A canary password through the whole service, after a successful and a failed run, searched for in every
sink: Postgres (a full dump), every Redis key and the AOF on disk (every message ever queued), Flower's task
view, the event stream, every log file, API responses and error messages (RELIABILITY.md §0, issue 6)."""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import pytest
import requests
from sqlalchemy.engine import make_url

from tests.fixtures.images import push_test_image
from tests.fixtures.registries import free_port, start_registry
from tests.fixtures.require import skip_or_fail

from .conftest import api_for, row, wait_terminal, with_hosts

pytestmark = pytest.mark.integration
GOOD = "canary-Good-5b1e0c7a"
BAD = "canary-Bad-93d2f4e1"
USER = "carol"
FLOWER_AUTH = "ops:flower-pw"


@pytest.fixture
def canary_registry(tmp_path: Path):  # noqa: ANN201
    if shutil.which("htpasswd") is None:
        skip_or_fail("htpasswd (apache2-utils) is not installed")
    workdir = tmp_path / "canary-registry"
    workdir.mkdir()
    line = subprocess.run(["htpasswd", "-Bbn", USER, GOOD], check=True, capture_output=True).stdout
    (workdir / "htpasswd").write_bytes(line.strip() + b"\n")
    auth = f"auth:\n  htpasswd:\n    realm: canary\n    path: {workdir / 'htpasswd'}\n"
    reg = start_registry(workdir, auth, username=USER, password=GOOD)
    yield reg
    reg.stop()


def _redis_values(redis) -> list[bytes]:  # noqa: ANN001
    """Every key and every value of every type, as bytes."""
    out: list[bytes] = []
    for key in redis.scan_iter("*"):
        out.append(key)
        kind = redis.type(key)
        if kind == b"string":
            out.append(redis.get(key) or b"")
        elif kind == b"list":
            out += redis.lrange(key, 0, -1)
        elif kind == b"hash":
            for k, v in redis.hgetall(key).items():
                out += [k, v]
        elif kind == b"set":
            out += list(redis.smembers(key))
        elif kind == b"zset":
            out += [m for m, _ in redis.zrange(key, 0, -1, withscores=True)]
        elif kind == b"stream":
            out += [json.dumps(redis.xrange(key), default=repr).encode()]
    return out


def _wait_until_flower_sees_a_worker(port: int, timeout: float = 60.0) -> None:
    """Flower only shows tasks whose events arrive after its receiver connects; a worker's heartbeat
    reaching it proves the receiver is listening, so no task event of this test can be missed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # /workers?json=1 (without refresh) lists only workers known from events, unlike /api/workers.
        resp = requests.get(f"http://127.0.0.1:{port}/workers?json=1", auth=tuple(FLOWER_AUTH.split(":")),
                            timeout=10)
        if resp.status_code == 200 and resp.json().get("data"):
            return
        time.sleep(0.5)
    pytest.fail("Flower never saw the worker")


def test_secrets_canary_in_no_sink_after_success_and_failure(canary_registry, rel_settings, own_redis, stack,
                                                             tmp_path: Path, caplog: pytest.LogCaptureFixture):
    caplog.set_level(logging.DEBUG)
    reg = canary_registry
    s = with_hosts(rel_settings, reg.host)
    image = push_test_image(reg, f"secret/app-{uuid.uuid4().hex[:6]}", "1")
    src = f"{reg.host}/{image.repo}:1"
    api = api_for(s)
    procs = stack(s)
    flower_port = free_port()
    procs.worker()
    procs.beat()
    dump = procs.celery_process("events", ["events", "--dump"], "evdump")
    procs.celery_process("flower", ["flower", "--conf=deploy/flowerconfig.py"], "Visit me at",
                         env={"NITROCONV_FLOWER_ADDR": f"127.0.0.1:{flower_port}",
                              "NITROCONV_FLOWER_BASIC_AUTH": FLOWER_AUTH})

    _wait_until_flower_sees_a_worker(flower_port)

    good = {"username": USER, "password": GOOD}
    responses: list[str] = []
    ok_id = api.submit(src, f"{reg.host}/secret/out-ok:1", auth=good, output_auth=good, responses=responses)
    bad_id = api.submit(src, f"{reg.host}/secret/out-bad:1", auth={"username": USER, "password": BAD},
                        output_auth={"username": USER, "password": BAD}, responses=responses)
    ok_build, bad_build = wait_terminal(s, ok_id), wait_terminal(s, bad_id)
    assert ok_build.conversion_state == "SUCCEEDED", (ok_build.error_code, ok_build.error_message)
    assert (bad_build.conversion_state, bad_build.error_code) == ("FAILED", "unauthorized")
    assert row(s, ok_id).input_username == USER  # the user name is kept (shown back); the password never is

    headers = api.tenant.headers()
    for path in (f"/v1/builds/{ok_id}", f"/v1/builds/{bad_id}", "/v1/builds"):
        resp = api.client.get(path, headers=headers)  # type: ignore[attr-defined]
        assert resp.status_code == 200
        responses.append(resp.get_data(as_text=True))

    flower = requests.get(f"http://127.0.0.1:{flower_port}/api/tasks", auth=tuple(FLOWER_AUTH.split(":")),
                          timeout=10)
    assert flower.status_code == 200, flower.text
    tasks = flower.json()
    conversions = {tid: t for tid, t in tasks.items() if t.get("name") == "nitroconv.convert.v1"}
    assert {ok_id, bad_id} <= set(conversions)
    for tid, task in conversions.items():
        # The message carries the build id and nothing else (RELIABILITY.md §3: Flower shows arguments).
        assert task["args"] in (f"['{tid}']", f"('{tid}',)"), task["args"]
        assert task["kwargs"] in ("{}", None), task["kwargs"]

    url = make_url(s.database_url)
    pg_dump = subprocess.run(["pg_dump", "-h", url.host or "127.0.0.1", "-p", str(url.port or 5432), "-U",
                              url.username or "postgres", "--no-owner", url.database or ""],
                             check=True, capture_output=True).stdout
    assert b"COPY public.builds" in pg_dump and ok_id.encode() in pg_dump

    redis = own_redis.client()
    # The AOF is never rewritten here, so it holds every message ever queued, acked or not.
    aof = b"".join(p.read_bytes() for p in own_redis.workdir.rglob("*") if p.is_file())
    assert ok_id.encode() in aof  # the AOF does record the queued messages, so the check below means something

    sinks: dict[str, bytes] = {
        "postgres": pg_dump,
        "redis keys and values": b"\n".join(_redis_values(redis)),
        "redis aof and log": aof,
        "flower": flower.content,
        "api responses": "\n".join(responses).encode(),
        "api and test logs": caplog.text.encode(),
        "error messages": f"{bad_build.error_message}\n{ok_build.error_message}".encode(),
    }
    for log in tmp_path.rglob("*.log"):
        sinks[str(log.relative_to(tmp_path))] = log.read_bytes()
    assert f"{ok_id}".encode() in dump.log.read_bytes()  # the event stream was captured
    for name, data in sinks.items():
        for canary in (GOOD, BAD):
            assert canary.encode() not in data, f"{canary} leaked into {name}"
