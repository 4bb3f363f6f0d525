"""Converted images run by the Docker engine: /enclave/run as the entrypoint in --dry-run, with and without an
output base image (NITROCONV_OUTPUT_BASE_IMAGE), run-time env and arguments as `docker run` passes them."""
from __future__ import annotations

import hashlib
import io
import json
import tarfile
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import docker
import docker.errors
import pytest

from common.registry.client import Credentials
from tests.fixtures.devblobs import RUNTIME_RECIPE, build_shim, make, runtime_target
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import (
    OCI_MANIFEST,
    PushedImage,
    PushSession,
    image_config,
    make_layer,
    push_test_image,
)
from tests.fixtures.registries import RunningRegistry
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.outputimage import FIXED_CREATED, LABEL_PREFIX
from worker.pipeline.spec import ConverterOptions, ConvertResult, ConvertSpec, Progress, Workspace

pytestmark = [pytest.mark.integration, pytest.mark.docker]

COMMAND = "nitro-cli run-enclave --eif-path /enclave/app.eif --cpu-count 2 --memory 512"


@pytest.fixture(scope="module")
def runtime() -> Path:
    target = runtime_target()
    build_shim(target)
    make(RUNTIME_RECIPE, f"RUNTIME={target}", f"{target}/run")
    return target


@pytest.fixture(scope="module")
def session_id() -> str:
    return uuid.uuid4().hex[:12]


@pytest.fixture(scope="module")
def app_image(registry: RunningRegistry, session_id: str) -> PushedImage:
    layer = make_layer(busybox_base_tar())
    return push_test_image(registry, "launcher/app", session_id, [layer],
                           config=image_config([layer.diff_id], cmd=["/bin/echo", "hello"]))


# Stands in for nitro-cli (absent here) in the base image: prints its argv, exits with $FAKE_STATUS.
FAKE_NITRO_CLI = b"""#!/bin/sh
echo "fake-nitro-cli $*"
exit "${FAKE_STATUS:-0}"
"""


