"""egressd in the enclave kernel (the dev blobs' kernel under plain QEMU, no vsock transport, so no parent): the exec
shim starts it from the measured ramdisk with the policy beside it, it installs the nat OUTPUT REDIRECT rule and the
default route over lo through the kernel's own interfaces (there is no iptables binary), and a program's plain TCP
connection is caught by it: refused by the policy, or, when allowed, failed at once because the parent cannot be
reached. Nothing waits for a parent that is not there. The emulator test (test_egress_emulator.py) has one."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from common.enclave.launch import LaunchSpec
from common.enclave.network import canonical_json
from common.enclave.shim import through_shim
from tests.fixtures.devblobs import DevBlobs, build_shim, make, runtime_target
from tests.fixtures.rootfs import tree_from_dir
from worker.pipeline.bootcheck import boot_eif
from worker.pipeline.build import EifIdentity, build_eif

pytestmark = [pytest.mark.e2e, pytest.mark.qemu]

TIMEOUT = 180.0
# busybox nc, not wget: Debian's static busybox wget crashes (glibc's static getaddrinfo).
PROGRAM = (
    'echo "EGRESS tables $(cat /proc/net/ip_tables_names 2>&1 | tr "\\n" " ")"; '
    'echo "EGRESS route $(cat /proc/net/route | grep -c "^lo")"; '
    "for target in 10.1.2.3:8080 10.9.9.9:8080; do "
    '  s=$(date +%s); echo | nc -w 20 ${target%:*} ${target#*:} >/dev/null 2>&1; rc=$?; '
    '  echo "EGRESS $target rc=$rc secs=$(( $(date +%s) - s ))"; done; '
    'nslookup allowed.test 127.0.0.1 >/dev/null 2>&1; echo "EGRESS dns rc=$?"'
)
POLICY = {"egress": {"mode": "transparent", "allow": [{"cidr": "10.1.0.0/16"}], "deny": []}, "hostname": "app",
          "ingress": []}


def test_egressd_redirects_in_the_enclave_kernel_and_never_waits_for_a_missing_parent(
        tmp_path: Path, dev_blobs: DevBlobs, busybox_rootfs: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("no qemu-system-x86_64")
    runtime = build_shim(runtime_target()).parent
    make(Path(__file__).resolve().parents[2] / "deploy" / "runtime", f"RUNTIME={runtime}")
    image = tmp_path / "image"
    shutil.copytree(busybox_rootfs, image, symlinks=True)
    launch = through_shim(LaunchSpec(argv=("/bin/sh", "-c", PROGRAM), env=("PATH=/bin:/usr/bin",), workdir="/",
                                     user=""))
    built = build_eif(tree_from_dir(image), launch, EifIdentity(image_name="egress-test", image_version="1",
                                                                docker_info={}),
                      blobs_dir=dev_blobs.dir, out_path=tmp_path / "egress.eif", cpu_count=2, mem_size_mib=512,
                      shim=runtime / "shim",
                      extras={"egressd": runtime / "egressd", "network.json": canonical_json(POLICY)})

    result = boot_eif(built.path, timeout=TIMEOUT, settle=TIMEOUT, scratch=tmp_path)

    console = "\n".join(result.console_tail)
    assert result.ok, console
    lines = {line.split(" ", 2)[1]: line.split(" ", 2)[2] for line in result.program_output
             if line.startswith("EGRESS ")}
    assert "nitroconv-egressd: transparent: TCP to outside addresses goes through 127.0.0.1:3129" in console
    assert lines["tables"].strip() == "nat", lines
    assert lines["route"] != "0", lines
    # Allowed by the policy but no parent to carry it, or refused: a reset at once, not a 20 s timeout (nc's status
    # does not tell a reset after its request was sent from a clean end, egressd's lines do).
    for target in ("10.1.2.3:8080", "10.9.9.9:8080"):
        assert int(lines[target].split("secs=")[1]) < 10, lines
    assert "transparent 1: 10.1.2.3 port 8080: parent unreachable" in console
    assert "10.9.9.9 port 8080: refused by policy" in console
    assert lines["dns"] != "rc=0"
