"""The launcher's emulator mode (NITROCONV_RUN_* variables, set by `nitroconv run-local`): launch.json from
another path, the run-time values served on the vsock back-end's Unix socket BASE_9001, and a stand-in for
nitro-cli that stays attached. The real binary `make runtime` builds; the stand-in is a small script that
plays the enclave's exec shim over the Unix socket."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.devblobs import make
from tests.integration.test_launcher import RUNTIME_RECIPE, build_launcher, launch_json

pytestmark = pytest.mark.integration

# The stand-in nitro-cli: records its argv, asks for the run-time values as the shim does, exits 7.
STAND_IN = """#!{python}
import socket, sys
open({argv!r}, "w").write("\\n".join(sys.argv[1:]))
s = socket.socket(socket.AF_UNIX)
s.connect({sock!r})
s.sendall(b"NCRT1\\n")
data = b""
while not data.endswith(b"Z0\\n"):
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
open({answer!r}, "wb").write(data)
sys.exit(7)
"""


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_launcher(tmp_path_factory.mktemp("runtime"))


def _run(launcher: Path, tmp_path: Path, config: bytes, *args: str, env: dict[str, str] | None = None):
    (tmp_path / "launch.json").write_bytes(config)
    stand_in = tmp_path / "emulated-nitro-cli"
    stand_in.write_text(STAND_IN.format(python=sys.executable, argv=str(tmp_path / "argv"),
                                        sock=f"{tmp_path}/vsock_9001", answer=str(tmp_path / "answer")))
    stand_in.chmod(0o755)
    full_env = {"PATH": "/usr/bin:/bin", "NITROCONV_RUN_LAUNCH_JSON": str(tmp_path / "launch.json"),
                "NITROCONV_RUN_VSOCK_UDS": f"{tmp_path}/vsock", "NITROCONV_RUN_NITRO_CLI": str(stand_in),
                **(env or {})}
    return subprocess.run([str(launcher), *args], env=full_env, capture_output=True, text=True, timeout=60)


def test_serves_allowed_values_over_the_unix_socket(launcher: Path, tmp_path: Path) -> None:
    config = launch_json(mutable_env_vars=["GREETING=hello", "MODE=fast"], allow_cmdline_args=True)
    done = _run(launcher, tmp_path, config, "--", "one", "--two",
                env={"GREETING": "hi there", "SECRET": "not allowed"})
    assert done.returncode == 7, done.stderr
    assert (tmp_path / "argv").read_text().splitlines() == [
        "run-enclave", "--eif-path", "/enclave/app.eif", "--cpu-count", "2", "--memory", "1024"]
    assert (tmp_path / "answer").read_bytes() == b"E17\nGREETING=hi thereA3\noneA5\n--twoZ0\n"
    assert "served 1 env value(s) and 2 argument(s)" in done.stderr
    assert "not allowed" not in done.stderr


def test_refuses_arguments_the_build_does_not_allow(launcher: Path, tmp_path: Path) -> None:
    done = _run(launcher, tmp_path, launch_json(), "extra")
    assert done.returncode == 2 and "allow_cmdline_args is false" in done.stderr
    assert not (tmp_path / "argv").exists(), "nothing started"


def test_dry_run_names_the_emulator(launcher: Path, tmp_path: Path) -> None:
    done = _run(launcher, tmp_path, launch_json(), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert f"serve: unix socket {tmp_path}/vsock_9001" in done.stdout
    assert f"nitro-cli: {tmp_path}/emulated-nitro-cli" in done.stdout


# The stand-in as the enclave's egressd: one question to the egress service the launcher spawned beside itself.
EGRESS_STAND_IN = """#!{python}
import socket, sys, time
for _ in range(100):
    try:
        s = socket.socket(socket.AF_UNIX)
        s.connect({sock!r})
        break
    except OSError:
        time.sleep(0.05)
s.sendall(b"R localhost\\n")
open({answer!r}, "wb").write(s.recv(4096))
sys.exit(3)
"""


@pytest.fixture(scope="module")
def launcher_with_egress(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output image's /enclave: the launcher and the egress service beside it, as `make runtime` builds them."""
    target = tmp_path_factory.mktemp("enclave")
    make(RUNTIME_RECIPE, f"RUNTIME={target}", f"{target}/run", f"{target}/egress")
    return target / "run"


def test_spawns_the_egress_service_on_port_9002_and_stops_it(launcher_with_egress: Path, tmp_path: Path) -> None:
    launcher = launcher_with_egress
    (tmp_path / "launch.json").write_bytes(launch_json())
    stand_in = tmp_path / "emulated-nitro-cli"
    stand_in.write_text(EGRESS_STAND_IN.format(python=sys.executable, sock=f"{tmp_path}/vsock_9002",
                                               answer=str(tmp_path / "answer")))
    stand_in.chmod(0o755)
    env = {"PATH": "/usr/bin:/bin", "NITROCONV_RUN_LAUNCH_JSON": str(tmp_path / "launch.json"),
           "NITROCONV_RUN_VSOCK_UDS": f"{tmp_path}/vsock", "NITROCONV_RUN_NITRO_CLI": str(stand_in)}
    done = subprocess.run([str(launcher)], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 3, done.stderr
    assert (tmp_path / "answer").read_bytes().startswith(b"A "), done.stderr
    assert b"127.0.0.1" in (tmp_path / "answer").read_bytes()
    assert f"nitroconv-egress: listening on unix socket {tmp_path}/vsock_9002" in done.stderr
    # Gone with the launcher: nothing answers on its socket any more.
    for _ in range(100):
        probe = socket.socket(socket.AF_UNIX)
        try:
            probe.connect(f"{tmp_path}/vsock_9002")
        except OSError:
            break
        finally:
            probe.close()
        time.sleep(0.05)
    else:
        raise AssertionError("the egress service outlived the launcher")
