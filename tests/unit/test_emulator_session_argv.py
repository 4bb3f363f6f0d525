"""QEMU's argv for an emulated enclave (worker/emulator/session.py), the one both run-local and the boot check use,
and the session's rule on QEMU's seccomp sandbox: required for the boot check, preferred for run-local."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import worker.emulator.session as session_module
from common.errors import BootCheckNoSandbox, BootCheckUnavailable, EmulatorNoSandbox, EmulatorUnavailable
from worker.emulator.session import (
    CPU,
    SANDBOX,
    SANDBOX_POLICIES,
    SANDBOX_PREFERRED,
    SANDBOX_REQUIRED,
    EmulatorSession,
    has_sandbox,
    loader_tmpdir,
    qemu_argv,
)
from worker.pipeline.emulatorboot import BootCheckPlan, boot_eif_emulated, choose_mode, emulator_missing


def test_the_argv_loads_the_eif_in_the_nitro_enclave_machine() -> None:
    argv = qemu_argv(qemu="/e/qemu-system-x86_64", eif=Path("/x/app.eif"), vhost_socket=Path("/w/v.sock"), cpu_count=2,
                     memory_mib=768, name="n")
    assert argv[0] == "/e/qemu-system-x86_64"
    assert argv[argv.index("-machine") + 1] == "nitro-enclave,vsock=vsock0,id=n"
    assert argv[argv.index("-chardev") + 1] == "socket,id=vsock0,path=/w/v.sock"
    assert argv[argv.index("-kernel") + 1] == "/x/app.eif"
    assert "-initrd" not in argv  # the EIF's own ramdisks
    assert (argv[argv.index("-smp") + 1], argv[argv.index("-m") + 1]) == ("2", "768")
    assert argv[argv.index("-accel") + 1] == "tcg" and argv[argv.index("-serial") + 1] == "stdio"
    # Every CPU feature TCG has, but the fast-string hints that make the guest copy memory a byte at a time.
    assert argv[argv.index("-cpu") + 1] == CPU == "max,erms=off,fsrm=off"
    assert "-nodefaults" in argv and "-no-user-config" in argv
    # The init's reset must end QEMU, not boot the enclave again: a triple fault under -no-reboot. The
    # EIF's cmdline is otherwise its own, but for timestamps on the kernel's lines.
    assert "-no-reboot" in argv and argv[argv.index("-append") + 1] == "reboot=t printk.time=1"
    assert argv[argv.index("-sandbox") + 1].startswith("on,") and "spawn=deny" in argv[argv.index("-sandbox") + 1]


def test_without_a_name_or_a_sandbox() -> None:
    argv = qemu_argv(qemu="q", eif="/x", vhost_socket="/v", memory_mib=512, sandbox=False)
    assert argv[argv.index("-machine") + 1] == "nitro-enclave,vsock=vsock0"
    assert argv[argv.index("-smp") + 1] == "1"
    assert "-sandbox" not in argv


def _standins(tmp_path: Path) -> tuple[Path, Path]:
    """Two stand-in QEMUs, as `-sandbox on -version` finds them: one built with seccomp, one without. Anything
    but that probe is recorded in `ran`, so a test sees whether QEMU was started for real."""
    with_seccomp, without = tmp_path / "with", tmp_path / "without"
    ran = tmp_path / "ran"
    with_seccomp.write_text(f"#!/bin/sh\n[ \"$*\" = '-sandbox on -version' ] || echo \"$@\" >>{ran}\n"
                            "echo 'QEMU emulator version 10.0.2'\n")
    without.write_text(f"#!/bin/sh\ncase \"$1\" in -sandbox) echo 'qemu: -sandbox on: There is no option group "
                       f"sandbox' >&2; exit 1;; esac\necho \"$@\" >>{ran}\n")
    for path in (with_seccomp, without):
        path.chmod(0o755)
    return with_seccomp, without


def test_the_sandbox_probe_tells_the_two_builds_apart(tmp_path: Path) -> None:
    with_seccomp, without = _standins(tmp_path)
    assert has_sandbox(str(with_seccomp)) and not has_sandbox(str(without))
    assert not has_sandbox(str(tmp_path / "absent"))
    # The link `make emulator` maintains, re-pointed at another build: the answer follows it.
    link = tmp_path / "qemu-system-x86_64"
    link.symlink_to(without)
    assert not has_sandbox(str(link))
    link.unlink()
    link.symlink_to(with_seccomp)
    assert has_sandbox(str(link))


def test_a_session_runs_the_sandboxed_qemu_sandboxed(tmp_path: Path) -> None:
    with_seccomp, _ = _standins(tmp_path)
    eif = tmp_path / "app.eif"
    for policy in SANDBOX_POLICIES:
        session = EmulatorSession(qemu=str(with_seccomp), eif=eif, memory_mib=512, workdir=tmp_path, sandbox=policy)
        argv = session.argv()
        assert argv[argv.index("-sandbox") + 1] == SANDBOX and session.unsandboxed is None
        assert argv[argv.index("-chardev") + 1] == f"socket,id=vsock0,path={tmp_path / 'vhost.sock'}"
        assert EmulatorSession.refusal(str(with_seccomp), policy) is None


def test_by_default_a_session_refuses_a_qemu_without_seccomp_before_starting_anything(tmp_path: Path) -> None:
    _, without = _standins(tmp_path)
    marker = tmp_path / "backend-started"
    # A back-end that would leave a mark: the refusal must come before it (and QEMU) start.
    session = EmulatorSession(qemu=str(without), eif=tmp_path / "app.eif", memory_mib=512, workdir=tmp_path,
                              backend=("/bin/sh", "-c", f"touch {marker}; sleep 30", "backend"))
    assert session.sandbox == SANDBOX_REQUIRED
    reason = EmulatorSession.refusal(str(without))
    assert reason is not None and "without seccomp" in reason
    with pytest.raises(EmulatorNoSandbox) as info:
        session.argv()
    assert info.value.code == "emulator_no_sandbox" and isinstance(info.value, EmulatorUnavailable)
    try:
        with pytest.raises(EmulatorNoSandbox, match="refuses -sandbox"):
            session.start()
    finally:
        session.close()
    assert session.backend is None and session.process is None
    assert not marker.exists() and not (tmp_path / "ran").exists()


def test_a_qemu_that_cannot_be_probed_is_still_asked_for_the_sandbox(tmp_path: Path) -> None:
    # Not refused (starting it fails and says why), but never started without `-sandbox` either.
    absent = tmp_path / "absent"
    assert EmulatorSession.refusal(str(absent)) is None
    argv = EmulatorSession(qemu=str(absent), eif=tmp_path / "app.eif", memory_mib=512, workdir=tmp_path).argv()
    assert argv[argv.index("-sandbox") + 1] == SANDBOX


def test_run_locals_policy_runs_it_unsandboxed_and_says_why(tmp_path: Path) -> None:
    _, without = _standins(tmp_path)
    session = EmulatorSession(qemu=str(without), eif=tmp_path / "app.eif", memory_mib=512, workdir=tmp_path,
                              sandbox=SANDBOX_PREFERRED)
    assert EmulatorSession.refusal(str(without), SANDBOX_PREFERRED) is None
    assert "-sandbox" not in session.argv()
    assert session.unsandboxed is not None and "no seccomp sandbox" in session.unsandboxed


def test_the_loaders_tmpdir_is_a_private_dir_on_the_tmpfs_only_when_it_has_room(tmp_path: Path) -> None:
    made = loader_tmpdir(1 << 20, tmpfs=tmp_path)
    assert made is not None and made.parent == tmp_path and made.is_dir()
    assert made.stat().st_mode & 0o777 == 0o700
    # No room for twice the EIF (a container's 64 MiB /dev/shm, say), or no such tmpfs: QEMU's own $TMPDIR.
    assert loader_tmpdir(1 << 62, tmpfs=tmp_path) is None
    assert loader_tmpdir(1 << 20, tmpfs=tmp_path / "absent") is None


# A stand-in back-end: listens on its vhost-user socket (what the session waits for), then idles.
_BACKEND = (sys.executable, "-c", "import socket, sys, time; a = sys.argv; s = socket.socket(socket.AF_UNIX); "
            "s.bind(a[a.index('--vhost-socket') + 1]); s.listen(); time.sleep(30)")


def _env_recording_qemu(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in QEMU with seccomp that records its $TMPDIR (and whether it was a directory then)."""
    qemu, seen = tmp_path / "qemu", tmp_path / "seen"
    qemu.write_text(f"#!/bin/sh\n[ \"$1\" = -sandbox ] && [ \"$3\" = -version ] && exit 0\n"
                    f"[ -d \"$TMPDIR\" ] && d=dir || d=missing\necho \"$TMPDIR $d\" >{seen}\n")
    qemu.chmod(0o755)
    return qemu, seen


