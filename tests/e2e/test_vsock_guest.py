"""The vsock back-end under a real guest kernel without the nitro-enclave emulator: Debian's QEMU with a
`vhost-user-vsock-pci` device served by `python -m worker.emulator`, Debian's cloud kernel with its
virtio-vsock modules, and a small probe (tests/fixtures/guest/vsock_probe.c) as the guest's program.
Heartbeat, a 4 MiB stream with a slow host reader and half-close, a refused port, 40 concurrent streams,
and a host-initiated connection, all through the guest kernel's own virtio-vsock driver."""
from __future__ import annotations

import glob
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from tests.fixtures.require import skip_or_fail

pytestmark = [pytest.mark.e2e, pytest.mark.qemu]

QEMU = "qemu-system-x86_64"
PROBE = Path(__file__).resolve().parents[1] / "fixtures" / "guest" / "vsock_probe.c"
MODULES = ("drivers/virtio/virtio_ring", "drivers/virtio/virtio", "drivers/virtio/virtio_pci_modern_dev",
           "drivers/virtio/virtio_pci_legacy_dev", "drivers/virtio/virtio_pci", "net/vmw_vsock/vsock",
           "net/vmw_vsock/vmw_vsock_virtio_transport_common", "net/vmw_vsock/vmw_vsock_virtio_transport")
BACK = bytes(range(256)) * 4096  # what the host answers the bulk stream with
TIMEOUT = 300
INIT = """#!/bin/busybox sh
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t devtmpfs dev /dev
for m in {modules}; do /bin/busybox insmod /lib/$m.ko || echo "PROBE insmod $m failed"; done
/bin/probe
echo "PROBE exit $?"
/bin/busybox poweroff -f
"""


def _debian_kernel() -> tuple[Path, Path]:
    kernels = sorted(glob.glob("/boot/vmlinuz-*-cloud-amd64"))
    if not kernels:
        skip_or_fail("no Debian cloud kernel in /boot (package linux-image-cloud-amd64)")
    kernel = Path(kernels[-1])
    modules = Path("/lib/modules") / kernel.name.removeprefix("vmlinuz-") / "kernel"
    if not all((modules / f"{m}.ko").is_file() for m in MODULES):
        skip_or_fail(f"{modules} lacks the virtio-vsock modules (uncompressed .ko)")
    return kernel, modules


def _initramfs(work: Path, modules: Path) -> Path:
    root = work / "root"
    for d in ("bin", "lib", "proc", "dev"):
        (root / d).mkdir(parents=True)
    shutil.copyfile("/bin/busybox", root / "bin" / "busybox")
    subprocess.run(["cc", "-static", "-O2", "-Wall", "-Werror", "-o", str(root / "bin" / "probe"), str(PROBE)],
                   check=True)
    names = []
    for m in MODULES:
        name = m.rsplit("/", 1)[1]
        shutil.copyfile(modules / f"{m}.ko", root / "lib" / f"{name}.ko")
        names.append(name)
    (root / "init").write_text(INIT.format(modules=" ".join(names)))
    for exe in ("init", "bin/busybox", "bin/probe"):
        (root / exe).chmod(0o755)
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    out = work / "initrd"
    with out.open("wb") as f:
        subprocess.run(["cpio", "-o", "-H", "newc", "--quiet"], cwd=root, input="\n".join(files).encode(),
                       stdout=f, check=True)
    return out


def _serve(srv: socket.socket, handler) -> None:
    while True:
        try:
            conn, _ = srv.accept()
        except OSError:
            return
        threading.Thread(target=handler, args=(conn,), daemon=True).start()


def _heartbeat(conn: socket.socket) -> None:
    with conn:
        conn.sendall(conn.recv(1))


def _bulk(conn: socket.socket, received: list[int]) -> None:
    with conn:
        total = 0
        while chunk := conn.recv(16384):
            total += len(chunk)
            time.sleep(0.0005)  # a slow reader: the guest must be held back by credit, not overrun us
        received.append(total)
        conn.sendall(BACK)


def _echo_line(conn: socket.socket) -> None:
    with conn:
        line = b""
        while not line.endswith(b"\n"):
            chunk = conn.recv(64)
            if not chunk:
                return
            line += chunk
        conn.sendall(line)


