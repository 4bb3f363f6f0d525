"""deploy/: Compose accepts the compose file, the Dockerfiles build with the local engine, and the worker image
converts like the host does."""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest
import yaml

from tests.fixtures.debian_images import build_image
from tests.fixtures.devblobs import build_shim, recorded_sums, runtime_target
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import PushSession, image_config, make_layer, push_test_image
from tests.fixtures.registries import RunningRegistry
from tests.fixtures.repo import REPO
from tests.fixtures.require import skip_or_fail
from tests.layertar import LayerTar

pytestmark = pytest.mark.integration

NITROCONV = REPO / ".venv" / "bin" / "nitroconv"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def test_deploy_images_compose_file_validates(tmp_path: Path) -> None:
    """Compose itself resolves the file with the example env: interpolation, anchors, depends_on conditions."""
    if shutil.which("docker-compose") is not None:
        compose = ["docker-compose"]
    elif subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        compose = ["docker", "compose"]
    else:
        skip_or_fail("neither docker-compose nor the docker compose plugin is installed (deploy/apt-deps.sh)")
    deploy = REPO / "deploy"
    done = subprocess.run([*compose, "-p", "nitroconv", "-f", str(deploy / "compose.yaml"),
                           "--env-file", str(deploy / "nitroconv.env.example"), "config"],
                          capture_output=True, text=True, env={**os.environ, "NITROCONV_HOST_BLOBS": "/blobs"})
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    worker = resolved["services"]["worker"]
    assert worker["environment"]["NITROCONV_DATABASE_URL"] == "postgresql://nitroconv:change-me@postgres:5432/nitroconv"
    assert any(str(v).startswith("/blobs:/usr/share/nitro_enclaves/blobs") or
               (isinstance(v, dict) and v.get("source") == "/blobs") for v in worker["volumes"]), worker["volumes"]
    # Without a required secret Compose refuses to resolve the file at all.
    (tmp_path / "empty.env").write_text("")
    empty = subprocess.run([*compose, "-p", "nitroconv", "-f", str(deploy / "compose.yaml"),
                            "--env-file", str(tmp_path / "empty.env"), "config", "-q"],
                           capture_output=True, text=True,
                           env={k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")})
    assert empty.returncode != 0 and "set in nitroconv.env" in empty.stderr + empty.stdout


@pytest.fixture(scope="module")
def worker_image(docker_engine: docker.DockerClient, python_base: str) -> str:
    return build_image(docker_engine, "worker.Dockerfile", "nitroconv-test/worker:latest", python_base)


@pytest.fixture(scope="module")
def api_image(docker_engine: docker.DockerClient, python_base: str) -> str:
    return build_image(docker_engine, "api.Dockerfile", "nitroconv-test/api:latest", python_base)


@dataclass(frozen=True)
class Conversion:
    measurements: dict[str, str]
    eif: bytes
    output_digest: str


def _output_digest(registry: RunningRegistry, tag: str) -> str:
    head = PushSession(registry).request("HEAD", f"/v2/deploy/app-enclave/manifests/{tag}", "deploy/app-enclave",
                                         headers={"Accept": OCI_MANIFEST})
    assert head.status_code == 200, head.status_code
    return head.headers["Docker-Content-Digest"]


@pytest.fixture(scope="module")
def input_ref(registry: RunningRegistry) -> str:
    app = (LayerTar().dir("srv", mtime=1_700_000_001).dir("srv/app", uid=1000, gid=1000)
           .file("srv/app/run.sh", b"#!/bin/sh\necho run\n", mode=0o755, uid=1000, gid=1000)
           .symlink("srv/app/current", "/srv/app/run.sh").bytes())
    layers = [make_layer(busybox_base_tar()), make_layer(app)]
    config = image_config([lay.diff_id for lay in layers], cmd=["/srv/app/run.sh"], WorkingDir="/srv/app")
    return push_test_image(registry, "deploy/app", "v1", layers, config=config).ref


def _convert_args(registry: RunningRegistry, input_ref: str, tag: str) -> list[str]:
    return ["convert-local", "--input", input_ref, "--output", f"{registry.host}/deploy/app-enclave:{tag}",
            "--insecure-registry", registry.host]


@pytest.fixture(scope="module")
def host_conversion(registry: RunningRegistry, input_ref: str, blobs_dir: Path, tmp_path_factory) -> Conversion:
    work = tmp_path_factory.mktemp("host")
    env = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}
    env["NITROCONV_STATE_DIR"] = str(work / "state")
    done = subprocess.run([str(NITROCONV), *_convert_args(registry, input_ref, "host"), "--blobs", str(blobs_dir),
                           "--runtime", str(build_shim(runtime_target()).parent), "--eif-out", str(work / "app.eif")],
                          cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    return Conversion(json.loads(done.stdout)["Measurements"], (work / "app.eif").read_bytes(),
                      _output_digest(registry, "host"))


@pytest.fixture(scope="module")
def image_conversion(docker_engine: docker.DockerClient, worker_image: str, registry: RunningRegistry,
                     input_ref: str, blobs_dir: Path, tmp_path_factory) -> Conversion:
    """The worker image's own converter, runtime binaries and settings; the blobs mounted where it expects them."""
    out = tmp_path_factory.mktemp("image")
    out.chmod(0o777)  # the image runs as its own unprivileged user
    try:
        logs = docker_engine.containers.run(
            worker_image, ["nitroconv", *_convert_args(registry, input_ref, "image"), "--eif-out", "/out/app.eif"],
            network_mode="host", remove=True, stdout=True, stderr=False,
            volumes={str(blobs_dir.resolve()): {"bind": "/usr/share/nitro_enclaves/blobs", "mode": "ro"},
                     str(out): {"bind": "/out", "mode": "rw"}})
    except docker.errors.ContainerError as exc:
        pytest.fail(f"the worker image's converter failed: {exc.stderr!r}")
    return Conversion(json.loads(logs)["Measurements"], (out / "app.eif").read_bytes(),
                      _output_digest(registry, "image"))


def _runtime_from(client: docker.DockerClient, image: str) -> dict[str, bytes]:
    """The runtime binaries inside `image` (`docker cp`'s tar of /opt/nitroconv/runtime)."""
    container = client.containers.create(image)
    try:
        stream, _ = container.get_archive("/opt/nitroconv/runtime")
        with tarfile.open(fileobj=io.BytesIO(b"".join(stream))) as tar:
            return {Path(m.name).name: tar.extractfile(m).read()  # type: ignore[union-attr]
                    for m in tar.getmembers() if m.isfile()}
    finally:
        container.remove()


# A cold run debootstraps the base and builds both images on the vfs driver (about 12 min here under load; the
# second image reuses the first's dependency layers): above the suite's 600 s, hence the engine tests' own timeout.
@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_deploy_images_worker_image_converts_like_the_host(docker_engine, worker_image, host_conversion,
                                                          image_conversion) -> None:
    built = _runtime_from(docker_engine, worker_image)
    host = build_shim(runtime_target()).parent
    assert set(built) == {"run", "shim", "attestd", "netd", "egressd", "egress"}
    # The same pinned zig, musl and flags (worker/runtime/Makefile) whatever the base image has: the binaries
    # built inside the image are the recorded ones and the host's to the byte, hence the whole EIF is.
    recorded = recorded_sums()
    assert {name: hashlib.sha256(data).hexdigest() for name, data in built.items()} == {
        name: recorded[name] for name in built}
    assert built == {name: (host / name).read_bytes() for name in built}
    assert image_conversion.measurements == host_conversion.measurements
    assert image_conversion.eif == host_conversion.eif
    assert image_conversion.output_digest == host_conversion.output_digest


@pytest.mark.docker
@pytest.mark.timeout(1500)
def test_deploy_images_api_image_loads_the_app(docker_engine, api_image) -> None:
    """The image's own gunicorn and settings load `api.app:create_app()` (`--check-config` imports the app)."""
    env = {"NITROCONV_DATABASE_URL": "postgresql://nitroconv@127.0.0.1:5432/nitroconv",
           "NITROCONV_REDIS_URL": "redis://127.0.0.1:6379/0"}
    try:
        docker_engine.containers.run(
            api_image, ["gunicorn", "-c", "deploy/gunicorn.conf.py", "--check-config", "api.app:create_app()"],
            environment=env, network_mode="host", remove=True, stderr=True)
    except docker.errors.ContainerError as exc:
        pytest.fail(f"the API image does not load its app: {exc.stderr!r}")
    user = docker_engine.images.get(api_image).attrs["Config"]["User"]
    assert user == "nitroconv"
