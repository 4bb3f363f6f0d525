"""Egress of a converted enclave end to end in the emulator: a busybox image converted with a network policy, booted
by `nitroconv run-local` (QEMU's nitro-enclave machine, real vsock, the init starting egressd from the measured
ramdisk, the launcher spawning the parent's egress service on <uds>_9002). The parent side runs in a network
namespace of the test's own, joined by a veth pair to a test host serving HTTP; names are the parent's /etc/hosts.
The program reaches an allowed service by name and by address, is refused a denied one, and DNS of a denied name
fails, in proxy mode (busybox wget honouring http_proxy) and in transparent mode (plain connections, redirected)."""
from __future__ import annotations

import os
import socket
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.devblobs import DevBlobs
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import image_config, make_layer, make_tar, push_test_image
from tests.fixtures.registries import RunningRegistry
from tests.fixtures.repo import REPO
from tests.fixtures.require import skip_or_fail
from tests.integration.test_egress import (
    BUSYBOX_POLICY,
    BUSYBOX_PROXY_SCRIPT,
    BUSYBOX_TRANSPARENT_SCRIPT,
    HOST_A,
    HOST_B,
    HOSTS,
    SUBNET,
    TAG,
    EchoHttp,
    Netns,
    ThreadedServer,
    check_program_lines,
    ip,
    nxdomain_server,
)
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

pytestmark = [pytest.mark.e2e, pytest.mark.qemu]

NITROCONV = REPO / ".venv" / "bin" / "nitroconv"
TIMEOUT = 300
@pytest.fixture(scope="module")
def emulator() -> Path:
    state = Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state")
    qemu = state / "emulator" / "qemu-system-x86_64"
    if not os.access(qemu, os.X_OK):
        skip_or_fail(f"no emulator at {qemu} (make setup builds QEMU's nitro-enclave machine)")
    if os.geteuid() != 0:
        skip_or_fail("network namespaces need root")
    return qemu


@pytest.fixture(scope="module")
def parent_ns(emulator: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Netns, Path]]:
    root = tmp_path_factory.mktemp("egress-e2e")
    (root / "hosts").write_text("127.0.0.1 localhost\n" + HOSTS)
    (root / "resolv.conf").write_text("nameserver 127.0.0.1\n")
    par, svc = Netns(f"{TAG}-e2p"), Netns(f"{TAG}-e2s")
    servers: list[ThreadedServer] = []
    try:
        ip("link", "add", f"{TAG}-ep", "netns", par.name, "type", "veth", "peer", "name", f"{TAG}-es",
            "netns", svc.name)
        ip("-n", par.name, "addr", "add", f"{SUBNET}.1/24", "dev", f"{TAG}-ep")
        ip("-n", par.name, "link", "set", f"{TAG}-ep", "up")
        for host in (HOST_A, HOST_B):
            ip("-n", svc.name, "addr", "add", f"{host}/24", "dev", f"{TAG}-es")
        ip("-n", svc.name, "link", "set", f"{TAG}-es", "up")
        for host, port in ((HOST_A, 8080), (HOST_A, 8081), (HOST_B, 8080)):
            server = svc.call(ThreadedServer, (host, port), EchoHttp)
            servers.append(server)
            threading.Thread(target=server.serve_forever, daemon=True).start()
        resolver = par.call(socket.socket, socket.AF_INET, socket.SOCK_DGRAM)
        resolver.bind(("127.0.0.1", 53))
        threading.Thread(target=nxdomain_server, args=(resolver,), daemon=True).start()
        yield par, root
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
        par.close()
        svc.close()


def _eif(registry: RunningRegistry, dev_blobs: DevBlobs, runtime_dir: Path, work: Path, mode: str,
         script: str) -> Path:
    base = make_layer(busybox_base_tar())
    # A script file: argv items are one line each in the measured ramdisk (no newlines).
    app = make_layer(make_tar({"app.sh": script.encode()}))
    config = image_config([base.diff_id, app.diff_id], cmd=(), Entrypoint=["/bin/sh", "/app.sh"])
    name = f"egress/app-{uuid.uuid4().hex[:6]}"
    image = push_test_image(registry, name, "v1", [base, app], config=config)
    network = {"egress": {"mode": mode, **BUSYBOX_POLICY}, "hostname": "app", "ingress": []}
    spec = ConvertSpec(input_ref=image.ref, output_ref=f"{registry.host}/{name}-enclave:v1", input_credentials=None,
                       output_credentials=None, options=ConverterOptions(network=network), cpu_count=1,
                       mem_size_mib=None)
    work.mkdir(parents=True)
    host = ConversionHost(blobs_dir=dev_blobs.dir, runtime_dir=runtime_dir, cache_dir=work / "cache",
                          insecure_registries=registry.allowed_hosts)
    convert(spec, host, Progress(), Workspace(work / "scratch", eif_out=work / "app.eif"))
    return work / "app.eif"


def _run_local(parent: tuple[Netns, Path], runtime_dir: Path, eif: Path) -> subprocess.CompletedProcess[str]:
    ns, root = parent
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}
    env = {**clean, "NITROCONV_STATE_DIR": str(Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state")),
           "NITROCONV_RUNTIME_DIR": str(runtime_dir)}
    script = (f'mount --bind "{root}/hosts" /etc/hosts && mount --bind "{root}/resolv.conf" /etc/resolv.conf && '
              f'exec "{NITROCONV}" run-local "{eif}" --console')
    return subprocess.run(["ip", "netns", "exec", ns.name, "sh", "-c", script], env=env, capture_output=True,
                          text=True, timeout=TIMEOUT)


def _lines(done: subprocess.CompletedProcess[str]) -> dict[str, str]:
    return dict(line[2:].split(" ", 1) for line in done.stdout.splitlines() if line.startswith("P "))


@pytest.mark.parametrize("mode", ["proxy", "transparent"])
def test_converted_app_reaches_allowed_and_is_refused_denied(registry, dev_blobs, runtime_dir, parent_ns,
                                                             tmp_path, mode) -> None:
    eif = _eif(registry, dev_blobs, runtime_dir, tmp_path / "w", mode,
               BUSYBOX_PROXY_SCRIPT if mode == "proxy" else BUSYBOX_TRANSPARENT_SCRIPT)
    done = _run_local(parent_ns, runtime_dir, eif)
    check_program_lines(_lines(done), mode, done.stdout[-4000:] + done.stderr[-2000:])
    assert f"nitroconv-egressd: egress {mode}" in done.stdout
    assert "nitroconv-egress: listening on unix socket" in done.stderr
    assert f"connect {HOST_B}" not in done.stderr  # refused inside the enclave: the parent never dialled it
