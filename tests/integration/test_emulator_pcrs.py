"""Our EIFs in the emulator (QEMU's nitro-enclave machine): its loader accepts them, and the PCRs it measures
(read back from its virtio-nsm by our init through the real nsm.ko) equal the PCRs we computed.

QEMU's EIF loader is an independent implementation (hw/core/eif.c): it checks the header, the sections and
the CRC, and hashes the sections itself. The init prints `nitroconv-init: pcr <n> <hex>` from DescribePCR.
"""
from __future__ import annotations

import datetime as dt
import importlib.util
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.enclave.launch import LaunchSpec
from common.enclave.signing import EifSigner, load_signer
from tests.fixtures.devblobs import DevBlobs, blobs_target, build_dev_blobs
from tests.fixtures.repo import REPO
from tests.fixtures.require import skip_or_fail
from tests.fixtures.rootfs import make_busybox_rootfs, tree_from_dir
from worker.pipeline.bootcheck import MARK_PCR
from worker.pipeline.build import BuiltEif, EifIdentity, build_eif

pytestmark = [pytest.mark.integration, pytest.mark.qemu]

TIMEOUT = 180.0
HEARTBEAT = 0xB7
READY_PORT = 9000
PROGRAM_LINE = "hello from the emulator 51c2"


def emulator_binary() -> Path:
    """`make emulator`'s link: <state dir>/emulator/qemu-system-x86_64 (deploy/emulator/README.md)."""
    state = Path(os.environ.get("NITROCONV_STATE_DIR") or REPO / ".state")
    qemu = state / "emulator" / "qemu-system-x86_64"
    if not os.access(qemu, os.X_OK):
        skip_or_fail(f"no emulator at {qemu} (make emulator)")
    return qemu


def _require_backend() -> None:
    # The vhost-user-vsock back-end is worker/emulator (branch vsock); QEMU's machine cannot start without one.
    if importlib.util.find_spec("worker.emulator") is None:
        pytest.skip("needs the vhost-user-vsock back-end worker.emulator (branch vsock, not merged here yet)")


@dataclass
class Run:
    returncode: int
    console: list[str]
    stderr: str
    heartbeats: list[bytes] = field(default_factory=list)

    def pcrs(self) -> dict[int, str]:
        found: dict[int, str] = {}
        for line in self.console:
            if line.startswith(MARK_PCR):
                index, value = line[len(MARK_PCR):].split(" ")
                assert int(index) not in found, line
                found[int(index)] = value
        return found


