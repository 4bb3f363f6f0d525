"""The enclave's attestation endpoint (worker/runtime/attestd.c) in the emulator, end to end.

A converted busybox app, run with `nitroconv run-local` (QEMU's nitro-enclave machine, our vsock back-end, the
real launcher), fetches a document from 127.0.0.1:1300 with busybox wget for a nonce and user data the parent
gives it at run time, and prints it on the console. The verifier (common/enclave/attestation.py and `nitroconv
attestation verify`) then checks that document: QEMU's NSM signs nothing, so the default mode refuses it as
`unsigned_document`; the emulator mode skips only the signature and the chain and checks the rest, the PCRs
QEMU measured against the Build's and the nonce against the one sent. Needs the emulator `make setup` builds:
skipped without it on a developer's machine, failed under CI.
"""
from __future__ import annotations

import base64
import datetime as dt
import os
import subprocess
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.enclave.attestation import Expectations, check
from tests.e2e.test_run_local import NITROCONV, TIMEOUT, _program_lines, emulator, run_local  # noqa: F401
from tests.fixtures.devblobs import DevBlobs
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import image_config, make_layer, push_test_image
from tests.fixtures.registries import RunningRegistry
from worker.pipeline.bootcheck import boot_eif
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

pytestmark = [pytest.mark.e2e, pytest.mark.qemu]

ENDPOINT = "http://127.0.0.1:1300/.well-known/nitroconv/attestation"
# The app: one document for the run-time nonce and user data (hex), printed base64 in "P DOC" lines (when that
# fails, the error's JSON body through nc); then what a bad request gets (wget's exit status, and the body).
RAW_GET = r"printf 'GET /.well-known/nitroconv/attestation?%s HTTP/1.1\r\nHost: x\r\n\r\n' "
SCRIPT = "; ".join([  # one line: /cmd holds one argument per line
    'Q="nonce=$NONCE&user_data=$USER_DATA"',
    f'if ! wget -q -O /tmp/doc "{ENDPOINT}?$Q"; then echo "P FETCH FAILED"; '
    f'{RAW_GET} "$Q" | nc 127.0.0.1 1300 | tail -n 1 | sed "s/^/P FAILED BODY /"; exit 1; fi',
    'base64 /tmp/doc | sed "s/^/P DOC /"',
    f'wget -q -O /tmp/bad "{ENDPOINT}?nonce=zz"; echo "P BAD WGET $?"',
    f'{RAW_GET} nonce=zz | nc 127.0.0.1 1300 | tail -n 1 | sed "s/^/P BAD BODY /"',
])


@dataclass(frozen=True)
class Converted:
    ref: str
    eif: Path
    pcrs: dict[int, bytes]


@pytest.fixture(scope="module")
def converted(registry: RunningRegistry, dev_blobs: DevBlobs, runtime_dir: Path,
              tmp_path_factory: pytest.TempPathFactory) -> Converted:
    base = make_layer(busybox_base_tar())
    config = image_config([base.diff_id], cmd=(), Entrypoint=["/bin/sh", "-c", SCRIPT])
    name = f"attest/app-{uuid.uuid4().hex[:6]}"
    image = push_test_image(registry, name, "v1", [base], config=config)
    out = f"{registry.host}/{name}-enclave:v1"
    spec = ConvertSpec(input_ref=image.ref, output_ref=out, input_credentials=None, output_credentials=None,
                       options=ConverterOptions(mutable_env_vars=("NONCE=00", "USER_DATA=00")),
                       cpu_count=1, mem_size_mib=None)
    work = tmp_path_factory.mktemp("attest") / "w"
    work.mkdir()
    host = ConversionHost(blobs_dir=dev_blobs.dir, runtime_dir=runtime_dir, cache_dir=work / "cache",
                          insecure_registries=registry.allowed_hosts)
    result = convert(spec, host, Progress(), Workspace(work / "scratch", eif_out=work / "app.eif"))
    m = result.measurements
    return Converted(out, work / "app.eif",
                     {0: bytes.fromhex(m.pcr0), 1: bytes.fromhex(m.pcr1), 2: bytes.fromhex(m.pcr2)})


@pytest.fixture(scope="module")
def app(converted: Converted, emulator: Path) -> Converted:  # noqa: F811
    return converted


