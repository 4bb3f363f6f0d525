"""`nitro-cli run-enclave` for the emulator: what the launcher runs instead of nitro-cli under `run-local`.

    python -m worker.emulator.enclave --qemu PATH --uds BASE --workdir DIR [--guest-cid N] [--console] \\
        run-enclave --eif-path EIF --cpu-count N --memory MIB [--debug-mode] [--attach-console]

It plays nitro-cli's part of the parent: an emulator session (worker/emulator/session.py: the vsock back-end,
QEMU's `nitro-enclave` machine, the answer to the enclave's ready heartbeat on vsock port 9000), shows
the console, and stays attached until the enclave ends; its exit status is the program's (the init's
`exit status=N` console line; a signal N gives 128+N), 1 if the enclave ended without one.

Without --console (or --attach-console) only the program's own output is shown: everything before the
init's first line, and the kernel's and the init's lines after it, are left out, as a Nitro enclave shows no
console unless it runs in debug mode.
"""

from __future__ import annotations

import argparse
import os
import re
import selectors
import signal
import socket
import sys
import time
from pathlib import Path
from typing import TextIO

from common.errors import EmulatorUnavailable
from worker.emulator.session import SANDBOX_PREFERRED, EmulatorSession

PREFIX = "nitroconv-run-local: "
INIT_PREFIX = "nitroconv-init: "
_KERNEL_LINE = re.compile(r"^\s*\[\s*\d+\.\d+\]")
_EXIT = re.compile(r"^nitroconv-init: exit (status|signal)=(\d+)")
QEMU_STOP_SECONDS = 5.0


class Attached:
    def __init__(self, args: argparse.Namespace, out: TextIO, err: TextIO) -> None:
        self.args = args
        self.out = out
        self.err = err
        self.show_all = args.console or args.attach_console
        self.exit_status: int | None = None
        self.init_started = False
        self.stop_signal: int | None = None

    def say(self, text: str) -> None:
        print(PREFIX + text, file=self.err, flush=True)

    def _on_signal(self, signum: int, frame: object) -> None:
        self.stop_signal = signum

    def console_line(self, line: str) -> None:
        m = _EXIT.match(line)
        if m:
            n = int(m.group(2))
            self.exit_status = n if m.group(1) == "status" else 128 + n
        if line.startswith(INIT_PREFIX):
            self.init_started = True
        # Before the init, everything is the kernel's (and the boot loader's, which has no timestamps);
        # after the program's exit, the shutdown's.
        program = self.init_started and self.exit_status is None and not m
        if self.show_all or (program and not (line.startswith(INIT_PREFIX) or _KERNEL_LINE.match(line))):
            self.out.write(line + "\n")
            self.out.flush()

    def run(self) -> int:
        a = self.args
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        wake_r, wake_w = socket.socketpair()
        wake_r.setblocking(False)
        wake_w.setblocking(False)
        signal.set_wakeup_fd(wake_w.fileno(), warn_on_full_buffer=False)

        session = EmulatorSession(qemu=a.qemu, eif=Path(a.eif_path), memory_mib=a.memory, cpu_count=a.cpu_count,
                                  guest_cid=a.guest_cid, name=f"nitroconv-{os.getpid()}", workdir=Path(a.workdir),
                                  uds=Path(a.uds), quiet=not self.show_all, heartbeat_report=self.say,
                                  # The user's own image on the user's machine: a QEMU without seccomp may run
                                  # it, said below (the boot check, booting anyone's image, never does).
                                  sandbox=SANDBOX_PREFERRED)
        try:
            return self._attach(session, wake_r)
        finally:
            session.close(grace=QEMU_STOP_SECONDS)

    def _attach(self, session: EmulatorSession, wake_r: socket.socket) -> int:
        a = self.args
        try:
            qemu = session.start()
        except EmulatorUnavailable as exc:
            self.say(f"{exc.code}: {exc}")
            return 1
        if session.unsandboxed is not None:
            self.say(f"warning: the enclave runs WITHOUT QEMU's seccomp sandbox: {session.unsandboxed} "
                     "(make emulator builds one with it)")
        self.say(f"enclave {session.name} starting: CID {a.guest_cid}, {a.cpu_count} CPU(s), {a.memory} MiB, "
                 f"EIF {a.eif_path}")
        assert qemu.stdout is not None and qemu.stderr is not None
        sel = selectors.DefaultSelector()
        sel.register(qemu.stdout, selectors.EVENT_READ, "console")
        sel.register(qemu.stderr, selectors.EVENT_READ, "stderr")
        sel.register(wake_r, selectors.EVENT_READ, "wake")
        partial = b""
        qemu_err = bytearray()
        open_streams = 2
        ended_at: float | None = None
        while open_streams and self.stop_signal is None:
            if self.exit_status is not None and ended_at is None:
                ended_at = time.monotonic()
            if ended_at is not None and time.monotonic() - ended_at > QEMU_STOP_SECONDS and qemu.poll() is None:
                # The init resets the machine once its program is done; a QEMU still running has not
                # turned that reset into an exit: stop it rather than let the enclave boot again.
                qemu.terminate()
            for key, _ in sel.select(1.0):
                if key.data == "wake":
                    try:
                        wake_r.recv(64)
                    except BlockingIOError:
                        pass
                else:
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fileobj)
                        open_streams -= 1
                        if key.data == "console" and partial:
                            self.console_line(partial.decode("utf-8", "replace"))
                        continue
                    if key.data == "stderr":
                        qemu_err += data[: max(0, 8192 - len(qemu_err))]
                        continue
                    partial += data
                    *lines, partial = partial.split(b"\n")
                    for raw in lines:
                        self.console_line(raw.decode("utf-8", "replace").rstrip("\r"))
        sel.close()
        if self.stop_signal is not None:
            self.say(f"stopping the enclave on {signal.Signals(self.stop_signal).name}")
            return 128 + self.stop_signal
        code = qemu.wait()
        if session.heartbeats == 0:
            self.say("warning: the enclave never sent its ready heartbeat (vsock port 9000)")
        if self.exit_status is None:
            detail = " ".join(qemu_err.decode("utf-8", "replace").split())[:500]
            self.say(f"the enclave ended without its program's exit status (qemu status {code}"
                     f"{': ' + detail if detail else ''})")
            return 1
        self.say(f"the enclave's program exited with status {self.exit_status}")
        return self.exit_status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.emulator.enclave",
                                     description="nitro-cli run-enclave, emulated (QEMU nitro-enclave + vsock)")
    parser.add_argument("--qemu", required=True)
    parser.add_argument("--uds", required=True, help="the vsock back-end's host socket base")
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--guest-cid", type=int, default=16)
    parser.add_argument("--console", action="store_true", help="show the whole console")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run-enclave")
    run.add_argument("--eif-path", required=True)
    run.add_argument("--cpu-count", type=int, required=True)
    run.add_argument("--memory", type=int, required=True)
    run.add_argument("--debug-mode", action="store_true")
    run.add_argument("--attach-console", action="store_true")
    args = parser.parse_args(argv)
    return Attached(args, sys.stdout, sys.stderr).run()


if __name__ == "__main__":
    sys.exit(main())