def test_qemus_loader_writes_into_a_tmpfs_dir_of_the_session_removed_at_close(tmp_path: Path,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    tmpfs = tmp_path / "shm"
    tmpfs.mkdir()
    monkeypatch.setattr(session_module, "LOADER_TMPFS", tmpfs)
    qemu, seen = _env_recording_qemu(tmp_path)
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"stand-in")
    session = EmulatorSession(qemu=str(qemu), eif=eif, memory_mib=512, workdir=tmp_path / "w", backend=_BACKEND)
    (tmp_path / "w").mkdir()
    try:
        session.start().wait(10)
        assert session.loader_dir is not None and session.loader_dir.parent == tmpfs
        assert seen.read_text().split() == [str(session.loader_dir), "dir"]
    finally:
        session.close()
    assert list(tmpfs.iterdir()) == []


def test_a_tmpdir_the_caller_gives_is_qemus(tmp_path: Path) -> None:
    qemu, seen = _env_recording_qemu(tmp_path)
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"stand-in")
    mine = tmp_path / "mine"
    mine.mkdir()
    (tmp_path / "w").mkdir()
    session = EmulatorSession(qemu=str(qemu), eif=eif, memory_mib=512, workdir=tmp_path / "w", backend=_BACKEND,
                              env={"TMPDIR": str(mine)})
    try:
        session.start().wait(10)
        assert session.loader_dir is None and seen.read_text().split() == [str(mine), "dir"]
    finally:
        session.close()


