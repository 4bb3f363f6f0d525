"""The exec shim (worker/runtime/shim.c), test build, driven from Python: the run-time protocol over a socket pair,
Docker's USER rules against an image's /etc files, WORKDIR and PATH lookup, and the exit codes.

The test build differs from the enclave's only where the enclave cannot be had here: the protocol socket
comes from $NITROCONV_SHIM_TEST_FD instead of vsock, /etc from $NITROCONV_SHIM_TEST_ETC, and the resolved
identity is printed instead of assumed (the QEMU tests in tests/e2e/test_shim_boot.py take the real path).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fixtures.devblobs import build_shim

pytestmark = pytest.mark.integration

PROBE = ("import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': list(os.environ.items()),"
         " 'cwd': os.getcwd()}))")
BASE_ENV = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "PYTHONCOERCECLOCALE": "0", "LOG": "image"}
PASSWD = ("root:x:0:0:root:/root:/bin/sh\n"
          "  app:x:1000:1000:App:/home/app:/bin/sh  \n"
          "\n"
          "nohome:x:1001:1001::\n")
GROUP = ("root:x:0:\n"
         "app:x:1000:\n"
         "wheel:x:10:root,app\n"
         "staff:x:50:app\n"
         "other:x:60:nobody\n")


@dataclass(frozen=True)
class Run:
    code: int
    stdout: str
    stderr: str
    greeting: bytes = b""

    @property
    def probe(self) -> dict:
        return json.loads(self.stdout)

    @property
    def env(self) -> dict[str, str]:
        return dict(self.probe["env"])

    @property
    def identity(self) -> str:
        return next(line for line in self.stderr.splitlines() if line.startswith("nitroconv-shim-test: "))


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_shim(tmp_path_factory.mktemp("shim"), test_hooks=True)


@pytest.fixture(scope="module")
def etc(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("etc")
    (d / "passwd").write_text(PASSWD)
    (d / "group").write_text(GROUP)
    return d


def run_shim(shim: Path, options: Sequence[str], *, answer: bytes | None = None, etc: Path | None = None,
             argv: Sequence[str] = ("python3", "-c", PROBE), env: dict[str, str] | None = None,
             timeout_ms: int = 5000, close_early: bool = False) -> Run:
    """Start the shim with one end of a socket pair as its parent; `answer` None: no parent at all."""
    full_env = {**BASE_ENV, **(env or {}), "NITROCONV_SHIM_TEST_TIMEOUT_MS": str(timeout_ms)}
    if etc is not None:
        full_env["NITROCONV_SHIM_TEST_ETC"] = str(etc)
    cmd = [str(shim), *options, "--", *argv]
    if answer is None and not close_early:
        full_env["NITROCONV_SHIM_TEST_FD"] = "none"
        done = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=60)
        return Run(done.returncode, done.stdout, done.stderr)
    parent, child = socket.socketpair()
    with parent:
        full_env["NITROCONV_SHIM_TEST_FD"] = str(child.fileno())
        proc = subprocess.Popen(cmd, env=full_env, pass_fds=[child.fileno()], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        child.close()
        greeting = b""
        if close_early:
            parent.shutdown(socket.SHUT_RDWR)
        else:
            parent.settimeout(30)
            while len(greeting) < 6:
                chunk = parent.recv(6 - len(greeting))
                if not chunk:
                    break
                greeting += chunk
            parent.sendall(answer or b"")
        out, err = proc.communicate(timeout=60)
    return Run(proc.returncode, out, err, greeting)


def records(*items: tuple[str, bytes], end: bool = True) -> bytes:
    body = b"".join(k.encode() + str(len(v)).encode() + b"\n" + v for k, v in items)
    return body + (b"Z0\n" if end else b"")


MUTABLE = ["--mutable", "LOG=info", "--mutable", "MODE=fast"]


def test_shim_protocol_greets_and_applies_allowed_env_in_place(shim: Path) -> None:
    run = run_shim(shim, MUTABLE, answer=records(("E", b"LOG=debug"), ("E", b"MODE=a b=c\tZ")))
    assert run.greeting == b"NCRT1\n"
    assert run.code == 0, run.stderr
    env = run.probe["env"]
    # The image's LOG keeps its place; MODE, not in the image, comes after.
    names = [k for k, _ in env]
    assert names.index("LOG") < names.index("MODE")
    assert dict(env)["LOG"] == "debug" and dict(env)["MODE"] == "a b=c\tZ"
    assert "nitroconv-shim: refused" not in run.stderr


def test_shim_protocol_refuses_names_off_the_allow_list_and_never_logs_values(shim: Path) -> None:
    run = run_shim(shim, MUTABLE, answer=records(("E", b"PATH=/evil"), ("E", b"SECRET=hunter2"), ("E", b"LOG=x")))
    assert run.code == 0, run.stderr
    assert run.env["PATH"] == BASE_ENV["PATH"] and "SECRET" not in run.env and run.env["LOG"] == "x"
    assert "nitroconv-shim: refused env PATH: not in mutable_env_vars" in run.stderr
    assert "nitroconv-shim: refused env SECRET: not in mutable_env_vars" in run.stderr
    assert "hunter2" not in run.stderr and "/evil" not in run.stderr


def test_shim_protocol_appends_args_only_when_allowed(shim: Path) -> None:
    answer = records(("A", b"--port"), ("A", b""), ("A", b"a b\n$(x)"))
    allowed = run_shim(shim, [*MUTABLE, "--allow-args"], answer=answer, argv=("python3", "-c", PROBE, "image-arg"))
    assert allowed.code == 0, allowed.stderr
    assert allowed.probe["argv"] == ["image-arg", "--port", "", "a b\n$(x)"]
    refused = run_shim(shim, MUTABLE, answer=answer, argv=("python3", "-c", PROBE, "image-arg"))
    assert refused.code == 0, refused.stderr
    assert refused.probe["argv"] == ["image-arg"]
    assert "nitroconv-shim: refused 3 arguments: allow_cmdline_args is off" in refused.stderr
    assert "$(x)" not in refused.stderr


def test_shim_protocol_defaults_apply_without_parent(shim: Path) -> None:
    run = run_shim(shim, MUTABLE, answer=None)
    assert run.code == 0, run.stderr
    assert run.env["LOG"] == "info" and run.env["MODE"] == "fast"
    assert run.stderr.count("nitroconv-shim: no run-time values") == 1


@pytest.mark.parametrize("stream", [
    pytest.param(b"X3\nabcZ0\n", id="unknown-kind"),
    pytest.param(b"E03\nLOG=xZ0\n", id="leading-zero"),
    pytest.param(b"E-5\nZ0\n", id="negative-length"),
    pytest.param(b"E\nZ0\n", id="no-length"),
    pytest.param(b"E65537\n" + b"L" * 65537 + b"Z0\n", id="record-too-long"),
    pytest.param(b"E1234567\n", id="length-too-long"),
    pytest.param(records(("E", b"LOG=x\0y")), id="nul-in-value"),
    pytest.param(records(("E", b"NOEQUALS")), id="env-not-name-value"),
    pytest.param(records(("E", b"=x")), id="env-empty-name"),
    pytest.param(records(("E", b"LOG=x")) + b"", id="ok-control"),
    pytest.param(records(("E", b"LOG=x"), end=False), id="no-end-record"),
    pytest.param(b"E10\nLOG=x", id="cut-mid-value"),
    pytest.param(b"Z1\nx", id="end-with-length"),
    pytest.param(records(*[("A", b"x")] * 256), id="too-many-records"),  # 257 with the end record
    pytest.param(records(*[("A", b"y" * 65536)] * 16), id="over-1-mib"),  # the headers tip it over
])
def test_shim_protocol_malformed_answer_means_all_defaults(shim: Path, stream: bytes, request) -> None:
    run = run_shim(shim, [*MUTABLE, "--allow-args"], answer=stream, timeout_ms=2000)
    assert run.code == 0, run.stderr
    if request.node.callspec.id == "ok-control":
        assert run.env["LOG"] == "x"  # the same stream, well formed, is applied: the cases above differ only in the flaw
        return
    assert run.env["LOG"] == "info" and run.env["MODE"] == "fast"
    assert run.probe["argv"] == []
    assert run.stderr.count("nitroconv-shim: run-time values ignored (") == 1, run.stderr


def test_shim_protocol_limits_are_inclusive(shim: Path) -> None:
    big = b"LOG=" + b"v" * (65536 - 4)
    run = run_shim(shim, [*MUTABLE, "--allow-args"], answer=records(("E", big), *[("A", b"a")] * 254))
    assert run.code == 0, run.stderr
    assert run.env["LOG"] == big.decode()[4:] and len(run.probe["argv"]) == 254
    # Exactly 1 MiB in all, end record included.
    header, end = len(b"A65536\n"), len(b"Z0\n")
    last = (1 << 20) - 15 * (header + 65536) - end - len(b"A65xxx\n")
    answer = records(*[("A", b"y" * 65536)] * 15, ("A", b"z" * last))
    assert len(answer) == 1 << 20
    run = run_shim(shim, ["--allow-args"], answer=answer)
    assert run.code == 0, run.stderr
    assert len(run.probe["argv"]) == 16


def test_shim_protocol_silent_parent_times_out_to_defaults(shim: Path) -> None:
    # A parent that accepts but never answers: the exchange deadline ends the wait.
    run = run_shim(shim, MUTABLE, answer=b"", timeout_ms=300)
    assert run.code == 0, run.stderr
    assert run.env["LOG"] == "info"
    # ETIMEDOUT in musl's words (the shim links musl, worker/runtime/Makefile), not glibc's "Connection timed out".
    assert "run-time values ignored (answer cut short: Operation timed out)" in run.stderr


def test_shim_protocol_parent_hanging_up_means_defaults(shim: Path) -> None:
    run = run_shim(shim, MUTABLE, close_early=True)
    assert run.code == 0, run.stderr
    assert run.env["LOG"] == "info"
    assert "nitroconv-shim: run-time values ignored (" in run.stderr


# --- USER, HOME, WORKDIR, PATH ----------------------------------------------------------------------------


@pytest.mark.parametrize(("user", "identity", "home"), [
    # Docker's rule: the primary gid first, then the groups listing the user (none when a group is given).
    ("", "uid=0 gid=0 groups=0,10", "/root"),
    ("app", "uid=1000 gid=1000 groups=1000,10,50", "/home/app"),
    ("1000", "uid=1000 gid=1000 groups=1000,10,50", "/home/app"),
    ("app:staff", "uid=1000 gid=50 groups=50", "/home/app"),
    ("app:60", "uid=1000 gid=60 groups=60", "/home/app"),
    ("app:4242", "uid=1000 gid=4242 groups=4242", "/home/app"),
    ("4242", "uid=4242 gid=0 groups=0", "/"),
    ("4242:4343", "uid=4242 gid=4343 groups=4343", "/"),
    ("nohome", "uid=1001 gid=1001 groups=1001", "/"),
])
def test_shim_user_resolves_like_docker(shim: Path, etc: Path, user: str, identity: str, home: str) -> None:
    run = run_shim(shim, ["--user", user] if user else [], etc=etc)
    assert run.code == 0, run.stderr
    assert run.identity == f"nitroconv-shim-test: {identity}"
    assert run.env["HOME"] == home


def test_shim_user_keeps_home_from_the_environment(shim: Path, etc: Path) -> None:
    run = run_shim(shim, ["--user", "app"], etc=etc, env={"HOME": "/data"})
    assert run.env["HOME"] == "/data"


@pytest.mark.parametrize(("user", "message"), [
    ("ghost", "unable to find user ghost: no matching entries in passwd file"),
    ("app:ghosts", "unable to find group ghosts: no matching entries in group file"),
])
def test_shim_user_unknown_name_exits_126(shim: Path, etc: Path, user: str, message: str) -> None:
    run = run_shim(shim, ["--user", user], etc=etc)
    assert run.code == 126 and run.stdout == ""
    assert f"nitroconv-shim: {message}" in run.stderr


def test_shim_user_without_etc_files_numeric_works_names_fail(shim: Path, tmp_path: Path) -> None:
    assert run_shim(shim, ["--user", "5:6"], etc=tmp_path).identity == "nitroconv-shim-test: uid=5 gid=6 groups=6"
    assert run_shim(shim, ["--user", "app"], etc=tmp_path).code == 126


def test_shim_user_refuses_fifo_and_oversized_passwd(shim: Path, tmp_path: Path) -> None:
    fifo_etc = tmp_path / "fifo"
    fifo_etc.mkdir()
    os.mkfifo(fifo_etc / "passwd")  # would block a plain open() for read forever
    run = run_shim(shim, ["--user", "app"], etc=fifo_etc)
    assert run.code == 126 and "passwd: not a regular file" in run.stderr
    big_etc = tmp_path / "big"
    big_etc.mkdir()
    (big_etc / "passwd").write_bytes(b"#" * (1024 * 1024 + 1))
    run = run_shim(shim, ["--user", "app"], etc=big_etc)
    assert run.code == 126 and "passwd: larger than 1048576 bytes" in run.stderr


def test_shim_workdir_is_entered(shim: Path, tmp_path: Path) -> None:
    run = run_shim(shim, ["--workdir", str(tmp_path)])
    assert run.code == 0 and run.probe["cwd"] == str(tmp_path)


def test_shim_workdir_missing_exits_126_with_message(shim: Path, tmp_path: Path) -> None:
    run = run_shim(shim, ["--workdir", str(tmp_path / "nope")])
    assert run.code == 126 and run.stdout == ""
    assert f"nitroconv-shim: cannot enter WORKDIR {tmp_path / 'nope'}: No such file or directory" in run.stderr


def test_shim_path_lookup_uses_the_programs_path(shim: Path, tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    tool = bindir / "only-here"
    tool.write_text("#!/bin/sh\necho found \"$@\"\n")
    tool.chmod(0o755)
    (bindir / "not-exec").write_text("#!/bin/sh\n")
    run = run_shim(shim, [], argv=("only-here", "x"), env={"PATH": f"/nonexistent::{bindir}"})
    assert (run.code, run.stdout) == (0, "found x\n")
    missing = run_shim(shim, [], argv=("not-exec",), env={"PATH": str(bindir)})
    assert missing.code == 127
    assert 'nitroconv-shim: exec: "not-exec": executable file not found in $PATH' in missing.stderr


def test_shim_exec_failure_exit_codes(shim: Path, tmp_path: Path) -> None:
    assert run_shim(shim, [], argv=(str(tmp_path / "absent"),)).code == 127
    noexec = tmp_path / "data"
    noexec.write_text("not a program")
    noexec.chmod(0o644)
    run = run_shim(shim, [], argv=(str(noexec),))
    assert run.code == 126 and "Permission denied" in run.stderr


@pytest.mark.parametrize("options", [["--bogus"], ["--workdir"], ["--mutable", "NOEQ"], ["--mutable", "=x"]])
def test_shim_bad_options_exit_126(shim: Path, options: list[str]) -> None:
    run = run_shim(shim, options)
    assert run.code == 126 and run.stdout == "" and "nitroconv-shim: " in run.stderr


def test_shim_test_variables_do_not_reach_the_program(shim: Path) -> None:
    assert not [k for k in run_shim(shim, []).env if k.startswith("NITROCONV_SHIM_TEST")]


def test_shim_protocol_refused_name_is_escaped_onto_one_line(shim: Path) -> None:
    run = run_shim(shim, MUTABLE, answer=records(("E", b"X\nnitroconv-init: exec ok =secret")))
    assert run.code == 0, run.stderr
    assert "nitroconv-shim: refused env X\\x0anitroconv-init: exec ok : not in mutable_env_vars" in run.stderr
    assert not any(line.startswith("nitroconv-init") for line in run.stderr.splitlines())
    assert "secret" not in run.stderr


def test_shim_recipe_build_is_static_and_reproducible(tmp_path: Path) -> None:
    one, two = build_shim(tmp_path / "one"), build_shim(tmp_path / "two")
    assert one.read_bytes() == two.read_bytes()
    assert one.stat().st_mode & 0o777 == 0o755
    headers = subprocess.run(["readelf", "-lW", str(one)], capture_output=True, text=True, check=True).stdout
    assert "INTERP" not in headers
    notes = subprocess.run(["readelf", "-nW", str(one)], capture_output=True, text=True, check=True).stdout
    assert "GNU_BUILD_ID" not in notes
