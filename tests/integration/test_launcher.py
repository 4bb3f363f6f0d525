"""The launcher /enclave/run (worker/runtime/launcher.c) as a process: its launch.json reader, the parent side
of the run-time protocol over a socket pair, the nitro-cli it runs, signal forwarding and its exit status."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from common.enclave.measure import Measurements
from tests.fixtures.devblobs import RUNTIME_RECIPE, RUNTIME_SOURCES, build_shim, make
from worker.pipeline.spec import ConverterOptions, ConvertSpec
from worker.pipeline.stages import enclave_files

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
HELLO = b"NCRT1\n"
PORT = 9001


def build_launcher(target: Path) -> Path:
    """The launcher as `make runtime` builds it (a no-op when current)."""
    make(RUNTIME_RECIPE, f"RUNTIME={target}", f"{target}/run")
    return target / "run"


@pytest.fixture(scope="module")
def launcher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_launcher(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def test_build(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The same source and toolchain with the test hooks (--launch-json PATH, --serve-fd N)."""
    out = tmp_path_factory.mktemp("runtime-test")
    make(RUNTIME_SOURCES, f"OUT={out}", f"{out}/run-test")
    return out / "run-test"


def launch_json(**options: object) -> bytes:
    """launch.json exactly as the converter writes it, for the given converter options."""
    spec = ConvertSpec(input_ref="r/x:1", output_ref="r/y:1", input_credentials=None, output_credentials=None,
                       options=ConverterOptions(**options), cpu_count=2, mem_size_mib=1024)  # type: ignore[arg-type]
    measurements = Measurements(pcr0="00" * 48, pcr1="11" * 48, pcr2="22" * 48)
    return enclave_files(spec, measurements, 1024)["launch.json"]


def run(binary: Path, config: bytes | Path, *args: str, env: Mapping[str, str] | None = None,
        tmp_path: Path, pass_fds: Sequence[int] = ()) -> subprocess.CompletedProcess[str]:
    path = config if isinstance(config, Path) else tmp_path / "launch.json"
    if not isinstance(config, Path):
        path.write_bytes(config)
    return subprocess.run([str(binary), "--launch-json", str(path), *args], env=dict(env or {}), capture_output=True,
                          text=True, timeout=30, pass_fds=pass_fds)


def dry_run_fields(stdout: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in stdout.splitlines())


# --- launch.json ---------------------------------------------------------------------------------------------


def test_launcher_dry_run_prints_the_nitro_cli_command(test_build: Path, tmp_path: Path) -> None:
    done = run(test_build, launch_json(mutable_env_vars=("GREETING=hello", "LEVEL=1")), "--dry-run",
               tmp_path=tmp_path, env={"GREETING": "secret-value", "PATH": "/nonexistent"})
    assert done.returncode == 0, done.stderr
    fields = dry_run_fields(done.stdout)
    assert fields["command"] == "nitro-cli run-enclave --eif-path /enclave/app.eif --cpu-count 2 --memory 1024"
    assert fields["nitro-cli"].startswith("not found")
    assert fields["serve"] == f"vsock port {PORT}"
    assert fields["env"] == "GREETING"
    assert fields["allowed env"] == "2"
    assert fields["args"] == "0"
    assert "secret-value" not in done.stdout + done.stderr


def test_launcher_debug_adds_debug_mode_and_console(test_build: Path, tmp_path: Path) -> None:
    from_file = run(test_build, launch_json(debug=True), "--dry-run", tmp_path=tmp_path)
    from_flag = run(test_build, launch_json(), "--debug", "--dry-run", tmp_path=tmp_path)
    for done in (from_file, from_flag):
        assert done.returncode == 0, done.stderr
        assert dry_run_fields(done.stdout)["command"].endswith("--memory 1024 --debug-mode --attach-console")