def test_an_unknown_policy_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="sandbox policy"):
        EmulatorSession(qemu="q", eif=tmp_path / "app.eif", memory_mib=512, workdir=tmp_path, sandbox="off")


# --- the boot check: the session's rule decides where it boots -------------------------------------------
def _plan(qemu: Path, mode: str) -> BootCheckPlan:
    # A backend that is a plain argv (not `-m worker.emulator`) is taken as installed.
    return BootCheckPlan(mode=mode, emulator_qemu=qemu, backend=("/bin/false", "backend.py"))


def test_the_boot_check_boots_an_emulator_with_seccomp(tmp_path: Path) -> None:
    with_seccomp, _ = _standins(tmp_path)
    assert choose_mode(_plan(with_seccomp, "auto")) == ("emulator", None)
    assert choose_mode(_plan(with_seccomp, "emulator")) == ("emulator", None)


def test_without_seccomp_auto_falls_back_to_plain_and_emulator_fails_closed(tmp_path: Path) -> None:
    _, without = _standins(tmp_path)
    mode, why = choose_mode(_plan(without, "auto"))
    assert mode == "plain" and why is not None and "refuses -sandbox" in why
    assert emulator_missing(_plan(without, "emulator")) == why
    with pytest.raises(BootCheckNoSandbox, match="boot check mode emulator: .* refuses -sandbox") as info:
        choose_mode(_plan(without, "emulator"))
    assert info.value.code == "boot_check_no_sandbox" and isinstance(info.value, BootCheckUnavailable)
    # Called directly (not through the plan), the emulated boot refuses too, and never starts QEMU.
    eif = tmp_path / "app.eif"
    eif.write_bytes(b"stand-in")
    with pytest.raises(BootCheckNoSandbox) as info:
        boot_eif_emulated(eif, expected={}, qemu=str(without), backend=("/bin/false",), timeout=5)
    assert info.value.code == "boot_check_no_sandbox"
    assert not (tmp_path / "ran").exists()
