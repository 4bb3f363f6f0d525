"""The enclave init (worker/runtime/init.c) booted for real: dev blobs, busybox rootfs, QEMU, the boot check."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from common.enclave.launch import LaunchSpec
from common.enclave.metadata import build_metadata
from common.enclave.reader import read_eif
from common.enclave.writer import Section, write_eif
from common.errors import BootCheckUnavailable
from tests.fixtures.devblobs import DevBlobs, build_dev_blobs, make
from tests.fixtures.repo import REPO
from tests.fixtures.rootfs import gnu_cpio, stage_app_ramdisk, stage_bootstrap_ramdisk, tree_from_dir
from worker.pipeline.bootcheck import BootResult, boot_eif, boot_kernel
from worker.pipeline.build import EifIdentity, build_eif

pytestmark = pytest.mark.e2e

# Generous: software emulation on a busy 2-core CI machine. A boot takes a few seconds here.
TIMEOUT = 180.0
AWS_LOOKUP_PATH = "PATH=/sbin:/usr/sbin:/bin:/usr/bin"

# Prints every argv item bracketed (so "b c" and "" are visible), the sorted environment, what is
# left of the bootstrap files, whether /proc is mounted, the image's own file; then exits 7.
PROBE = (
    'for a in "$0" "$@"; do echo "ARG[$a]"; done; '
    'env | sort | sed "s/^/ENV /"; '
    'for f in /cmd /env /init /nsm.ko /rootfs; do test -e $f && echo "LEFT $f"; done; '
    'grep -q "^proc /proc proc" /proc/mounts && echo PROC-MOUNTED; '
    'echo "PWD $(pwd)"; cat /etc/image-marker; exit 7'
)


def _image(tmp_path: Path, busybox_rootfs: Path) -> Path:
    image = tmp_path / "image"
    shutil.copytree(busybox_rootfs, image, symlinks=True)
    (image / "etc" / "image-marker").write_text("IMAGE-ROOT\n")
    return image


def _boot_raw(tmp_path: Path, blobs: DevBlobs, image: Path, *, cmd: list[str] | None, env: list[str] | None,
              settle: float = TIMEOUT) -> BootResult:
    """Boot the blobs' kernel with ramdisks written by GNU cpio: the init checked independently of our writers.

    `settle` defaults to the timeout, so the check ends only when QEMU exits by itself (or times out).
    """
    boot_tree = stage_bootstrap_ramdisk(tmp_path / "bootstrap", blobs)
    app_tree = stage_app_ramdisk(tmp_path / "app", image, cmd=cmd, env=env)
    initrd = tmp_path / "initrd"
    initrd.write_bytes(gnu_cpio(boot_tree) + gnu_cpio(app_tree))
    return boot_kernel(blobs.kernel, initrd, blobs.cmdline, timeout=TIMEOUT, settle=settle)


def _env_names(output: tuple[str, ...]) -> set[str]:
    return {line[4:].split("=", 1)[0] for line in output if line.startswith("ENV ")}


def _rebooted(result: BootResult) -> bool:
    # The kernel's last words when the init ends the VM with reboot(RB_AUTOBOOT).
    return any("reboot: Restarting system" in line for line in result.console_tail)


@pytest.mark.qemu
def test_boot_init_runs_cmd_with_argv_and_env_in_the_new_root(tmp_path, dev_blobs, busybox_rootfs):
    image = _image(tmp_path, busybox_rootfs)
    env = ["PATH=/bin:/usr/bin", "GREETING=hello world", "EMPTY="]
    result = _boot_raw(tmp_path, dev_blobs, image, cmd=["/bin/sh", "-c", PROBE, "x", "a", "b c", ""], env=env)

    assert result.ok, result.console_tail
    out = result.program_output
    assert [line for line in out if line.startswith("ARG[")] == ["ARG[x]", "ARG[a]", "ARG[b c]", "ARG[]"]
    assert {"ENV PATH=/bin:/usr/bin", "ENV GREETING=hello world", "ENV EMPTY="} <= set(out)
    # Exactly /env reaches the program (sh adds PWD and SHLVL); nothing of the init's own environment.
    assert _env_names(out) <= {"PATH", "GREETING", "EMPTY", "PWD", "SHLVL"}
    assert not [line for line in out if line.startswith("LEFT ")]
    assert "PROC-MOUNTED" in out
    assert "PWD /" in out
    assert "IMAGE-ROOT" in out
    assert result.exit_status == 7
    assert result.reason == "entrypoint exec'd; exited with status 7"
    assert result.exec_seconds is not None
    assert _rebooted(result)
    assert result.seconds < TIMEOUT  # ended by the guest, not by the watchdog


@pytest.mark.qemu
def test_boot_init_without_env_uses_the_aws_lookup_path(tmp_path, dev_blobs, busybox_rootfs):
    image = _image(tmp_path, busybox_rootfs)
    # A bare "sh" is found through the init's lookup PATH; with no /env that PATH is the whole environment.
    result = _boot_raw(tmp_path, dev_blobs, image, cmd=["sh", "-c", 'env | sort | sed "s/^/ENV /"'], env=None)

    assert result.ok, result.console_tail
    assert f"ENV {AWS_LOOKUP_PATH}" in result.program_output
    assert _env_names(result.program_output) <= {"PATH", "PWD", "SHLVL"}
    assert result.exit_status == 0
    assert "nitroconv-init: no /env, environment is " + AWS_LOOKUP_PATH in result.console_tail


@pytest.mark.qemu
def test_boot_init_reports_exec_failure(tmp_path, dev_blobs, busybox_rootfs):
    image = _image(tmp_path, busybox_rootfs)
    result = _boot_raw(tmp_path, dev_blobs, image, cmd=["/no/such/binary", "arg"], env=["PATH=/bin"])

    assert not result.ok
    assert result.reason == "exec failed: /no/such/binary: No such file or directory"
    assert result.exit_status == 127
    assert result.program_output == ()
    assert result.exec_seconds is None
    assert _rebooted(result)
    assert result.seconds < TIMEOUT


def _blobs_with_nsm(tmp_path: Path, blobs: DevBlobs, nsm: bytes) -> DevBlobs:
    other = tmp_path / "blobs"
    other.mkdir()
    for name in ("bzImage", "cmdline", "init"):
        (other / name).symlink_to(blobs.dir / name)
    (other / "nsm.ko").write_bytes(nsm)
    return DevBlobs(other)


@pytest.mark.qemu
def test_boot_init_loads_the_real_nsm_module_then_finds_no_nsm_and_no_parent(tmp_path, dev_blobs, busybox_rootfs):
    # Plain QEMU has no virtio-nsm and no vsock transport: the dev blobs' real nsm.ko must load all the same,
    # /dev/nsm never appears (one "no nsm" line, no PCR lines), the heartbeat is attempted on the built-in
    # AF_VSOCK and fails, and the boot goes on.
    assert dev_blobs.nsm_ko.read_bytes()[:4] == b"\x7fELF"
    result = _boot_raw(tmp_path, dev_blobs, _image(tmp_path, busybox_rootfs),
                       cmd=["/bin/sh", "-c", "grep -q '^nsm ' /proc/modules && echo NSM-LOADED"], env=["PATH=/bin"])

    assert result.ok, result.console_tail
    assert result.program_output == ("NSM-LOADED",)
    assert "nitroconv-init: NSM driver loaded" in result.console_tail
    no_nsm = [line for line in result.console_tail if line.startswith("nitroconv-init: no nsm ")]
    assert no_nsm == ["nitroconv-init: no nsm (/dev/nsm: No such file or directory), PCRs not read, "
                      "entropy not seeded"], result.console_tail
    assert not [line for line in result.console_tail if line.startswith(("nitroconv-init: pcr ",
                                                                         "nitroconv-init: nsm error"))]
    heartbeat = [line for line in result.console_tail if line.startswith("nitroconv-init: heartbeat ")]
    assert len(heartbeat) == 1 and heartbeat[0].endswith("continuing"), result.console_tail
    assert result.exit_status == 0


@pytest.mark.qemu
def test_boot_init_skips_an_empty_nsm_ko(tmp_path, dev_blobs, busybox_rootfs):
    # A blobs dir without a driver (an empty file) still boots: said once, then the same "no nsm" line.
    blobs = _blobs_with_nsm(tmp_path, dev_blobs, b"")
    result = _boot_raw(tmp_path, blobs, _image(tmp_path, busybox_rootfs), cmd=["/bin/true"], env=[])

    assert result.ok, result.console_tail
    assert "nitroconv-init: /nsm.ko is an empty placeholder (dev blobs), NSM driver not loaded" in result.console_tail
    assert any(line.startswith("nitroconv-init: no nsm ") for line in result.console_tail), result.console_tail
    assert result.exit_status == 0


@pytest.mark.qemu
def test_boot_init_fails_closed_when_nsm_module_does_not_load(tmp_path, dev_blobs, busybox_rootfs):
    blobs = _blobs_with_nsm(tmp_path, dev_blobs, b"not a kernel module")
    result = _boot_raw(tmp_path, blobs, _image(tmp_path, busybox_rootfs), cmd=["/bin/true"], env=[])

    assert not result.ok
    assert result.reason.startswith("init failed: finit_module /nsm.ko: "), result.reason
    assert result.exit_status is None
    assert _rebooted(result)
    assert result.seconds < TIMEOUT


def _build_test_eif(tmp_path: Path, blobs: DevBlobs, image: Path, cmd: list[str], env: list[str]) -> Path:
    """An EIF made by the pipeline's build step (common.enclave.ramdisk, common.enclave.cpio, common.enclave) from the dev blobs."""
    launch = LaunchSpec(argv=tuple(cmd), env=tuple(env), workdir="/", user="")
    identity = EifIdentity(image_name="boot-test", image_version="1", docker_info={})
    built = build_eif(tree_from_dir(image), launch, identity, blobs_dir=blobs.dir, out_path=tmp_path / "test.eif",
                      cpu_count=2, mem_size_mib=512)
    return built.path