def test_launcher_reads_escaped_strings_and_all_options(test_build: Path, tmp_path: Path) -> None:
    doc = {"eif": "/enclave/app.eif", "cpu_count": 4, "memory_mib": 2048, "debug": False,
           "allow_cmdline_args": True, "java_mode": "JDK\u00e9\U0001f600", "enable_overlay_filesystem_persistence": False,
           "mutable_env_vars": {"N\u00e9": "v\"\\\n\t/\u0001"}}
    done = run(test_build, json.dumps(doc).encode(), "--dry-run", "--", "a", "--dry-run",
               tmp_path=tmp_path, env={"N\u00e9": "x"})
    assert done.returncode == 0, done.stderr
    fields = dry_run_fields(done.stdout)
    assert fields["command"].endswith("--cpu-count 4 --memory 2048")
    assert fields["java_mode"] == "JDK\u00e9\U0001f600"
    assert fields["env"] == "N\u00e9"
    assert fields["args"] == "2"
    assert fields["enable_overlay_filesystem_persistence"] == "false"


MINIMAL = '{"eif": "/enclave/app.eif", "cpu_count": 2, "memory_mib": 512'


@pytest.mark.parametrize(("text", "why"), [
    (b"", "unexpected character"),
    (b"[]", "unexpected character"),
    (MINIMAL.encode(), "unexpected character"),
    ((MINIMAL + "}}").encode(), "trailing data"),
    ((MINIMAL + ', "extra": 1}').encode(), "unknown key"),
    ((MINIMAL + ', "cpu_count": 3}').encode(), "duplicate key"),
    (b'{"eif": "/enclave/app.eif", "cpu_count": 2}', "required"),
    (b'{"eif": "app.eif", "cpu_count": 2, "memory_mib": 512}', "absolute path"),
    (b'{"eif": "/e", "cpu_count": 0, "memory_mib": 512}', "must be positive"),
    (b'{"eif": "/e", "cpu_count": -1, "memory_mib": 512}', "expected an integer"),
    (b'{"eif": "/e", "cpu_count": 2.0, "memory_mib": 512}', "expected an integer"),
    (b'{"eif": "/e", "cpu_count": 02, "memory_mib": 512}', "leading zero"),
    (b'{"eif": "/e", "cpu_count": 99999999999999999999, "memory_mib": 512}', "out of range"),
    (b'{"eif": "/e", "cpu_count": "2", "memory_mib": 512}', "expected an integer"),
    ((MINIMAL + ', "debug": 1}').encode(), "expected true or false"),
    ((MINIMAL + ', "debug": tru}').encode(), "unexpected word"),
    ((MINIMAL + ', "mutable_env_vars": {"A": 1}}').encode(), "expected a string"),
    ((MINIMAL + ', "mutable_env_vars": {"A": "1", "A": "2"}}').encode(), "duplicate name"),
    ((MINIMAL + ', "mutable_env_vars": {"A=B": "1"}}').encode(), "bad variable name"),
    ((MINIMAL + ', "mutable_env_vars": {"": "1"}}').encode(), "bad variable name"),
    ((MINIMAL + ', "mutable_env_vars": []}').encode(), "unexpected character"),
    ((MINIMAL + ', "java_mode": "a\\u0000b"}').encode(), "NUL in string"),
    ((MINIMAL + ', "java_mode": "\\ud800"}').encode(), "lone surrogate"),
    ((MINIMAL + ', "java_mode": "\\x41"}').encode(), "unknown escape"),
    ((MINIMAL + ', "java_mode": "a\tb"}').encode(), "control character"),
    ((MINIMAL + ', "java_mode": "\xc3\x28"}').encode("latin-1"), "invalid UTF-8"),
    ((MINIMAL + ', "java_mode": "\xc0\xaf"}').encode("latin-1"), "invalid UTF-8"),
    ((MINIMAL + ', "java_mode": "unterminated}').encode(), "unterminated string"),
    ((MINIMAL + "}\x00").encode(), "NUL byte"),
])
def test_launcher_refuses_malformed_launch_json(test_build: Path, tmp_path: Path, text: bytes, why: str) -> None:
    done = run(test_build, text, "--dry-run", tmp_path=tmp_path)
    assert done.returncode == 1
    assert "is not a valid launch file" in done.stderr and why in done.stderr, done.stderr
    assert done.stdout == ""


