"""`nitroconv` service commands as users run them: subprocesses against the API over real HTTP and a real worker."""
from __future__ import annotations

import json
import os
import pty
import stat
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from werkzeug.serving import make_server

from api.app import create_app
from common.errors import WaitTimedOut
from common.settings import Settings
from tests.fixtures.images import push_test_image
from tests.fixtures.registries import free_port
from tests.fixtures.repo import REPO
from tests.fixtures.service import PASSWORD
from worker.cli.client import Client

from .conftest import CeleryProcess, settings_for_own_worker, start_worker

pytestmark = pytest.mark.integration
CANARY = "canary-cli-Pw-4b1d"


@dataclass
class Cli:
    """Runs `nitroconv` in a child process with its own session file, as one signed-in user."""

    url: str
    home: Path

    def run(self, *args: str, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        full_env = {**os.environ, "NITROCONV_CLIENT_CONFIG": str(self.home / "session.json"), **(env or {})}
        full_env.pop("NITROCONV_TOKEN", None)
        full_env.pop("NITROCONV_URL", None)
        return subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=full_env,
                              capture_output=True, text=True, timeout=timeout)

    def ok(self, *args: str, env: dict[str, str] | None = None) -> str:
        done = self.run(*args, env=env)
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
        return done.stdout

    def json(self, *args: str) -> dict:
        return json.loads(self.ok(*args, "--json"))


@pytest.fixture(scope="module")
def cli_settings(service_settings: Settings, registry, basic_registry) -> Settings:  # noqa: ANN001
    return settings_for_own_worker(service_settings, registry.host, basic_registry.host)