@pytest.mark.qemu
def test_boot_eif_boots_an_eif_from_the_build_step(tmp_path, dev_blobs, busybox_rootfs):
    image = _image(tmp_path, busybox_rootfs)
    eif = _build_test_eif(tmp_path, dev_blobs, image, ["/bin/sh", "-c", PROBE, "x", "a", "b c", ""],
                          ["PATH=/bin:/usr/bin", "GREETING=hello world", "EMPTY="])
    assert len(read_eif(eif).ramdisks) == 2

    result = boot_eif(eif, timeout=TIMEOUT, settle=TIMEOUT, scratch=tmp_path)

    assert result.ok, result.console_tail
    out = result.program_output
    assert [line for line in out if line.startswith("ARG[")] == ["ARG[x]", "ARG[a]", "ARG[b c]", "ARG[]"]
    assert "ENV GREETING=hello world" in out
    assert not [line for line in out if line.startswith("LEFT ")]
    assert "PROC-MOUNTED" in out
    assert "IMAGE-ROOT" in out
    assert result.exit_status == 7
    assert _rebooted(result)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("nitroconv-boot-")) == []
    # What goes into conversion.boot_check is plain JSON.
    assert json.loads(json.dumps(result.to_json()))["ok"] is True


@pytest.mark.qemu
def test_boot_check_cli_passes_a_program_that_keeps_running(tmp_path, dev_blobs, busybox_rootfs):
    # A server never exits: the check passes on the marker and stops QEMU itself after the settle time.
    image = _image(tmp_path, busybox_rootfs)
    eif = _build_test_eif(tmp_path, dev_blobs, image, ["/bin/sh", "-c", "echo serving; exec sleep 100000"],
                          ["PATH=/bin"])
    done = subprocess.run([sys.executable, "-m", "worker.cli", "boot-check", str(eif),
                           "--timeout", str(TIMEOUT)], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT + 60)

    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["ok"] is True
    assert report["exit_status"] is None
    # In the emulator (when installed) the reason goes on with its PCR and heartbeat verdict.
    assert report["reason"].startswith("entrypoint exec'd; still running when the check ended")
    assert report["seconds"] < TIMEOUT


