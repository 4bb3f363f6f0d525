"""`nitroconv attestation verify` with PCRs from the command line (no service, no sockets)."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.fixtures.attestation import NONCE, PCR0, PCR1, Doc, emulator_document, make_pki
from worker.cli import main


@pytest.fixture(scope="module")
def pki():
    return make_pki()


@pytest.fixture
def pinned(pki, tmp_path):
    """--root/--root-sha256 for the test PKI's root."""
    pem = tmp_path / "root.pem"
    pem.write_bytes(pki.root.cert.public_bytes(Encoding.PEM))
    return ["--root", str(pem), "--root-sha256", hashlib.sha256(pki.root.der).hexdigest()]


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fresh(pki, **over) -> bytes:  # noqa: ANN001
    return Doc(pki, timestamp=_now(), **over).encode()


@pytest.fixture(scope="module")
def live_pki():
    """A chain valid now (the CLI reads the clock)."""
    return make_pki(at=dt.datetime.now(dt.UTC))


def _run(capsys, *argv: str) -> tuple[int, str, str]:  # noqa: ANN001
    try:
        status = main(list(argv))
    except SystemExit as exc:  # argparse's usage errors
        status = int(exc.code or 0)
    out, err = capsys.readouterr()
    return status, out, err


def test_a_document_verifies_against_a_root_pinned_on_the_command_line(capsys, tmp_path, live_pki):
    pem = tmp_path / "root.pem"
    pem.write_bytes(live_pki.root.cert.public_bytes(Encoding.PEM))
    pin = ["--root", str(pem), "--root-sha256", hashlib.sha256(live_pki.root.der).hexdigest()]
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(_fresh(live_pki))
    status, out, err = _run(capsys, "attestation", "verify", str(doc), *pin, "--expect-pcr", f"0={PCR0.hex()}",
                            "--expect-pcr", f"1={PCR1.hex()}", "--nonce", NONCE.hex())
    assert status == 0, err
    assert out.splitlines()[0] == "verified:  yes" and "mode:      aws" in out
    assert f"PCR0: ok       expected {PCR0.hex()}" in out and err == ""

    # The same as base64 text, and as JSON.
    b64 = tmp_path / "doc.b64"
    b64.write_text(base64.encodebytes(doc.read_bytes()).decode())  # wrapped lines, as tools write it
    status, out, _ = _run(capsys, "attestation", "verify", str(b64), *pin, "--json")
    report = json.loads(out)
    assert status == 0 and report["verified"] is True and report["checks"]["pcrs"] == "not_requested"


def test_a_wrong_pcr_exits_1_with_its_code(capsys, tmp_path, live_pki):
    pem = tmp_path / "root.pem"
    pem.write_bytes(live_pki.root.cert.public_bytes(Encoding.PEM))
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(_fresh(live_pki))
    status, out, err = _run(capsys, "attestation", "verify", str(doc), "--root", str(pem), "--root-sha256",
                            hashlib.sha256(live_pki.root.der).hexdigest(), "--expect-pcr", f"0={PCR1.hex()}")
    assert status == 1 and err.startswith("nitroconv: pcr_mismatch: ")
    assert "verified:  NO (pcr_mismatch" in out and f"got {PCR0.hex()}" in out


def test_without_a_pin_the_aws_root_is_trusted_and_a_test_root_is_not(capsys, tmp_path, live_pki):
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(_fresh(live_pki))
    status, _, err = _run(capsys, "attestation", "verify", str(doc))
    assert status == 1 and err.startswith("nitroconv: untrusted_chain: ")


def test_the_emulator_mode_is_loud(capsys, tmp_path):
    doc = tmp_path / "qemu.cbor"
    doc.write_bytes(emulator_document({0: PCR0, 1: PCR1, 2: PCR1}, NONCE, timestamp=_now()))
    status, _, err = _run(capsys, "attestation", "verify", str(doc), "--expect-pcr", f"0={PCR0.hex()}")
    assert status == 1 and err.startswith("nitroconv: unsigned_document: ")
    status, out, err = _run(capsys, "attestation", "verify", str(doc), "--expect-pcr", f"0={PCR0.hex()}",
                            "--emulator", "--nonce", NONCE.hex())
    assert status == 0, err
    assert "mode:      emulator" in out and "WARNING: EMULATOR MODE" in out and "skipped_emulator" in out


def test_stale_and_max_age(capsys, tmp_path):
    doc = tmp_path / "qemu.cbor"
    doc.write_bytes(emulator_document({0: PCR0, 1: PCR1, 2: PCR1}, timestamp=_now() - dt.timedelta(hours=1)))
    status, _, err = _run(capsys, "attestation", "verify", str(doc), "--emulator")
    assert status == 1 and err.startswith("nitroconv: stale_document: ")
    assert _run(capsys, "attestation", "verify", str(doc), "--emulator", "--max-age", "7200")[0] == 0
    assert _run(capsys, "attestation", "verify", str(doc), "--emulator", "--max-age", "0")[0] == 0


@pytest.mark.parametrize("argv", [
    ["--expect-pcr", "0=abc"], ["--expect-pcr", f"32={PCR0.hex()}"], ["--expect-pcr", "x"], ["--nonce", "zz"],
    ["--build", "b", "--expect-pcr", f"0={PCR0.hex()}"], ["--max-age", "-1"], ["--root-sha256", "00" * 32],
])
def test_usage_errors_exit_2(capsys, tmp_path, argv):
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(b"\x84")
    assert _run(capsys, "attestation", "verify", str(doc), *argv)[0] == 2


def test_a_root_that_does_not_match_its_pin_is_a_usage_error(capsys, tmp_path, pki, pinned):
    doc = tmp_path / "doc.cbor"
    doc.write_bytes(b"\x84")
    status, _, err = _run(capsys, "attestation", "verify", str(doc), *pinned[:3], "ab" * 32)
    assert status == 2 and "fingerprint" in err


def test_a_missing_file_and_garbage(capsys, tmp_path):
    assert _run(capsys, "attestation", "verify", str(tmp_path / "absent"))[0] == 2
    garbage = tmp_path / "garbage"
    garbage.write_bytes(b"\x84\x01")
    status, _, err = _run(capsys, "attestation", "verify", str(garbage))
    assert status == 1 and err.startswith("nitroconv: malformed_document: ")
