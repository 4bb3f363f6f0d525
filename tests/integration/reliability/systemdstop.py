"""What `systemctl stop` does to a unit's processes, read from the unit file (systemd.kill(5), systemd.service(5)),
played on a real worker started in its own session (the stand-in for the unit's control group):

- `KillMode=control-group` (the default): `KillSignal` to every process of the group at once, pool children too;
- `mixed`: `KillSignal` to the main process only; once it has exited, SIGKILL to whatever is left;
- `process`: `KillSignal` to the main process only; the rest is left alone;
- `ExecStop=` commands run first, in order, with `$MAINPID` (a failing one stops the rest unless prefixed `-`);
- then, if the main process has not exited after `TimeoutStopSec`, SIGKILL to every process (`SendSIGKILL=yes`).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from .conftest import Proc


@dataclass(frozen=True)
class StopPolicy:
    kill_mode: str
    kill_signal: signal.Signals
    timeout_stop_sec: float
    environment: dict[str, str]
    exec_stop: list[str]


def _seconds(value: str) -> float:
    """systemd.time(7) spans as the units here use them: `120`, `2min`, `90s`, `1min 30s`."""
    total, units = 0.0, {"": 1, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]*)", value):
        total += float(number) * units[unit]
    return total


def stop_policy(unit: Path) -> StopPolicy:
    """The [Service] settings that decide what a stop sends, with systemd's defaults (DefaultTimeoutStopSec 90 s)."""
    service: dict[str, list[str]] = {}
    section = ""
    for line in unit.read_text().splitlines():
        line = line.strip()
        if line.startswith("["):
            section = line
        elif section == "[Service]" and "=" in line and not line.startswith(("#", ";")):
            key, value = line.split("=", 1)
            service.setdefault(key.strip(), []).append(value.strip())
    environment = {}
    for entry in service.get("Environment", []):
        key, value = entry.split("=", 1)
        if "%" not in value:  # instance specifiers (the metrics port 91%i) are the deployment's, not the test's
            environment[key] = value
    return StopPolicy(kill_mode=service.get("KillMode", ["control-group"])[-1],
                      kill_signal=signal.Signals[service.get("KillSignal", ["SIGTERM"])[-1]],
                      timeout_stop_sec=_seconds(service.get("TimeoutStopSec", ["90"])[-1]),
                      environment=environment, exec_stop=service.get("ExecStop", []))


@dataclass
class Stopped:
    seconds: float  # from the stop signal to the main process's exit
    sigkilled: bool  # TimeoutStopSec ran out: systemd's SIGKILL ended it
    returncode: int | None


def systemctl_stop(worker: Proc, policy: StopPolicy, *, timeout_stop_sec: float | None = None) -> Stopped:
    """Stop `worker` as systemd would under `policy`; `timeout_stop_sec` replaces the unit's (a test cannot wait
    minutes) and must keep the unit's ratio to the soft shutdown timeout where the test relies on it."""
    limit = policy.timeout_stop_sec if timeout_stop_sec is None else timeout_stop_sec
    started = time.monotonic()
    for line in policy.exec_stop:
        ignore_failure = line.startswith("-")
        argv = [arg.replace("${MAINPID}", str(worker.proc.pid)).replace("$MAINPID", str(worker.proc.pid))
                for arg in shlex.split(line.lstrip("-"))]
        if subprocess.run(argv, check=False, capture_output=True).returncode != 0 and not ignore_failure:
            break
    if worker.proc.poll() is None:
        if policy.kill_mode == "control-group":
            os.killpg(worker.proc.pid, policy.kill_signal)
        else:
            worker.proc.send_signal(policy.kill_signal)
    sigkilled = False
    while worker.proc.poll() is None:
        if time.monotonic() - started > limit:
            os.killpg(worker.proc.pid, signal.SIGKILL)
            sigkilled = True
            worker.proc.wait()
            break
        time.sleep(0.05)
    seconds = time.monotonic() - started
    if policy.kill_mode in ("control-group", "mixed"):
        try:
            os.killpg(worker.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return Stopped(seconds, sigkilled, worker.proc.returncode)
