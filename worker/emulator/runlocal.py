"""`nitroconv run-local (EIF | IMAGE)`: run a converted enclave on any Linux machine, parent side attached.

The parent side is the output image's own launcher (worker/runtime/launcher.c, the runtime dir's `run`),
unchanged in what it decides: it reads launch.json, refuses extra arguments unless `allow_cmdline_args`,
serves the `mutable_env_vars` named values found in its environment on port 9001, and exits with the
enclave's status. run-local only points it elsewhere, with the launcher's NITROCONV_RUN_* variables:
at a copy of launch.json whose `eif` is the local file, at the vsock back-end's Unix socket for port
9001, and at the emulated `nitro-cli run-enclave` (worker/emulator/enclave.py: QEMU's nitro-enclave
machine, the vsock back-end, the heartbeat, the console).

An IMAGE is pulled like `fetch-eif` does and its /enclave/launch.json used as is. A bare EIF has no
launch.json: one is made that lets the launcher pass every given --env and argument on, and the
enclave's exec shim applies the allow-list measured into the EIF (PCR2), as it does on a Nitro host.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from common.errors import EmulatorUnavailable, InvalidOptions
from common.settings import Settings

ENV_LAUNCH_JSON = "NITROCONV_RUN_LAUNCH_JSON"
ENV_VSOCK_UDS = "NITROCONV_RUN_VSOCK_UDS"
ENV_NITRO_CLI = "NITROCONV_RUN_NITRO_CLI"
ENV_PUBLISH = "NITROCONV_RUN_PUBLISH"
_PUBLISH = re.compile(r"(?:(\d{1,3}(?:\.\d{1,3}){3}):)?(\d{1,5}):(\d{1,5})")
DEFAULT_GUEST_CID = 16
# What a bare EIF runs with when --mem-size is not given: 4x the EIF (the initramfs unpacks next to
# its packed copy), at least 512 MiB, in 64 MiB steps, as the boot check sizes it.
MIN_MEMORY_MIB = 512


@dataclass
class RunLocalRequest:
    target: str
    env: list[str] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    cpu_count: int | None = None
    mem_size: int | None = None
    console: bool = False
    insecure_registries: frozenset[str] = frozenset()
    # [IP:]HOSTPORT:PORT items: the enclave's published PORT served on IP:HOSTPORT here (the launcher's ingress).
    publish: list[str] = field(default_factory=list)


def emulator_qemu(settings: Settings) -> Path:
    """The emulator `make setup` builds (QEMU with the nitro-enclave machine): NITROCONV_EMULATOR_QEMU, by
    default linked into the state dir; the same one the boot check uses."""
    return settings.emulator_qemu


def parse_env(items: list[str]) -> dict[str, str]:
    values: dict[str, str] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name or any(ord(ch) < 0x20 or ch == "\x7f" for ch in name):
            raise InvalidOptions(f"--env expects NAME=VALUE, got {item.split('=')[0]!r}…" if sep else
                                 f"--env expects NAME=VALUE, got {item!r}")
        if "\0" in value:
            raise InvalidOptions(f"--env {name}: a value cannot hold a NUL byte")
        values[name] = value
    return values


def parse_publish(items: list[str]) -> list[tuple[str, int, int]]:
    """`--publish [IP:]HOSTPORT:PORT` items as (ip, hostport, port); IP defaults to 127.0.0.1 (this machine only)."""
    out = []
    for item in items:
        match = _PUBLISH.fullmatch(item)
        ip, host_port, port = (match.group(1) or "127.0.0.1", int(match.group(2)), int(match.group(3))) \
            if match else ("", -1, -1)
        try:
            ipaddress.IPv4Address(ip)
        except ValueError:
            match = None
        if not match or not 0 <= host_port <= 65535 or not 1 <= port <= 65535:
            raise InvalidOptions(f"--publish expects [IPv4:]HOSTPORT:PORT, got {item!r}", details={"field": "publish"})
        out.append((ip, host_port, port))
    return out


def _memory_for(eif: Path) -> int:
    need = -(-4 * eif.stat().st_size // (1 << 20))
    return max(MIN_MEMORY_MIB, -(-need // 64) * 64)


def _launch_for_eif(eif: Path, req: RunLocalRequest, env: dict[str, str]) -> dict[str, object]:
    return {
        "eif": str(eif),
        "cpu_count": req.cpu_count or 2,
        "memory_mib": req.mem_size or _memory_for(eif),
        "debug": False,
        "allow_cmdline_args": bool(req.args),
        "mutable_env_vars": {name: "" for name in env},
        "java_mode": None,
        "enable_overlay_filesystem_persistence": True,
    }


def _launch_from_image(path: Path, eif: Path, req: RunLocalRequest) -> dict[str, object]:
    try:
        launch = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise InvalidOptions(f"the image's /enclave/launch.json is unreadable: {exc}") from exc
    if not isinstance(launch, dict):
        raise InvalidOptions("the image's /enclave/launch.json is not an object")
    launch["eif"] = str(eif)
    if req.cpu_count is not None:
        launch["cpu_count"] = req.cpu_count
    if req.mem_size is not None:
        launch["memory_mib"] = req.mem_size
    return launch


def run_local(req: RunLocalRequest, settings: Settings, credentials: object | None = None) -> int:
    """Runs the enclave to its end; returns the launcher's exit status (the program's, or the launcher's refusal)."""
    qemu = emulator_qemu(settings)
    if not os.access(qemu, os.X_OK):
        raise EmulatorUnavailable(f"no emulator at {qemu}: run `make setup` (it builds QEMU's nitro-enclave "
                                  "machine)", details={"qemu": str(qemu)})
    launcher = settings.runtime_dir / "run"
    if not os.access(launcher, os.X_OK):
        raise EmulatorUnavailable(f"no launcher at {launcher}: run `make runtime`",
                                  details={"launcher": str(launcher)})
    if req.cpu_count is not None and req.cpu_count < 1:
        raise InvalidOptions("--cpu-count must be at least 1")
    if req.mem_size is not None and req.mem_size < 64:
        raise InvalidOptions("--mem-size must be at least 64 (MiB)")
    env = parse_env(req.env)
    publish = parse_publish(req.publish)
    # Unix socket paths are short (108 bytes): the work dir lives in /tmp whatever TMPDIR says.
    with tempfile.TemporaryDirectory(prefix="nitroconv-run-", dir="/tmp") as tmp:
        work = Path(tmp)
        target = Path(req.target)
        if target.is_file():
            eif = target.resolve()
            launch = _launch_for_eif(eif, req, env)
            # A bare EIF says nothing of its policy: the ports asked for are tried (the enclave refuses others).
            launch["network"] = {"ingress": [{"port": p, "proxy_protocol": False} for p in sorted({p for *_, p in publish})]}
        else:
            from worker.pipeline.outputimage import fetch_eif

            eif = work / "app.eif"
            fetch_eif(req.target, eif, credentials=credentials,  # type: ignore[arg-type]
                      insecure_registries=req.insecure_registries, launch_json=work / "image-launch.json")
            launch = _launch_from_image(work / "image-launch.json", eif, req)
        launch_path = work / "launch.json"
        launch_path.write_text(json.dumps(launch))
        uds = work / "vsock"
        nitro_cli = work / "nitro-cli"
        repo = Path(__file__).resolve().parents[2]
        command = [sys.executable, "-m", "worker.emulator.enclave", "--qemu", str(qemu), "--uds", str(uds),
                   "--workdir", str(work), "--guest-cid", str(DEFAULT_GUEST_CID)]
        if req.console:
            command.append("--console")
        nitro_cli.write_text("#!/bin/sh\n"
                             f"cd {shlex.quote(str(repo))} || exit 127\n"
                             f"exec {shlex.join(command)} \"$@\"\n")
        nitro_cli.chmod(0o700)
        # The launcher sees only what a `docker run -e` would give it: the --env values, nothing of ours.
        launcher_env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **env,
                        ENV_LAUNCH_JSON: str(launch_path), ENV_VSOCK_UDS: str(uds), ENV_NITRO_CLI: str(nitro_cli)}
        if publish:
            launcher_env[ENV_PUBLISH] = ",".join(f"{ip}:{hp}:{p}" for ip, hp, p in publish)
        proc = subprocess.Popen([str(launcher), "--", *req.args], env=launcher_env)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                # The terminal's SIGINT reached the launcher too: it stops the enclave and exits with its status.
                continue