def test_without_an_nsm_the_endpoint_is_up_and_answers_503(converted: Converted, tmp_path: Path) -> None:
    """Plain QEMU (the EIF's kernel and ramdisks, no NSM device): the exec shim starts attestd before the program, which
    reaches it on loopback at once and gets `nsm_unavailable`."""
    result = boot_eif(converted.eif, timeout=TIMEOUT, settle=TIMEOUT, scratch=tmp_path)
    assert result.exit_status == 1, result.console_tail
    assert "P FETCH FAILED" in result.program_output
    body = [line for line in result.program_output if line.startswith("P FAILED BODY ")]
    assert body and '"code":"nsm_unavailable"' in body[0], result.program_output


@dataclass(frozen=True)
class Fetched:
    document: bytes
    nonce: bytes
    user_data: bytes
    lines: list[str]
    fetched_at: dt.datetime


@pytest.fixture(scope="module")
def fetched(registry: RunningRegistry, runtime_dir: Path, app: Converted) -> Fetched:
    nonce, user_data = os.urandom(32), b"attested by " + uuid.uuid4().hex.encode()
    done = run_local(registry, runtime_dir, app.ref, "--env", f"NONCE={nonce.hex()}",
                     "--env", f"USER_DATA={user_data.hex()}")
    assert done.returncode == 0, done.stdout + done.stderr
    lines = _program_lines(done)
    document = base64.b64decode("".join(line[len("P DOC "):] for line in lines if line.startswith("P DOC ")))
    assert document, done.stdout
    return Fetched(document, nonce, user_data, lines, dt.datetime.now(dt.UTC))


def test_the_default_mode_refuses_qemus_unsigned_document(app: Converted, fetched: Fetched) -> None:
    report = check(fetched.document, Expectations(pcrs=app.pcrs, nonce=fetched.nonce), now=fetched.fetched_at)
    assert not report.verified and report.error is not None
    assert report.error.code == "unsigned_document"
    assert report.checks["cose"] == "failed" and report.checks["pcrs"] == "not_reached"


def test_the_emulator_mode_checks_the_builds_pcrs_and_the_nonce(app: Converted, fetched: Fetched) -> None:
    report = check(fetched.document, Expectations(pcrs=app.pcrs, nonce=fetched.nonce, emulator=True),
                   now=fetched.fetched_at)
    assert report.verified, report.as_dict()
    assert report.checks == {"cose": "passed", "payload": "passed", "certificate_chain": "skipped_emulator",
                             "signature": "skipped_emulator", "debug_mode": "passed", "pcrs": "passed",
                             "nonce": "passed", "freshness": "passed"}
    assert report.document is not None
    # The values the app asked for are the ones bound into the document.
    assert report.document.nonce == fetched.nonce and report.document.user_data == fetched.user_data
    assert report.document.public_key is None
    # The PCRs are QEMU's own measurements of the EIF, read from its NSM: a wrong expectation is caught.
    wrong = {**app.pcrs, 2: bytes(48)}
    bad = check(fetched.document, Expectations(pcrs=wrong, nonce=fetched.nonce, emulator=True), now=fetched.fetched_at)
    assert bad.error is not None and bad.error.code == "pcr_mismatch"
    other_nonce = check(fetched.document, Expectations(pcrs=app.pcrs, nonce=os.urandom(32), emulator=True),
                        now=fetched.fetched_at)
    assert other_nonce.error is not None and other_nonce.error.code == "nonce_mismatch"


def test_the_cli_verifies_it_only_in_emulator_mode(app: Converted, fetched: Fetched, tmp_path: Path) -> None:
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(fetched.document)
    expect = [a for i, v in sorted(app.pcrs.items()) for a in ("--expect-pcr", f"{i}={v.hex()}")]
    argv = [str(NITROCONV), "attestation", "verify", str(doc), *expect, "--nonce", fetched.nonce.hex()]
    refused = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 1 and "unsigned_document" in refused.stderr, refused.stderr
    accepted = subprocess.run([*argv, "--emulator"], capture_output=True, text=True, timeout=60)
    assert accepted.returncode == 0, accepted.stdout + accepted.stderr
    assert "EMULATOR MODE" in accepted.stdout + accepted.stderr


def test_a_bad_request_inside_the_enclave_gets_its_stable_code(fetched: Fetched) -> None:
    assert "P BAD WGET 1" in fetched.lines, fetched.lines
    body = [line for line in fetched.lines if line.startswith("P BAD BODY ")]
    assert body and '"code":"invalid_hex"' in body[0] and '"parameter":"nonce"' in body[0], fetched.lines
