"""Ingress end to end in the emulator: a converted busybox HTTP app (EXPOSE 8080, no network option in the
request) answers through `nitroconv run-local --publish`, over the real launcher (TCP listener, PROXY v2 header,
the back-end's CONNECT), real vsock in QEMU's nitro-enclave machine and netd in the enclave, which the shim
started after bringing loopback up. The image's /etc/resolv.conf symlink is replaced by the measured file, the
host name is the policy's, a connection storm on the published port does not wedge it, and SIGTERM ends it all.
A port the request publishes with proxy_protocol gives the app a PROXY v2 header naming the TCP client.
Needs the emulator `make setup` builds: skipped without it on a developer's machine, failed under CI."""
from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from common.enclave.network import parse_request
from tests.e2e.test_run_local import NITROCONV, TIMEOUT, _state_dir, emulator  # noqa: F401 - the fixture
from tests.fixtures.devblobs import DevBlobs
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import image_config, make_layer, push_test_image
from tests.fixtures.registries import RunningRegistry
from tests.layertar import LayerTar
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

pytestmark = [pytest.mark.e2e, pytest.mark.qemu]

# The app: what the enclave's /etc says, served by busybox httpd on 8080 (the image's EXPOSE).
APP = ("mkdir -p /www && { hostname; cat /etc/resolv.conf; } > /www/net.txt && echo hello-from-enclave > "
       "/www/index.html && echo P serving && exec httpd -f -p 8080 -h /www")


@pytest.fixture(scope="module")
def http_image(registry: RunningRegistry, dev_blobs: DevBlobs, runtime_dir: Path, emulator: Path,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, object]]:
    base = make_layer(busybox_base_tar())
    # A distribution's resolv.conf is often a symlink to a file the enclave never has.
    extra = make_layer(LayerTar().symlink("etc/resolv.conf", "../run/systemd/resolve/stub-resolv.conf").bytes())
    config = image_config([base.diff_id, extra.diff_id], cmd=(), Entrypoint=["/bin/sh", "-c", APP],
                          ExposedPorts={"8080/tcp": {}, "5353/udp": {}})
    name = f"ingress/web-{uuid.uuid4().hex[:6]}"
    image = push_test_image(registry, name, "v1", [base, extra], config=config)
    out = f"{registry.host}/{name}-enclave:v1"
    spec = ConvertSpec(input_ref=image.ref, output_ref=out, input_credentials=None, output_credentials=None,
                       options=ConverterOptions(), cpu_count=1, mem_size_mib=None)
    work = tmp_path_factory.mktemp("ingress")
    result = convert(spec, ConversionHost(blobs_dir=dev_blobs.dir, runtime_dir=runtime_dir, cache_dir=work / "cache",
                                  insecure_registries=registry.allowed_hosts), Progress(), Workspace(work / "scratch"))
    assert result.network is not None
    return out, result.network


@pytest.fixture(scope="module")
def echo_image(registry: RunningRegistry, dev_blobs: DevBlobs, runtime_dir: Path, emulator: Path,  # noqa: F811
               tmp_path_factory: pytest.TempPathFactory) -> str:
    """An echo server on 9090 (no EXPOSE), published by the request with the PROXY protocol."""
    base = make_layer(busybox_base_tar())
    config = image_config([base.diff_id], cmd=(),
                          Entrypoint=["/bin/sh", "-c", "echo P serving && exec nc -ll -p 9090 -e /bin/cat"])
    name = f"ingress/echo-{uuid.uuid4().hex[:6]}"
    image = push_test_image(registry, name, "v1", [base], config=config)
    out = f"{registry.host}/{name}-enclave:v1"
    network = parse_request({"ingress": [{"port": 9090, "proxy_protocol": True}], "egress": {"mode": "none"}})
    spec = ConvertSpec(input_ref=image.ref, output_ref=out, input_credentials=None, output_credentials=None,
                       options=ConverterOptions(network=network), cpu_count=1, mem_size_mib=None)
    work = tmp_path_factory.mktemp("echo")
    convert(spec, ConversionHost(blobs_dir=dev_blobs.dir, runtime_dir=runtime_dir, cache_dir=work / "cache",
                                  insecure_registries=registry.allowed_hosts), Progress(), Workspace(work / "scratch"))
    return out