@pytest.fixture(scope="module")
def http_api(cli_settings: Settings) -> Iterator[str]:
    """The API app served over real HTTP on a loopback port (the CLI speaks HTTP, not the test client)."""
    server = make_server("127.0.0.1", free_port(), create_app(cli_settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def cli_worker(cli_settings: Settings, http_api: str) -> Iterator[CeleryProcess]:
    worker = start_worker(cli_settings, f"cli{uuid.uuid4().hex[:6]}")
    yield worker
    worker.stop()


def _signed_in(http_api: str, tenant, tmp_path: Path, role: str) -> Cli:  # noqa: ANN001
    cli = Cli(http_api, tmp_path / role.lower())
    done = cli.run("login", "--url", http_api, "--email", tenant.emails[role], "--password-env", "NC_PW",
                   env={"NC_PW": PASSWORD})
    assert done.returncode == 0, done.stderr
    assert tenant.emails[role] in done.stderr and done.stdout == ""
    return cli


def test_cli_login_caches_token_0600_and_exit_statuses(http_api: str, tenant, tmp_path: Path):  # noqa: ANN001
    writer = _signed_in(http_api, tenant, tmp_path, "WRITER")
    session = writer.home / "session.json"
    assert stat.S_IMODE(session.stat().st_mode) == 0o600
    assert json.loads(session.read_text())["url"] == http_api

    # An error from the service: one line, its code, exit 1.
    done = writer.run("builds", "get", str(uuid.uuid4()))
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("nitroconv: not_found: ") and done.stderr.count("\n") == 1
    # A role the service refuses.
    reader = _signed_in(http_api, tenant, tmp_path, "READER")
    done = reader.run("apps", "create", "nope")
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: forbidden: ")
    # Usage: argparse's 2; and a password variable that is not set is a usage error too.
    assert writer.run("convert", "--app-id", "x").returncode == 2
    done = writer.run("convert", "--app-id", str(uuid.uuid4()), "--input", "127.0.0.1:5000/a:1", "--output",
                      "127.0.0.1:5000/b:1", "--input-user", "u", "--input-password-env", "NC_UNSET_VAR")
    assert done.returncode == 2 and done.stderr.startswith("nitroconv: usage: ")
    # Nothing listening: 3.
    done = writer.run("apps", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 3 and done.stderr.startswith("nitroconv: unreachable: ")
    # A wrong password for login is the service's answer: 1, and the password is not echoed.
    done = Cli(http_api, tmp_path / "bad").run("login", "--url", http_api, "--email", tenant.emails["WRITER"],
                                               "--password-env", "NC_PW", env={"NC_PW": CANARY})
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: unauthenticated: ")
    assert CANARY not in done.stderr + done.stdout and not (tmp_path / "bad" / "session.json").exists()


def test_cli_apps_create_list_and_cancel_a_queued_build(http_api: str, tenant, tmp_path: Path):  # noqa: ANN001
    # No worker runs in this test (the module's worker starts with the first test that asks for it), so the
    # build stays QUEUED and `builds cancel` cancels it outright.
    cli = _signed_in(http_api, tenant, tmp_path, "WRITER")
    name = f"cli-app-{uuid.uuid4().hex[:6]}"
    app_id = cli.ok("apps", "create", name, "--description", "from the CLI").strip()
    uuid.UUID(app_id)
    listed = cli.json("apps", "list")
    assert [a["app_id"] for a in listed["items"] if a["name"] == name] == [app_id]
    table = cli.ok("apps", "list").splitlines()
    assert table[0].split() == ["APP_ID", "NAME", "AUTO_APPROVE"]
    assert any(line.split() == [app_id, name, "no"] for line in table[1:])

    build_id = cli.ok("convert", "--app-id", app_id, "--input", "127.0.0.1:5000/queued/in:1",
                      "--output", "127.0.0.1:5000/queued/out:1", "--env", "A=1", "B=2", "--mutable-env", "C=3",
                      "--entrypoint", "/bin/sh", "--entrypoint=-c", "--entrypoint-args", "echo hi", "--cpu-count", "4",
                      "--mem-size", "1024", "--java-mode", "OPENJDK", "--idempotency-key", "k-1").strip()
    build = cli.json("builds", "get", build_id)
    echoed = build["conversion"]["request"]["converter_options"]
    assert (echoed["env_vars"], echoed["mutable_env_vars"]) == (["A=1", "B=2"], ["C=3"])
    assert (echoed["entrypoint"], echoed["entrypoint_args"], echoed["java_mode"]) == (
        ["/bin/sh", "-c"], ["echo hi"], "OPENJDK")
    assert (build["threads"], build["mem_size"]) == (4, 1024)
    # The same idempotency key returns the same build.
    again = cli.ok("convert", "--app-id", app_id, "--input", "127.0.0.1:5000/queued/in:1",
                   "--output", "127.0.0.1:5000/queued/out:1", "--env", "A=1", "B=2", "--mutable-env", "C=3",
                   "--entrypoint", "/bin/sh", "--entrypoint=-c", "--entrypoint-args", "echo hi", "--cpu-count", "4",
                   "--mem-size", "1024", "--java-mode", "OPENJDK", "--idempotency-key", "k-1").strip()
    assert again == build_id

    assert cli.ok("builds", "cancel", build_id).strip() == f"{build_id} cancelled"
    assert cli.json("builds", "get", build_id)["conversion"]["state"] == "CANCELLED"
    done = cli.run("builds", "cancel", build_id)
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: invalid_transition: ")
    # `--wait` on a cancelled build: the one error line, exit 1.
    done = cli.run("builds", "get", build_id, "--wait")
    assert done.returncode == 1 and done.stderr == f"nitroconv: cancelled: cancelled by the user (build {build_id})\n"
    # `builds delete` removes it (CCM's DELETE, 204).
    assert cli.ok("builds", "delete", build_id).strip() == f"{build_id} deleted"
    done = cli.run("builds", "get", build_id)
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: not_found: ")


def test_cli_wait_timeout_exits_4(http_api: str, tenant, tmp_path: Path):  # noqa: ANN001
    # Before the module's worker starts: the build stays QUEUED, so a zero timeout gives up after one poll.
    cli = _signed_in(http_api, tenant, tmp_path, "WRITER")
    app_id = cli.ok("apps", "create", f"cli-{uuid.uuid4().hex[:6]}").strip()
    build_id = cli.ok("convert", "--app-id", app_id, "--input", "127.0.0.1:5000/t/in:1",
                      "--output", "127.0.0.1:5000/t/out:1").strip()
    done = cli.run("builds", "get", build_id, "--wait", "--timeout", "0")
    assert done.returncode == 4 and done.stdout == ""
    assert done.stderr == f"nitroconv: wait_timed_out: build {build_id} still QUEUED after 0s\n"

    # On a terminal the wait draws a bar with the state and the progress (in-process, on a pty).
    controller, terminal = pty.openpty()
    session = json.loads((cli.home / "session.json").read_text())
    try:
        with os.fdopen(os.dup(terminal), "w") as tty:
            with pytest.raises(WaitTimedOut):
                Client(http_api, session["access_token"]).wait(build_id, out=tty, timeout=1, poll=0.2)
        os.set_blocking(controller, False)
        drawn = b""
        while True:
            try:
                drawn += os.read(controller, 65536)
            except BlockingIOError:
                break
    finally:
        os.close(terminal)
        os.close(controller)
    assert b"queued" in drawn and b"0%" in drawn
    cli.ok("builds", "delete", build_id)


def test_cli_convert_wait_approve_fetch_and_verify(http_api: str, cli_worker, cli_settings, tenant,  # noqa: ANN001
                                                   registry, tmp_path: Path):
    writer = _signed_in(http_api, tenant, tmp_path, "WRITER")
    manager = _signed_in(http_api, tenant, tmp_path, "MANAGER")
    image = push_test_image(registry, f"cli/app-{uuid.uuid4().hex[:6]}", "1")
    app_id = writer.ok("apps", "create", f"cli-{uuid.uuid4().hex[:6]}").strip()
    out_ref = f"{registry.host}/cli/out-{uuid.uuid4().hex[:6]}:1"

    build = writer.json("convert", "--app-id", app_id, "--input", f"{registry.host}/{image.repo}:1",
                        "--output", out_ref, "--env", "GREETING=hi", "--mem-size", "512", "--wait", "--poll", "0.3",
                        "--timeout", "280")
    conv = build["conversion"]
    assert conv["state"] == "SUCCEEDED" and conv["input_digest"] == image.digest
    nitro = build["attributes"]["eif"]["nitro_enclave"]
    task_id = build["pending_task_id"]

    summary = writer.ok("builds", "get", build["build_id"])
    assert f"PCR0:       {nitro['pcr0']}" in summary and "conversion: SUCCEEDED 100%" in summary
    assert f"approval:   PENDING (task {task_id})" in summary
    assert any(line.split()[:3] == [build["build_id"], build["app_name"], "SUCCEEDED"]
               for line in writer.ok("builds", "list", "--app-id", app_id).splitlines()[1:])

    tasks = manager.json("tasks", "list", "--status", "INPROGRESS", "--build-id", build["build_id"])
    assert [t["task_id"] for t in tasks["items"]] == [task_id]
    denied = writer.run("tasks", "approve", task_id)  # WRITERs may not decide
    assert denied.returncode == 1 and denied.stderr.startswith("nitroconv: forbidden: ")
    assert manager.ok("tasks", "approve", task_id).strip() == f"{task_id} SUCCESS (build {build['build_id']})"
    assert writer.json("builds", "get", build["build_id"])["status"]["status"] == "WHITELISTED"

    eif = tmp_path / "app.eif"
    writer.ok("fetch-eif", out_ref, "--out", str(eif), "--insecure-registry", registry.host)
    verified = json.loads(writer.ok("verify", str(eif), "--expect-pcr", f"0={nitro['pcr0']}"))
    described = json.loads(writer.ok("describe-eif", str(eif)))
    assert verified == described and described["CheckCRC"] is True
    assert (verified["Measurements"]["PCR0"], verified["Measurements"]["PCR1"], verified["Measurements"]["PCR2"]) \
        == (nitro["pcr0"], nitro["pcr1"], nitro["pcr2"])

    # An unexpected PCR fails; so does a flipped byte in the last section (the CRC no longer matches).
    done = writer.run("verify", str(eif), "--expect-pcr", "2=" + "0" * 96)
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: eif_check_failed: ")
    assert "PCR2 is" in done.stderr and done.stderr.count("\n") == 1
    corrupt = tmp_path / "corrupt.eif"
    data = bytearray(eif.read_bytes())
    data[-1] ^= 0xFF
    corrupt.write_bytes(bytes(data))
    done = writer.run("verify", str(corrupt))
    assert done.returncode == 1 and "nitroconv: eif_check_failed: " in done.stderr and "CRC mismatch" in done.stderr
    assert json.loads(done.stdout)["CheckCRC"] is False
    truncated = tmp_path / "truncated.eif"
    truncated.write_bytes(bytes(data[:4096]))
    done = writer.run("verify", str(truncated))
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: invalid_eif: ") and done.stdout == ""


def test_cli_convert_wait_failure_prints_the_code_and_never_the_password(  # noqa: ANN001
        http_api: str, cli_worker, tenant, basic_registry, registry, tmp_path: Path):
    cli = _signed_in(http_api, tenant, tmp_path, "WRITER")
    image = push_test_image(basic_registry, f"cli/private-{uuid.uuid4().hex[:6]}", "1")
    app_id = cli.ok("apps", "create", f"cli-{uuid.uuid4().hex[:6]}").strip()
    done = cli.run("convert", "--app-id", app_id, "--input", f"{basic_registry.host}/{image.repo}:1",
                   "--input-user", str(basic_registry.username), "--input-password-env", "NC_REG_PW",
                   "--output", f"{registry.host}/cli/never:1", "--wait", "--poll", "0.3", "--timeout", "280",
                   env={"NC_REG_PW": CANARY})
    assert done.returncode == 1, (done.stdout, done.stderr)
    assert done.stderr.startswith("nitroconv: unauthorized: ") and done.stderr.count("\n") == 1
    assert "conversion: FAILED" in done.stdout and "error:      unauthorized: " in done.stdout
    assert CANARY not in done.stdout + done.stderr
    assert CANARY not in cli_worker.log.read_text(errors="replace")