def test_boot_eif_refuses_an_aarch64_eif(tmp_path):
    metadata = build_metadata(image_name="arm", image_version="1", build_time="1970-01-01T00:00:00+00:00",
                              build_tool_version="0", operating_system="Linux", kernel_version="6.1", docker_info={})
    eif = tmp_path / "arm.eif"
    with eif.open("wb") as out:
        write_eif(out, kernel=Section.of_bytes(b"Image"), cmdline=b"console=ttyS0", metadata=metadata,
                  ramdisks=[Section.of_bytes(b"ramdisk")], flags=1)
    with pytest.raises(BootCheckUnavailable) as info:
        boot_eif(eif, timeout=TIMEOUT)
    assert info.value.details == {"arch": "aarch64"}


def test_boot_kernel_without_qemu_is_unavailable(tmp_path):
    with pytest.raises(BootCheckUnavailable) as info:
        boot_kernel(tmp_path / "k", tmp_path / "i", "", qemu=str(tmp_path / "no-qemu"))
    assert info.value.code == "boot_check_unavailable"


@pytest.mark.qemu
def test_boot_kernel_reports_why_qemu_did_not_boot(tmp_path):
    result = boot_kernel(tmp_path / "no-kernel", tmp_path / "no-initrd", "console=ttyS0", timeout=TIMEOUT)
    assert not result.ok
    assert result.reason.startswith("the init never started (qemu exited with status 1: ")
    assert "no-kernel" in result.reason


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"  # a zombie is dead, merely not reaped
    except FileNotFoundError:
        return True


