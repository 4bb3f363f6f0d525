"""The exec shim booted for real: a Docker-built image converted, booted under QEMU, and compared with `docker run`.

The probe prints its cwd, identity, groups, argv and environment; the enclave must show what the Docker
engine shows for the same image (USER from the image's /etc/passwd and /etc/group, WORKDIR, HOME, the bare
ENTRYPOINT found on the image's PATH). Under QEMU no parent answers on vsock, so this is also the no-parent
path: the allow-list's defaults apply and the shim says so in one console line.
"""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import docker
import pytest

from tests.fixtures.devblobs import DevBlobs
from tests.fixtures.registries import RunningRegistry
from worker.pipeline.bootcheck import BootResult, boot_eif
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

pytestmark = [pytest.mark.e2e, pytest.mark.qemu, pytest.mark.docker]

TIMEOUT = 180.0
SESSION_LABEL = "nitroconv-test.session"
PASSWD = "root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:App:/home/app:/bin/sh\n"
GROUP = "root:x:0:\napp:x:1000:\nwheel:x:10:root,app\nstaff:x:50:app\nothers:x:60:nobody\n"
# Every line the probe prints starts with "P ", so it can be told apart from console and shim lines.
PROBE = """#!/bin/sh
echo "P CWD $(pwd)"
echo "P ID $(id)"
for a in "$0" "$@"; do echo "P ARG[$a]"; done
env | sort | sed 's/^/P ENV /'
"""
DOCKERFILE = """\
FROM {base}
ARG SESSION
LABEL {label}=$SESSION
COPY passwd group /etc/
COPY probe /usr/local/bin/probe
RUN chmod 0755 /usr/local/bin/probe && mkdir -p /srv/app /home/app && chown 1000:1000 /srv/app /home/app
ENV PATH=/usr/local/bin:/usr/bin:/bin GREETING="hello world" MODE=image-value
{user_and_workdir}
ENTRYPOINT ["probe"]
CMD ["one", "two words", ""]
"""
# USER by name with WORKDIR (supplementary groups from /etc/group, HOME from /etc/passwd); USER as
# uid:group-name without WORKDIR (the group replaces the supplementary ones; cwd is /).
VARIANTS = {
    "name-workdir": "WORKDIR /srv/app\nUSER app",
    "uid-group": "USER 1000:staff",
}
MUTABLE_DEFAULT = "MODE=enclave-default"
# Docker adds HOSTNAME to every container; an enclave has no container hostname to give.
DOCKER_ONLY_ENV = ("P ENV HOSTNAME=",)


@dataclass(frozen=True)
class Probed:
    variant: str
    docker_lines: list[str]
    boot: BootResult


def _probe_lines(lines: Iterator[str] | list[str] | tuple[str, ...]) -> list[str]:
    return [line for line in lines if line.startswith("P ") and not line.startswith(DOCKER_ONLY_ENV)]


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def probed(request: pytest.FixtureRequest, docker_engine: docker.DockerClient, docker_base_image: str,
           registry: RunningRegistry, dev_blobs: DevBlobs, runtime_dir: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Probed]:
    session = uuid.uuid4().hex[:12]
    context = tmp_path_factory.mktemp("probe-context")
    (context / "Dockerfile").write_text(DOCKERFILE.format(base=docker_base_image, label=SESSION_LABEL,
                                                          user_and_workdir=VARIANTS[request.param]))
    (context / "passwd").write_text(PASSWD)
    (context / "group").write_text(GROUP)
    (context / "probe").write_text(PROBE)
    ref = f"nitroconv-test/shim-probe:{session}"
    try:
        docker_engine.images.build(path=str(context), tag=ref, buildargs={"SESSION": session}, network_mode="host",
                                   rm=True, forcerm=True, pull=False)
        # The mutable default is what `docker run -e` would give: the same value on both sides.
        out = docker_engine.containers.run(ref, environment=[MUTABLE_DEFAULT], network_mode="none", remove=True,
                                           stdout=True, stderr=True)
        work = tmp_path_factory.mktemp("probe-convert")
        spec = ConvertSpec(input_ref=f"docker-daemon:{ref}", output_ref=f"{registry.host}/shim/probe:{session}",
                           input_credentials=None, output_credentials=None,
                           options=ConverterOptions(mutable_env_vars=(MUTABLE_DEFAULT,)), cpu_count=1,
                           mem_size_mib=None)
        eif = work / "app.eif"
        host = ConversionHost(blobs_dir=dev_blobs.dir, runtime_dir=runtime_dir, cache_dir=work / "cache",
                              insecure_registries=frozenset({registry.host}))
        convert(spec, host, Progress(), Workspace(work / "scratch", eif_out=eif))
        boot = boot_eif(eif, timeout=TIMEOUT, settle=TIMEOUT)
        yield Probed(request.param, out.decode().splitlines(), boot)
    finally:
        for image in docker_engine.images.list(filters={"label": f"{SESSION_LABEL}={session}"}):
            docker_engine.images.remove(image.id, force=True)


def test_shim_boot_program_sees_what_docker_run_shows(probed: Probed) -> None:
    assert probed.boot.ok, probed.boot.console_tail
    assert probed.boot.exit_status == 0
    theirs = _probe_lines(probed.docker_lines)
    ours = _probe_lines(probed.boot.program_output)
    assert ours == theirs
    # What the comparison covered (so equality means something): USER, WORKDIR, HOME, argv, PATH lookup.
    if probed.variant == "name-workdir":
        assert "P CWD /srv/app" in theirs
        assert any(line.startswith("P ID uid=1000(app) gid=1000(app) groups=") and "50(staff)" in line
                   and "10(wheel)" in line for line in theirs)
    else:
        assert "P CWD /" in theirs
        assert "P ID uid=1000(app) gid=50(staff) groups=50(staff)" in theirs
    assert "P ENV HOME=/home/app" in theirs and f"P ENV {MUTABLE_DEFAULT}" in theirs
    assert theirs.count("P ARG[]") == 1 and "P ARG[two words]" in theirs


def test_shim_boot_without_parent_applies_defaults_and_says_so(probed: Probed) -> None:
    console = [*probed.boot.program_output, *probed.boot.console_tail]
    notes = {line for line in console if line.startswith("nitroconv-shim: no run-time values")}
    assert len(notes) == 1, console
    assert "using the defaults" in notes.pop()
    assert f"P ENV {MUTABLE_DEFAULT}" in probed.boot.program_output
