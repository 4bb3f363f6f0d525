"""QEMU's argv for an emulated enclave (worker/emulator/session.py), the one both run-local and the boot check use."""
from __future__ import annotations

from pathlib import Path

from worker.emulator.session import EmulatorSession, qemu_argv


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


def test_a_session_asks_for_the_sandbox_only_from_a_qemu_that_has_one(tmp_path: Path) -> None:
    # Two stand-in QEMUs, as `-sandbox on -version` finds them: one built with seccomp, one without.
    with_seccomp, without = tmp_path / "with", tmp_path / "without"
    with_seccomp.write_text("#!/bin/sh\necho 'QEMU emulator version 10.0.2'\n")
    without.write_text("#!/bin/sh\necho 'qemu: -sandbox on: There is no option group sandbox' >&2\nexit 1\n")
    for path in (with_seccomp, without):
        path.chmod(0o755)
    eif = tmp_path / "app.eif"
    sessions = [EmulatorSession(qemu=str(q), eif=eif, memory_mib=512, workdir=tmp_path) for q in (with_seccomp, without)]
    argvs = [s.argv() for s in sessions]
    assert "-sandbox" in argvs[0] and "-sandbox" not in argvs[1]
    assert argvs[0][argvs[0].index("-chardev") + 1] == f"socket,id=vsock0,path={tmp_path / 'vhost.sock'}"
    assert "-sandbox" not in EmulatorSession(qemu=str(with_seccomp), eif=eif, memory_mib=512, workdir=tmp_path,
                                             sandbox=False).argv()