def executable_tar(files: Mapping[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 0
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.fixture(scope="module")
def base_image(registry: RunningRegistry, session_id: str) -> PushedImage:
    """A Docker-schema base (as `docker push` makes them): busybox, then a layer with a stand-in nitro-cli; a label,
    a CMD, history and a stale measurement label."""
    layers = [make_layer(busybox_base_tar(), "gzip", "docker"),
              make_layer(executable_tar({"usr/bin/nitro-cli": FAKE_NITRO_CLI}), "gzip", "docker")]
    config = image_config([layer.diff_id for layer in layers], cmd=["/bin/sh"],
                          Labels={"org.example.base": "yes", LABEL_PREFIX + "pcr8": "stale"})
    config["history"] = [{"created": "2020-09-13T12:26:40Z", "created_by": "busybox rootfs"},
                         {"created": "2020-09-13T12:26:41Z", "created_by": "nitro-cli"}]
    return push_test_image(registry, "launcher/base", session_id, layers, config=config, media="docker")


@dataclass(frozen=True)
class Output:
    result: ConvertResult
    repository: str
    tag: str
    kept: Path | None = None


def _convert(registry: RunningRegistry, blobs: Path, runtime: Path, work: Path, source: str, output: str,
             options: ConverterOptions, base: str = "", keep_layer: Path | None = None) -> Output:
    spec = ConvertSpec(input_ref=source, output_ref=output, input_credentials=None, output_credentials=None,
                       options=options, cpu_count=2, mem_size_mib=512)
    host = ConversionHost(blobs_dir=blobs, runtime_dir=runtime, cache_dir=work / "cache",
                          insecure_registries=frozenset({registry.host}), output_base=base)
    result = convert(spec, host, Progress(), Workspace(work / "scratch", keep_layer=keep_layer))
    repository, _, tag = result.output_reference.partition("@")[0].rpartition(":")
    return Output(result, repository, tag, keep_layer)


@pytest.fixture(scope="module")
def plain(registry: RunningRegistry, blobs_dir: Path, runtime: Path, app_image: PushedImage, session_id: str,
          tmp_path_factory: pytest.TempPathFactory) -> Output:
    work = tmp_path_factory.mktemp("plain")
    return _convert(registry, blobs_dir, runtime, work, app_image.ref,
                    f"{registry.host}/launcher/plain:{session_id}",
                    ConverterOptions(mutable_env_vars=("GREETING=hello", "LEVEL=1")), keep_layer=work / "kept.layer")


@pytest.fixture(scope="module")
def based(registry: RunningRegistry, blobs_dir: Path, runtime: Path, app_image: PushedImage, base_image: PushedImage,
          session_id: str, tmp_path_factory: pytest.TempPathFactory) -> Output:
    return _convert(registry, blobs_dir, runtime, tmp_path_factory.mktemp("based"), app_image.ref,
                    f"{registry.host}/launcher/based:{session_id}",
                    ConverterOptions(mutable_env_vars=("GREETING=hello",), allow_cmdline_args=True), base_image.ref)


@pytest.fixture
def engine_image(docker_engine: docker.DockerClient) -> Iterator[Callable[[Output], str]]:
    """Pull outputs into the engine; everything pulled is removed afterwards."""
    pulled: list[str] = []

    def pull(output: Output) -> str:
        image = docker_engine.images.pull(output.repository, tag=output.tag)
        pulled.append(image.id)
        return str(image.id)

    yield pull
    for image_id in pulled:
        try:
            docker_engine.images.remove(image_id, force=True)
        except docker.errors.ImageNotFound:
            pass


@dataclass(frozen=True)
class Ran:
    status: int
    stdout: str
    stderr: str


def docker_run(engine: docker.DockerClient, image: str, command: Sequence[str] = (),
               environment: Mapping[str, str] | None = None, entrypoint: Sequence[str] | None = None) -> Ran:
    # network_mode none: the test engine runs without a bridge, and the launcher needs no network for --dry-run.
    container = engine.containers.create(image, command=list(command), environment=dict(environment or {}),
                                         entrypoint=list(entrypoint) if entrypoint else None, network_mode="none")
    try:
        container.start()
        status = container.wait(timeout=60)["StatusCode"]
        return Ran(status, container.logs(stdout=True, stderr=False).decode(),
                   container.logs(stdout=False, stderr=True).decode())
    finally:
        container.remove(force=True)


def fields(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines())


def registry_json(registry: RunningRegistry, repository: str, path: str) -> dict[str, object]:
    repo = repository.partition("/")[2]
    resp = PushSession(registry).request("GET", f"/v2/{repo}/{path}", repo, headers={"Accept": OCI_MANIFEST})
    assert resp.status_code == 200
    doc = json.loads(resp.content)
    assert isinstance(doc, dict)
    return doc


def output_documents(registry: RunningRegistry, output: Output) -> tuple[dict, dict]:
    manifest = registry_json(registry, output.repository, f"manifests/{output.result.output_digest}")
    config = registry_json(registry, output.repository, f"blobs/{manifest['config']['digest']}")  # type: ignore[index]
    return manifest, config


# --- without a base ---------------------------------------------------------------------------------------------


def test_output_image_dry_run_prints_the_nitro_cli_command(docker_engine: docker.DockerClient, plain: Output,
                                                           engine_image: Callable[[Output], str]) -> None:
    image = engine_image(plain)
    ran = docker_run(docker_engine, image, ["--dry-run"])
    assert ran.status == 0, ran.stderr
    got = fields(ran.stdout)
    assert got["command"] == COMMAND
    assert got["env"] == "(none set)" and got["allowed env"] == "2" and got["args"] == "0"
    assert got["nitro-cli"].startswith("not found") and "NITROCONV_OUTPUT_BASE_IMAGE" in got["nitro-cli"]


def test_output_image_dry_run_shows_docker_run_env_names_not_values(
        docker_engine: docker.DockerClient, plain: Output, engine_image: Callable[[Output], str]) -> None:
    ran = docker_run(docker_engine, engine_image(plain), ["--dry-run"],
                     environment={"GREETING": "v-secret", "NOT_ALLOWED": "x"})
    assert ran.status == 0, ran.stderr
    assert fields(ran.stdout)["env"] == "GREETING"
    assert "v-secret" not in ran.stdout + ran.stderr


def test_output_image_refuses_arguments_when_not_allowed(docker_engine: docker.DockerClient, plain: Output,
                                                         engine_image: Callable[[Output], str]) -> None:
    ran = docker_run(docker_engine, engine_image(plain), ["--dry-run", "extra"])
    assert ran.status == 2
    assert "does not accept extra arguments (allow_cmdline_args is false)" in ran.stderr


def test_output_image_without_nitro_cli_fails_naming_the_base_setting(
        docker_engine: docker.DockerClient, plain: Output, engine_image: Callable[[Output], str]) -> None:
    ran = docker_run(docker_engine, engine_image(plain))
    assert ran.status == 127
    assert "nitro-cli was not found" in ran.stderr and "NITROCONV_OUTPUT_BASE_IMAGE" in ran.stderr


def test_output_image_has_launcher_entrypoint_and_one_layer(registry: RunningRegistry, plain: Output) -> None:
    manifest, config = output_documents(registry, plain)
    assert len(manifest["layers"]) == 1  # type: ignore[arg-type]
    assert config["config"]["Entrypoint"] == ["/enclave/run"]  # type: ignore[index]
    assert "Cmd" not in config["config"]  # type: ignore[operator]
    assert config["created"] == FIXED_CREATED


def test_output_image_layer_is_kept_as_pushed(registry: RunningRegistry, plain: Output) -> None:
    """keep_layer: the pushed layer's bytes stay outside scratch, described by layer_blob and layer_diff_id."""
    manifest, config = output_documents(registry, plain)
    blob = plain.result.layer_blob
    assert blob is not None and plain.result.reused_from is None and plain.kept is not None
    layer = manifest["layers"][-1]  # type: ignore[index]
    assert (layer["digest"], layer["size"], layer["mediaType"]) == (blob.digest, blob.size, blob.media_type)
    assert config["rootfs"]["diff_ids"][-1] == plain.result.layer_diff_id  # type: ignore[index]
    data = plain.kept.read_bytes()
    assert (f"sha256:{hashlib.sha256(data).hexdigest()}", len(data)) == (blob.digest, blob.size)


# --- on a base image --------------------------------------------------------------------------------------------


def test_output_image_on_base_has_base_layers_then_ours(registry: RunningRegistry, based: Output,
                                                        base_image: PushedImage) -> None:
    manifest, config = output_documents(registry, based)
    layers = manifest["layers"]
    assert isinstance(layers, list) and len(layers) == 3
    # Same bytes, named with the OCI type in an OCI manifest.
    assert layers[:2] == [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": layer.digest,
                           "size": len(layer.blob)} for layer in base_image.layers]
    diff_ids = config["rootfs"]["diff_ids"]  # type: ignore[index]
    assert diff_ids[:2] == [layer.diff_id for layer in base_image.layers] and len(diff_ids) == 3
    inner = config["config"]
    assert isinstance(inner, dict)
    assert inner["Entrypoint"] == ["/enclave/run"] and "Cmd" not in inner
    assert inner["Env"] == json.loads(base_image.config_bytes)["config"]["Env"]
    labels = inner["Labels"]
    assert labels["org.example.base"] == "yes"
    assert LABEL_PREFIX + "pcr8" not in labels  # the base's stale measurement is not carried over
    assert labels[LABEL_PREFIX + "pcr0"] == based.result.measurements.pcr0
    assert labels[LABEL_PREFIX + "base"] == f"{base_image.registry_host}/{base_image.repo}@{base_image.digest}"
    history = config["history"]
    assert isinstance(history, list) and history[:2] == json.loads(base_image.config_bytes)["history"]
    assert len(history) == 3 and history[2]["created"] == FIXED_CREATED
    assert based.result.output_size > sum(len(layer.blob) for layer in base_image.layers)


def test_output_image_on_base_mounts_base_layers_within_the_registry(registry: RunningRegistry, based: Output,
                                                                     base_image: PushedImage) -> None:
    for layer in base_image.layers:
        digest = layer.digest.replace(":", "%3A")
        assert registry.log_lines(rf"POST /v2/launcher/based/blobs/uploads/\?.*mount={digest}"), \
            f"base layer {layer.digest} was not cross-repository mounted"
        # Mounted, so never uploaded: no PUT completing an upload of it.
        assert not registry.log_lines(rf"PUT /v2/launcher/based/blobs/uploads/\S*digest={digest}")


def test_output_image_on_base_runs_in_docker(docker_engine: docker.DockerClient, based: Output,
                                             engine_image: Callable[[Output], str]) -> None:
    image = engine_image(based)
    ran = docker_run(docker_engine, image, ["--dry-run", "--", "first", "--second"], environment={"GREETING": "hey"})
    assert ran.status == 0, ran.stderr
    got = fields(ran.stdout)
    assert got["command"] == COMMAND and got["env"] == "GREETING" and got["args"] == "2"
    # The base's files and ours are both in the container's filesystem.
    listed = docker_run(docker_engine, image, ["/enclave"], entrypoint=["/bin/ls"])
    assert listed.status == 0, listed.stderr
    assert listed.stdout.split() == ["app.eif", "egress", "launch.json", "measurements.json", "run"]


def test_output_image_on_base_runs_the_base_nitro_cli_with_its_status(
        docker_engine: docker.DockerClient, based: Output, engine_image: Callable[[Output], str]) -> None:
    image = engine_image(based)
    dry = docker_run(docker_engine, image, ["--dry-run"])
    assert fields(dry.stdout)["nitro-cli"] == "/usr/bin/nitro-cli"
    ran = docker_run(docker_engine, image, environment={"FAKE_STATUS": "3"})
    assert ran.status == 3, ran.stderr
    assert ran.stdout.strip() == f"fake-nitro-cli {COMMAND.partition(' ')[2]}"


def test_output_image_on_base_is_deterministic(registry: RunningRegistry, blobs_dir: Path, runtime: Path,
                                               app_image: PushedImage, base_image: PushedImage, based: Output,
                                               session_id: str, tmp_path: Path) -> None:
    again = _convert(registry, blobs_dir, runtime, tmp_path, app_image.ref,
                     f"{registry.host}/launcher/based-again:{session_id}",
                     ConverterOptions(mutable_env_vars=("GREETING=hello",), allow_cmdline_args=True), base_image.ref)
    assert again.result.output_digest == based.result.output_digest


def test_output_image_on_base_from_another_registry_copies_layers(
        registry: RunningRegistry, basic_registry: RunningRegistry, blobs_dir: Path, runtime: Path,
        app_image: PushedImage, base_image: PushedImage, session_id: str, tmp_path: Path) -> None:
    """The base on one registry, the output on another: the layer is fetched (via the blob cache) and uploaded."""
    spec = ConvertSpec(input_ref=app_image.ref, output_ref=f"{basic_registry.host}/launcher/copied:{session_id}",
                input_credentials=None,
                output_credentials=Credentials(basic_registry.username or "", basic_registry.password or ""),
                options=ConverterOptions(), cpu_count=2, mem_size_mib=512)
    host = ConversionHost(blobs_dir=blobs_dir, runtime_dir=runtime, cache_dir=tmp_path / "cache",
                          insecure_registries=frozenset({registry.host, basic_registry.host}), output_base=base_image.ref)
    result = convert(spec, host, Progress(), Workspace(tmp_path / "scratch"))
    output = Output(result, f"{basic_registry.host}/launcher/copied", session_id)
    manifest, _ = output_documents(basic_registry, output)
    assert [d["digest"] for d in manifest["layers"][:2]] == [b.digest for b in base_image.layers]  # type: ignore[index]
    for layer in base_image.layers:
        blob = PushSession(basic_registry).request("GET", f"/v2/launcher/copied/blobs/{layer.digest}",
                                                   "launcher/copied")
        assert blob.status_code == 200 and blob.content == layer.blob

