"""`nitroconv attestation verify --build ID` as users run it: a child process, signed in, against the API over real
HTTP (Postgres behind it); the PCRs come from the Build the service recorded."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from werkzeug.serving import make_server

from api.app import create_app
from tests.fixtures.attestation import NONCE, Doc, emulator_document, make_pki
from tests.fixtures.registries import free_port
from tests.fixtures.repo import REPO
from tests.fixtures.service import PASSWORD

from .helpers import PCRS, body, drive_to_success, submit

pytestmark = pytest.mark.integration
BUILD_PCRS = {0: bytes.fromhex(PCRS["pcr0"]), 1: bytes.fromhex(PCRS["pcr1"]), 2: bytes.fromhex(PCRS["pcr2"])}


@pytest.fixture(scope="module")
def http_api(service_settings) -> Iterator[str]:  # noqa: ANN001
    server = make_server("127.0.0.1", free_port(), create_app(service_settings), threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)


def _cli(home: Path, *args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NITROCONV_CLIENT_CONFIG": str(home / "session.json"), "NITROCONV_TEST_PASSWORD": PASSWORD}
    env.pop("NITROCONV_TOKEN", None)
    env.pop("NITROCONV_URL", None)
    done = subprocess.run([sys.executable, "-m", "worker.cli", *args], cwd=REPO, env=env, capture_output=True,
                          input=stdin, timeout=120)  # bytes in: a raw CBOR document on stdin
    return subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(), done.stderr.decode())


@pytest.fixture
def signed_in(http_api, tenant, tmp_path) -> Path:  # noqa: ANN001
    """A session file of the tenant's READER, written by `nitroconv login`."""
    done = _cli(tmp_path, "login", "--url", http_api, "--email", tenant.emails["READER"],
                "--password-env", "NITROCONV_TEST_PASSWORD")
    assert done.returncode == 0, done.stderr
    return tmp_path


@pytest.fixture
def measured(client, tenant, service_settings) -> str:  # noqa: ANN001
    build_id = submit(client, tenant.headers("WRITER"), body(tenant.create_app()))
    drive_to_success(service_settings, build_id)
    return build_id


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def test_the_builds_pcrs_from_the_service_against_an_emulator_document(signed_in, measured, tmp_path):
    doc = tmp_path / "qemu.b64"
    doc.write_bytes(base64.b64encode(emulator_document(BUILD_PCRS, NONCE, timestamp=_now())))
    done = _cli(signed_in, "attestation", "verify", str(doc), "--build", measured, "--emulator", "--nonce", NONCE.hex(),
                "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["verified"] is True and report["mode"] == "emulator"
    assert [(p["index"], p["expected"]) for p in report["pcrs"]] == [
        (0, PCRS["pcr0"]), (1, PCRS["pcr1"]), (2, PCRS["pcr2"])]

    # Without the emulator mode the same bytes are refused as unsigned.
    done = _cli(signed_in, "attestation", "verify", str(doc), "--build", measured)
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: unsigned_document: ")


def test_a_signed_document_of_another_build_is_a_pcr_mismatch(signed_in, measured, tmp_path):
    pki = make_pki(at=_now())
    pem = tmp_path / "root.pem"
    pem.write_bytes(pki.root.cert.public_bytes(Encoding.PEM))
    pin = ["--root", str(pem), "--root-sha256", hashlib.sha256(pki.root.der).hexdigest()]
    good = Doc(pki, pcrs=BUILD_PCRS, timestamp=_now()).encode()
    done = _cli(signed_in, "attestation", "verify", "-", "--build", measured, *pin, stdin=good)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("verified:  yes\nmode:      aws") and f"PCR2: ok       expected {PCRS['pcr2']}" \
        in done.stdout

    other = Doc(pki, pcrs={**BUILD_PCRS, 2: bytes.fromhex("0c" * 48)}, timestamp=_now()).encode()
    done = _cli(signed_in, "attestation", "verify", "-", "--build", measured, *pin, stdin=other)
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: pcr_mismatch: PCR2 not as expected")
    assert f"got {'0c' * 48}" in done.stdout


def test_a_build_the_service_does_not_have_or_has_not_measured(signed_in, client, tenant, tmp_path):
    doc = tmp_path / "qemu.cbor"
    doc.write_bytes(emulator_document(BUILD_PCRS, timestamp=_now()))
    done = _cli(signed_in, "attestation", "verify", str(doc), "--build", str(uuid.uuid4()), "--emulator")
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: not_found: ")
    queued = submit(client, tenant.headers("WRITER"), body(tenant.create_app()))
    done = _cli(signed_in, "attestation", "verify", str(doc), "--build", queued, "--emulator")
    assert done.returncode == 1 and done.stderr.startswith("nitroconv: build_not_measured: ")


def test_an_unreachable_service_exits_3(tmp_path):
    doc = tmp_path / "qemu.cbor"
    doc.write_bytes(emulator_document(BUILD_PCRS, timestamp=_now()))
    done = _cli(tmp_path, "attestation", "verify", str(doc), "--build", str(uuid.uuid4()), "--emulator",
                "--url", f"http://127.0.0.1:{free_port()}")
    assert done.returncode == 3 and done.stderr.startswith("nitroconv: unreachable: ")
