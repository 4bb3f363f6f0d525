"""A bounded libFuzzer run (ASan + UBSan, Debian's clang) over the C code of worker/runtime that reads untrusted bytes:
launch.json, the run-time answer, the image's /etc/passwd and /etc/group, /cmd and /env, attestd's HTTP requests,
the egress policy and DNS queries, the ingress PROXY v2 header. Every harness first replays its corpus
(tests/fuzz/corpus/<name>: seeds and the inputs of crashes fixed before), then mutates for FUZZ_SECONDS."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.fixtures.require import skip_or_fail

HERE = Path(__file__).resolve().parent
SOURCES = HERE.parents[1] / "worker" / "runtime"
HARNESSES = ("launch_json", "shim_protocol", "shim_etc", "init_items", "attestd_request", "egress", "proxy_header")
# About a minute in all for `make test`; a longer hunt: `fuzz_<name> -max_total_time=3600 corpus/<name>`.
FUZZ_SECONDS = 15


@pytest.fixture(scope="module")
def harnesses(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("clang") is None:
        skip_or_fail("clang is not installed (deploy/apt-deps.sh installs it)")
    out = tmp_path_factory.mktemp("fuzz")
    for name in HARNESSES:
        # Warnings of the harness and of the included source are errors, as in the shipped build; the sources'
        # functions a harness does not reach are not.
        subprocess.run(["clang", "-g", "-O1", "-fsanitize=fuzzer,address,undefined", "-fno-sanitize-recover=all",
                        "-Wall", "-Wextra", "-Werror", "-Wno-unused-function", "-I", str(SOURCES),
                        "-o", str(out / f"fuzz_{name}"), str(HERE / f"fuzz_{name}.c")], check=True)
    return out


@pytest.mark.timeout(FUZZ_SECONDS * 4 + 60)
@pytest.mark.parametrize("name", HARNESSES)
def test_fuzz_finds_no_crash(harnesses: Path, tmp_path: Path, name: str) -> None:
    corpus = HERE / "corpus" / name
    assert any(corpus.iterdir()), f"{corpus} has no seeds"
    found = tmp_path / "found"  # new inputs go to the first corpus dir: never into the repository's
    found.mkdir()
    done = subprocess.run([str(harnesses / f"fuzz_{name}"), f"-max_total_time={FUZZ_SECONDS}", "-timeout=10",
                           "-close_fd_mask=2", f"-artifact_prefix={tmp_path}/", str(found), str(corpus)],
                          env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                          timeout=FUZZ_SECONDS * 4 + 30)
    artifacts = sorted(str(p) for p in tmp_path.iterdir() if p.is_file())  # crash-*, leak-*, timeout-*, oom-*
    assert done.returncode == 0 and not artifacts, (
        f"fuzz_{name} failed (exit {done.returncode}); fix it and keep the input as a regression case in "
        f"{corpus}: {artifacts}\n{done.stderr[-6000:]}")
    # It ran: the whole corpus and then mutations, with coverage feedback (a harness that returns at once, or a
    # build without -fsanitize=fuzzer, would not get here).
    runs = re.search(r"^Done (\d+) runs", done.stderr, re.M)
    assert runs and int(runs[1]) > 1000, done.stderr[-3000:]
    cov = re.findall(r"cov: (\d+)", done.stderr)
    assert cov and int(cov[-1]) > 20, done.stderr[-3000:]