def _send_and_half_close(sock: socket.socket, data: bytes) -> None:
    sock.sendall(data)
    sock.shutdown(socket.SHUT_WR)


def test_real_guest_kernel_through_the_backend() -> None:
    if shutil.which(QEMU) is None:
        skip_or_fail(f"{QEMU} is not installed")
    if shutil.which("cc") is None or not Path("/bin/busybox").is_file():
        skip_or_fail("cc and /bin/busybox are needed to build the guest")
    devices = subprocess.run([QEMU, "-device", "help"], capture_output=True, text=True, timeout=60).stdout
    if "vhost-user-vsock-pci" not in devices:
        skip_or_fail(f"{QEMU} has no vhost-user-vsock-pci device")
    kernel, modules = _debian_kernel()
    # Unix socket paths must stay under 108 bytes: pytest's tmp_path can be longer.
    work = Path(tempfile.mkdtemp(prefix="nitroconv-vsock-", dir="/tmp"))
    listeners: list[socket.socket] = []
    backend = qemu = None
    try:
        initrd = _initramfs(work, modules)
        vhost, uds = work / "vhost.sock", work / "vsock"
        received: list[int] = []
        for port, handler in ((9000, _heartbeat), (9001, lambda c: _bulk(c, received)), (9002, _echo_line)):
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(f"{uds}_{port}")
            srv.listen(64)
            listeners.append(srv)
            threading.Thread(target=_serve, args=(srv, handler), daemon=True).start()
        backend = subprocess.Popen([sys.executable, "-m", "worker.emulator", "--vhost-socket", str(vhost), "--uds",
                                    str(uds), "--guest-cid", "5"], stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while not vhost.exists():
            assert time.monotonic() < deadline and backend.poll() is None, "the back-end did not start"
            time.sleep(0.02)
        qemu = subprocess.Popen(
            [QEMU, "-M", "q35", "-accel", "tcg", "-m", "256", "-nodefaults", "-no-user-config", "-display", "none",
             "-serial", "stdio", "-no-reboot",
             "-object", "memory-backend-memfd,id=mem,size=256M,share=on", "-machine", "memory-backend=mem",
             "-chardev", f"socket,id=vs,path={vhost}", "-device", "vhost-user-vsock-pci,chardev=vs",
             "-kernel", str(kernel), "-initrd", str(initrd), "-append", "console=ttyS0 quiet panic=-1"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert qemu.stdout is not None
        console: list[str] = []
        host_side: dict[str, bytes] = {}
        started = time.monotonic()
        for line in qemu.stdout:
            console.append(line.rstrip())
            if "PROBE listening" in line:
                h = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                h.settimeout(60)
                h.connect(str(uds))
                h.sendall(b"CONNECT 5000\n")
                ok = b""
                while not ok.endswith(b"\n"):
                    ok += h.recv(1)
                host_side["ok"] = ok
                payload = b"hello guest, " * 25000
                threading.Thread(target=_send_and_half_close, args=(h, payload), daemon=True).start()
                answer = b""
                while chunk := h.recv(65536):
                    answer += chunk
                h.close()
                host_side["answer"] = answer
                host_side["payload"] = payload
            assert time.monotonic() - started < TIMEOUT, console[-20:]
        assert qemu.wait(60) == 0
        probe = [line for line in console if line.startswith("PROBE")]
        assert probe == [
            "PROBE heartbeat b7",
            f"PROBE bulk back {len(BACK)} bytes sum {sum(BACK)}",
            "PROBE refused Connection reset by peer",
            "PROBE streams 40 of 40",
            "PROBE listening",
            f"PROBE upper-cased {len(host_side['payload'])} bytes",
            "PROBE exit 0",
        ], "\n".join(console[-40:])
        assert received == [4 * 1024 * 1024]
        assert host_side["ok"].startswith(b"OK ")
        assert host_side["answer"] == host_side["payload"].upper()
        assert backend.wait(30) == 0, "the back-end exits 0 when QEMU disconnects"
        assert "Traceback" not in backend.stderr.read()
    finally:
        for proc in (qemu, backend):
            if proc is not None and proc.poll() is None:
                proc.kill()
                proc.wait()
        for srv in listeners:
            srv.close()
        shutil.rmtree(work, ignore_errors=True)