def test_launcher_refuses_oversized_launch_json(test_build: Path, tmp_path: Path) -> None:
    padded = (MINIMAL + "}").encode() + b" " * (1024 * 1024)
    done = run(test_build, padded, "--dry-run", tmp_path=tmp_path)
    assert done.returncode == 1 and "larger than 1048576 bytes" in done.stderr, done.stderr
    # Just under the bound is read (whitespace is legal JSON).
    fits = (MINIMAL + "}").encode().ljust(1024 * 1024, b" ")
    assert run(test_build, fits, "--dry-run", tmp_path=tmp_path).returncode == 0


def test_launcher_missing_launch_json_is_a_clear_error(test_build: Path, tmp_path: Path) -> None:
    done = run(test_build, tmp_path / "absent.json", "--dry-run", tmp_path=tmp_path)
    assert done.returncode == 1 and "cannot open" in done.stderr and "absent.json" in done.stderr


def test_launcher_refuses_arguments_unless_allowed(test_build: Path, tmp_path: Path) -> None:
    done = run(test_build, launch_json(), "--dry-run", "extra", tmp_path=tmp_path)
    assert done.returncode == 2
    assert "does not accept extra arguments" in done.stderr and "allow_cmdline_args" in done.stderr
    allowed = run(test_build, launch_json(allow_cmdline_args=True), "--dry-run", "-v", "x", tmp_path=tmp_path)
    assert allowed.returncode == 0 and dry_run_fields(allowed.stdout)["args"] == "2"


# --- the run-time protocol, parent side ----------------------------------------------------------------------