def _serve_heartbeat(listener: socket.socket, got: list[bytes]) -> None:
    """The parent's side of the ready signal (nitro-cli's): read one byte, echo it."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        conn.settimeout(30)
        data = conn.recv(1)
        got.append(data)
        conn.sendall(data)


def boot_in_emulator(eif: Path, workdir: Path, *, memory_mib: int = 512) -> Run:
    qemu = emulator_binary()
    _require_backend()
    workdir.mkdir(parents=True, exist_ok=True)
    vhost, uds = workdir / "vhost.sock", workdir / "vsock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(f"{uds}_{READY_PORT}")
    listener.listen(1)
    heartbeats: list[bytes] = []
    server = threading.Thread(target=_serve_heartbeat, args=(listener, heartbeats), daemon=True)
    server.start()
    backend = subprocess.Popen([sys.executable, "-m", "worker.emulator", "--vhost-socket", str(vhost),
                                "--uds", str(uds)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        while not vhost.exists():  # the back-end's readiness: the socket appears once it listens
            assert backend.poll() is None, backend.communicate()[1]
            assert time.monotonic() < deadline, "the vsock back-end did not start"
            time.sleep(0.05)
        argv = [str(qemu), "-M", "nitro-enclave,vsock=c0", "-accel", "tcg", "-cpu", "max", "-smp", "2",
                "-m", str(memory_mib), "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio",
                "-no-reboot", "-chardev", f"socket,id=c0,path={vhost}", "-kernel", str(eif),
                # Appended to the EIF's cmdline, not measured: the machine has no keyboard controller for the
                # AWS cmdline's reboot=k, so the init's reboot must triple-fault for -no-reboot to end QEMU.
                "-append", "reboot=t"]
        done = subprocess.run(argv, capture_output=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
    finally:
        listener.close()
        backend.terminate()
        try:
            backend.wait(timeout=10)
        except subprocess.TimeoutExpired:
            backend.kill()
            backend.wait()
    console = [line.rstrip("\r") for line in done.stdout.decode("utf-8", "replace").splitlines()]
    server.join(timeout=5)
    return Run(done.returncode, console, done.stderr.decode("utf-8", "replace"), heartbeats)


@pytest.fixture(scope="module")
def blobs() -> DevBlobs:
    built = build_dev_blobs(blobs_target())
    if built.nsm_ko.read_bytes()[:4] != b"\x7fELF":
        pytest.fail(f"{built.nsm_ko} is not a kernel module: the dev blobs predate the enclave kernel (make blobs)")
    return built


@pytest.fixture(scope="module")
def rootfs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_busybox_rootfs(tmp_path_factory.mktemp("busybox") / "rootfs")


def _eif(tmp_path: Path, blobs: DevBlobs, rootfs: Path, *, signed: bool = False) -> BuiltEif:
    launch = LaunchSpec(argv=("/bin/sh", "-c", f"echo {PROGRAM_LINE}; exit 3"), env=("PATH=/bin",), workdir="/",
                        user="")
    signer = _signer(tmp_path / "signing") if signed else None
    return build_eif(tree_from_dir(rootfs), launch, EifIdentity("emulator-test", "1", {}), blobs_dir=blobs.dir,
                     out_path=tmp_path / "app.eif", cpu_count=2, mem_size_mib=512, signer=signer)


def _signer(directory: Path) -> EifSigner:
    directory.mkdir(parents=True)
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nitroconv emulator test")])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA384()))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return load_signer(directory / "key.pem", directory / "cert.pem")


def test_emulator_loads_our_eif_and_its_pcrs_are_ours(tmp_path: Path, blobs: DevBlobs, rootfs: Path) -> None:
    built = _eif(tmp_path, blobs, rootfs)
    run = boot_in_emulator(built.path, tmp_path / "run")

    assert run.returncode == 0, run.stderr + "\n".join(run.console[-40:])
    m = built.measurements
    assert m.pcr8 is None
    # PCR8 of an unsigned EIF: never extended, 48 zero bytes.
    assert run.pcrs() == {0: m.pcr0, 1: m.pcr1, 2: m.pcr2, 8: "00" * 48}, run.console
    assert "nitroconv-init: NSM driver loaded" in run.console
    assert any(line.startswith("nitroconv-init: entropy pool seeded with ") for line in run.console), run.console
    # The heartbeat crossed real vsock (virtio-vsock over vhost-user) and was echoed by our listener.
    assert run.heartbeats == [bytes([HEARTBEAT])]
    assert "nitroconv-init: heartbeat acknowledged" in run.console
    assert PROGRAM_LINE in run.console
    assert "nitroconv-init: exit status=3" in run.console
    assert not [line for line in run.console if line.startswith(("nitroconv-init: no nsm", "nitroconv-init: nsm error"))]


def test_emulator_pcr8_of_a_signed_eif_is_ours(tmp_path: Path, blobs: DevBlobs, rootfs: Path) -> None:
    built = _eif(tmp_path, blobs, rootfs, signed=True)
    run = boot_in_emulator(built.path, tmp_path / "run")

    assert run.returncode == 0, run.stderr + "\n".join(run.console[-40:])
    m = built.measurements
    assert m.pcr8 is not None
    assert run.pcrs() == {0: m.pcr0, 1: m.pcr1, 2: m.pcr2, 8: m.pcr8}, run.console


def test_emulator_refuses_an_eif_whose_crc_does_not_match(tmp_path: Path, blobs: DevBlobs, rootfs: Path) -> None:
    built = _eif(tmp_path, blobs, rootfs)
    data = bytearray(built.path.read_bytes())
    data[len(data) // 2] ^= 0x01  # a bit in the middle of the application ramdisk
    built.path.write_bytes(bytes(data))
    run = boot_in_emulator(built.path, tmp_path / "run")

    assert run.returncode != 0
    assert "CRC mismatch" in run.stderr, run.stderr
    assert "nitroconv-init: start" not in run.console