class RunLocal:
    """`nitroconv run-local IMAGE --publish 127.0.0.1:0:PORT`, its stderr read as it comes."""

    def __init__(self, registry: RunningRegistry, runtime_dir: Path, ref: str, port: int = 8080) -> None:
        self.published = port
        clean = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}
        env = {**clean, "NITROCONV_STATE_DIR": str(_state_dir()), "NITROCONV_RUNTIME_DIR": str(runtime_dir)}
        self.proc = subprocess.Popen(
            [str(NITROCONV), "run-local", ref, "--insecure-registry", registry.host, "--publish", f"127.0.0.1:0:{port}"],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self.port: int | None = None
        self.ready = threading.Event()
        threading.Thread(target=self._read, args=(self.proc.stderr, self.stderr), daemon=True).start()
        threading.Thread(target=self._read, args=(self.proc.stdout, self.stdout), daemon=True).start()

    def _read(self, stream, lines: list[str]) -> None:  # type: ignore[no-untyped-def]
        for line in stream:
            lines.append(line.rstrip("\n"))
            if "ingress: 127.0.0.1:" in line and f"-> enclave port {self.published}" in line:
                self.port = int(line.split("127.0.0.1:")[1].split()[0])
            if line.startswith("P serving"):
                self.ready.set()

    def get(self, path: str) -> str:
        assert self.port is not None
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=30) as resp:
            return resp.read().decode()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            raise


def test_http_app_answers_through_a_published_port(registry, runtime_dir, http_image) -> None:
    ref, network = http_image
    # A request that said nothing: ingress from EXPOSE (TCP only), CCM's egress, a host name from the image.
    assert network["ingress"] == [{"port": 8080, "proxy_protocol": False}]
    assert network["hostname"] == ref.rsplit("/", 1)[1].split(":")[0].removesuffix("-enclave")  # the input's name
    assert network["egress"]["mode"] == "transparent"  # type: ignore[index]
    run = RunLocal(registry, runtime_dir, ref)
    try:
        assert run.ready.wait(TIMEOUT), "\n".join(run.stdout + run.stderr)
        assert run.port, run.stderr
        # httpd may need a moment after the line that precedes its exec.
        deadline = time.monotonic() + 30
        while True:
            try:
                body = run.get("/")
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        assert body == "hello-from-enclave\n"
        hostname, resolv = run.get("/net.txt").split("\n", 1)
        assert hostname == network["hostname"]
        assert resolv.startswith("nameserver 127.0.0.1\n")  # the measured file, not the image's symlink
        # A burst of connections that send nothing, and a client that never reads, do not wedge it (the
        # relay's limit and slow peers are covered process by process in tests/integration/test_netd.py).
        idle = []
        for _ in range(60):
            s = socket.socket()
            s.settimeout(5)
            try:
                s.connect(("127.0.0.1", run.port))
            except OSError:
                pass
            idle.append(s)
        stalled = socket.create_connection(("127.0.0.1", run.port), timeout=5)
        stalled.sendall(b"GET / HTTP/1.0\r\n" + b"X-Pad: " + b"a" * 4000 + b"\r\n")
        for s in idle:
            s.close()
        assert run.get("/") == "hello-from-enclave\n"
        stalled.close()
        # The parent logs each connection with its counters, never the bytes.
        closes = [line for line in run.stderr if "conn " in line and " in=" in line]
        assert closes, run.stderr
        assert not any("hello-from-enclave" in line for line in run.stderr)
    finally:
        code = run.stop()
    assert code is not None
    print(json.dumps({"stderr_tail": run.stderr[-5:]}))


def test_proxy_protocol_tells_the_app_who_the_client_is(registry, runtime_dir, echo_image) -> None:
    run = RunLocal(registry, runtime_dir, echo_image, port=9090)
    try:
        assert run.ready.wait(TIMEOUT), "\n".join(run.stdout + run.stderr)
        assert run.port, run.stderr
        deadline = time.monotonic() + 30
        while True:
            with socket.create_connection(("127.0.0.1", run.port), timeout=30) as client:
                client.sendall(b"ping")
                client.shutdown(socket.SHUT_WR)
                echoed = b""
                try:
                    while chunk := client.recv(4096):
                        echoed += chunk
                except ConnectionResetError:
                    pass
                address = client.getsockname()
            if echoed or time.monotonic() > deadline:
                break
            time.sleep(0.5)  # nc may not listen yet
        # The app read a PROXY v2 header naming this client's address and port, then the bytes it sent.
        header = (b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c" + socket.inet_aton(address[0])
                  + socket.inet_aton("127.0.0.1") + struct.pack("!HH", address[1], run.port))
        assert echoed == header + b"ping", run.stderr[-10:]
    finally:
        run.stop()