def read_records(sock: socket.socket) -> list[tuple[str, bytes]]:
    """The records `<K><len>\\n<bytes>` until `Z0\\n`, parsed strictly as the shim must."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    records = []
    while data:
        head, sep, rest = data.partition(b"\n")
        assert sep and head[:1] in (b"E", b"A", b"Z") and head[1:].isdigit(), data[:40]
        size = int(head[1:])
        records.append((head[:1].decode(), rest[:size]))
        data = rest[size:]
        if head == b"Z0":
            assert data == b"", "nothing may follow the Z record"
    assert records and records[-1] == ("Z", b"")
    return records


def serve(test_build: Path, tmp_path: Path, config: bytes, *args: str, env: Mapping[str, str],
          hello: bytes = HELLO) -> tuple[int, list[tuple[str, bytes]] | bytes, str]:
    ours, theirs = socket.socketpair()
    with ours:
        path = tmp_path / "launch.json"
        path.write_bytes(config)
        proc = subprocess.Popen([str(test_build), "--launch-json", str(path), "--serve-fd", str(theirs.fileno()),
                                 *args], env=dict(env), pass_fds=[theirs.fileno()], stderr=subprocess.PIPE, text=True)
        theirs.close()
        ours.sendall(hello)
        ours.shutdown(socket.SHUT_WR)
        if hello == HELLO:
            got: list[tuple[str, bytes]] | bytes = read_records(ours)
        else:
            got = ours.recv(65536)
        _, stderr = proc.communicate(timeout=30)
    return proc.returncode, got, stderr


def test_launcher_serves_allowed_env_and_arguments(test_build: Path, tmp_path: Path) -> None:
    config = launch_json(mutable_env_vars=("GREETING=hello", "UNSET=default"), allow_cmdline_args=True)
    value = "h\u00e9llo=world\nline two"
    code, records, stderr = serve(test_build, tmp_path, config, "first arg", "", "--flag",
                                  env={"GREETING": value, "OTHER": "not on the allow-list"})
    assert code == 0, stderr
    assert records == [("E", f"GREETING={value}".encode()), ("A", b"first arg"), ("A", b""), ("A", b"--flag"),
                       ("Z", b"")]
    assert "served 1 env value(s) and 3 argument(s)" in stderr
    assert value not in stderr


def test_launcher_serves_only_the_end_record_when_nothing_is_given(test_build: Path, tmp_path: Path) -> None:
    code, records, _ = serve(test_build, tmp_path, launch_json(mutable_env_vars=("A=1",)), env={"B": "2"})
    assert code == 0 and records == [("Z", b"")]


def test_launcher_answers_nothing_to_a_wrong_hello(test_build: Path, tmp_path: Path) -> None:
    code, got, stderr = serve(test_build, tmp_path, launch_json(mutable_env_vars=("A=1",)), env={"A": "secret"},
                              hello=b"NCRT2\n")
    assert code == 1 and got == b""
    assert "not the nitroconv run-time hello" in stderr


def test_launcher_refuses_values_beyond_the_protocol_bounds(test_build: Path, tmp_path: Path) -> None:
    config = launch_json(mutable_env_vars=("BIG=1",))
    done = run(test_build, config, "--dry-run", tmp_path=tmp_path, env={"BIG": "x" * 65536})
    assert done.returncode == 2 and "longer than 65536 bytes" in done.stderr
    many = run(test_build, launch_json(allow_cmdline_args=True), "--dry-run", *["a"] * 256, tmp_path=tmp_path)
    assert many.returncode == 2 and "too many run-time values" in many.stderr


def test_launcher_and_shim_agree_over_a_socket_pair(test_build: Path, tmp_path: Path) -> None:
    """Both ends of the protocol as built: the launcher's answer becomes the program's env and argv in the shim."""
    shim = build_shim(tmp_path / "shim", test_hooks=True)
    config = tmp_path / "launch.json"
    config.write_bytes(launch_json(mutable_env_vars=("LOG=info", "MODE=fast"), allow_cmdline_args=True))
    probe = "import json, os, sys; print(json.dumps({'argv': sys.argv[1:], 'env': dict(os.environ)}))"
    parent, child = socket.socketpair()
    with parent, child:
        launcher = subprocess.Popen([str(test_build), "--launch-json", str(config), "--serve-fd",
                                     str(parent.fileno()), "--port", "8 0"],
                                    env={"LOG": "debug", "NOT_LISTED": "x"}, pass_fds=[parent.fileno()],
                                    stderr=subprocess.PIPE, text=True)
        program = subprocess.Popen(
            [str(shim), "--mutable", "LOG=info", "--mutable", "MODE=fast", "--allow-args", "--",
             "python3", "-c", probe, "image-arg"],
            env={"PATH": os.environ["PATH"], "LOG": "info", "NITROCONV_SHIM_TEST_FD": str(child.fileno()),
                 "NITROCONV_SHIM_TEST_TIMEOUT_MS": "5000"},
            pass_fds=[child.fileno()], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, shim_err = program.communicate(timeout=60)
    _, launcher_err = launcher.communicate(timeout=60)
    assert launcher.returncode == 0, launcher_err
    assert program.returncode == 0, shim_err
    seen = json.loads(out)
    assert seen["argv"] == ["image-arg", "--port", "8 0"]
    # LOG from `docker run -e`, MODE its default, a name off the allow-list never sent.
    assert seen["env"]["LOG"] == "debug" and seen["env"]["MODE"] == "fast" and "NOT_LISTED" not in seen["env"]


# --- nitro-cli: command, status, signals ----------------------------------------------------------------------


def fake_nitro_cli(bin_dir: Path, script: str) -> Path:
    """A stand-in for nitro-cli (absent here): a shell script on PATH that records its argv."""
    bin_dir.mkdir(exist_ok=True)
    tool = bin_dir / "nitro-cli"
    tool.write_text("#!/bin/sh\n" + script)
    tool.chmod(0o755)
    return tool


def test_launcher_production_build_reads_enclave_launch_json_only(launcher: Path, tmp_path: Path) -> None:
    if Path("/enclave/launch.json").exists():
        pytest.skip("this machine has an /enclave/launch.json")
    # No test hooks in the shipped binary: --launch-json is an ordinary (refused) argument there.
    done = subprocess.run([str(launcher), "--launch-json", str(tmp_path / "x")], env={"PATH": str(tmp_path)},
                          capture_output=True, text=True, timeout=30)
    assert done.returncode == 1 and "cannot open /enclave/launch.json" in done.stderr


def test_launcher_runs_nitro_cli_and_exits_with_its_status(test_build: Path, tmp_path: Path) -> None:
    record = tmp_path / "argv"
    fake_nitro_cli(tmp_path / "bin", f'printf "%s\\n" "$@" > {record}\nexit 3\n')
    done = run(test_build, launch_json(debug=True), tmp_path=tmp_path, env={"PATH": str(tmp_path / "bin")})
    assert done.returncode == 3, done.stderr
    assert record.read_text().splitlines() == ["run-enclave", "--eif-path", "/enclave/app.eif", "--cpu-count", "2",
                                               "--memory", "1024", "--debug-mode", "--attach-console"]
    assert "all-zero PCRs" in done.stderr


def test_launcher_missing_nitro_cli_is_a_clear_error(test_build: Path, tmp_path: Path) -> None:
    done = run(test_build, launch_json(), tmp_path=tmp_path, env={"PATH": str(tmp_path)})
    assert done.returncode == 127
    assert "nitro-cli was not found" in done.stderr and "NITROCONV_OUTPUT_BASE_IMAGE" in done.stderr


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_launcher_forwards_signals_to_nitro_cli(test_build: Path, tmp_path: Path, sig: signal.Signals) -> None:
    ready = tmp_path / "ready"
    # exec: the signal must reach the fake itself, not a shell waiting for it.
    fake_nitro_cli(tmp_path / "bin", f"trap 'echo got-$$ >> {ready}.sig; exit 42' {sig.name[3:]}\n"
                                     f": > {ready}\nwhile :; do sleep 0.05; done\n")
    path = tmp_path / "launch.json"
    path.write_bytes(launch_json(debug=True))
    proc = subprocess.Popen([str(test_build), "--launch-json", str(path)], env={"PATH": f"{tmp_path / 'bin'}:/bin"},
                            stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(600):
            if ready.exists():
                break
            time.sleep(0.05)
        assert ready.exists(), "the fake nitro-cli never started"
        proc.send_signal(sig)
        _, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 42, stderr
    assert Path(f"{ready}.sig").read_text().startswith("got-")


def test_launcher_keeps_serving_after_a_detached_start_until_told_to_stop(test_build: Path, tmp_path: Path) -> None:
    """nitro-cli without --attach-console returns before the shim asks for its values: the launcher stays."""
    fake_nitro_cli(tmp_path / "bin", "exit 0\n")
    path = tmp_path / "launch.json"
    path.write_bytes(launch_json(mutable_env_vars=("GREETING=hello",)))
    proc = subprocess.Popen([str(test_build), "--launch-json", str(path)],
                            env={"PATH": str(tmp_path / "bin"), "GREETING": "hi"}, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        if "cannot listen on vsock" in line:
            pytest.skip(f"no vsock listener here: {line.strip()}")
        assert "enclave started; serving its run-time values" in line
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0  # nitro-cli's status
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_launcher_build_is_reproducible(tmp_path: Path) -> None:
    first, second = build_launcher(tmp_path / "a"), build_launcher(tmp_path / "b")
    assert first.read_bytes() == second.read_bytes()
    assert b"/work/" not in first.read_bytes() and os.access(first, os.X_OK)