def test_boot_kernel_timeout_kills_the_whole_process_group(tmp_path, monkeypatch):
    # A stand-in for a guest that hangs after the init starts: the watchdog must end it and its children.
    pid_file = tmp_path / "child.pid"
    hung = tmp_path / "hung-qemu"
    hung.write_text(
        "#!/bin/sh\n"
        "echo '[    0.000000] Linux version 6.1.0'\n"
        "echo 'nitroconv-init: start'\n"
        "sleep 100000 &\n"
        'echo $! > "$HUNG_PID_FILE"\n'
        "wait\n"
    )
    hung.chmod(0o755)
    monkeypatch.setenv("HUNG_PID_FILE", str(pid_file))

    result = boot_kernel(tmp_path / "k", tmp_path / "i", "console=ttyS0", timeout=3, qemu=str(hung))

    assert not result.ok
    assert result.reason == "init started but did not reach the entrypoint (timed out after 3s)"
    assert result.console_tail == ("[    0.000000] Linux version 6.1.0", "nitroconv-init: start")
    child = int(pid_file.read_text())
    deadline = time.monotonic() + 30
    while not _gone(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _gone(child)


def test_init_build_is_reproducible_and_static(tmp_path):
    # Same bytes from a second build in another checkout path: no build id, no timestamps, no paths.
    elsewhere = tmp_path / "elsewhere" / "checkout"
    shutil.copytree(REPO / "worker" / "runtime", elsewhere / "worker" / "runtime",
                    ignore=shutil.ignore_patterns("build"))
    (elsewhere / "deploy" / "blobs").mkdir(parents=True)
    shutil.copy(REPO / "deploy" / "blobs" / "Makefile", elsewhere / "deploy" / "blobs" / "Makefile")

    first = build_dev_blobs(tmp_path / "one", str(tmp_path / "one" / "init"))
    # KERNEL_DIR named (empty): only init is built, so the copy needs no deploy/emulator/build-kernel.sh.
    make(elsewhere / "deploy" / "blobs", f"BLOBS={tmp_path / 'two'}", "KERNEL_DIR=", str(tmp_path / "two" / "init"))

    one, two = first.init.read_bytes(), (tmp_path / "two" / "init").read_bytes()
    assert one == two
    assert one[:4] == b"\x7fELF"
    headers = subprocess.run(["readelf", "-lW", str(first.init)], capture_output=True, text=True, check=True).stdout
    assert "INTERP" not in headers and "DYNAMIC" not in headers
    assert os.access(first.init, os.X_OK)


def test_blobs_recipe_builds_the_layout_and_never_overwrites_foreign_blobs(tmp_path):
    built = build_dev_blobs(tmp_path / "dev")
    assert sorted(p.name for p in built.dir.iterdir()) == [
        ".nitroconv-dev-blobs", "bzImage", "bzImage.config", "cmdline", "init", "nsm.ko"]
    # Our kernel's real NSM driver (deploy/emulator/build-kernel.sh), with the kernel config it was built with.
    assert built.nsm_ko.read_bytes()[:4] == b"\x7fELF"
    assert (built.dir / "bzImage.config").read_text().splitlines()[2].startswith("# Linux/x86_64 6.12.")
    assert "CONFIG_NSM=m" in (built.dir / "bzImage.config").read_text().splitlines()
    raw_cmdline = (built.dir / "cmdline").read_bytes()
    assert raw_cmdline.startswith(b"reboot=k panic=30 pci=off nomodules console=ttyS0")
    assert not raw_cmdline.endswith(b"\n")

    foreign = tmp_path / "nitro-host-blobs"
    foreign.mkdir()
    (foreign / "bzImage").write_bytes(b"the AWS kernel")
    with pytest.raises(subprocess.CalledProcessError):
        build_dev_blobs(foreign)
    assert sorted(p.name for p in foreign.iterdir()) == ["bzImage"]
    assert (foreign / "bzImage").read_bytes() == b"the AWS kernel"
