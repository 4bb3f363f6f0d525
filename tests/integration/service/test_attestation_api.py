"""`POST /v1/builds/{id}/attestation/verify` on the real service stack (Postgres, the API app, the store)."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from api.app import create_app
from api.schemas.attestation import AttestationVerifyResultSchema
from tests.fixtures.attestation import NONCE, Doc, emulator_document, make_pki

from .helpers import PCRS, body, drive_to_success, err, ok, submit

pytestmark = pytest.mark.integration
REAL = Path(__file__).parents[2] / "data" / "attestation" / "aws_2026-02-06_ap-southeast-2.b64"
BUILD_PCRS = {0: bytes.fromhex(PCRS["pcr0"]), 1: bytes.fromhex(PCRS["pcr1"]), 2: bytes.fromhex(PCRS["pcr2"])}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@pytest.fixture
def measured(client, tenant, service_settings) -> str:  # noqa: ANN001
    """A Build that a worker has recorded as converted, with its PCRs."""
    build_id = submit(client, tenant.headers("WRITER"), body(tenant.create_app()))
    drive_to_success(service_settings, build_id)
    return build_id


def _verify(client, tenant, build_id: str, payload: dict, role: str = "READER"):  # noqa: ANN001, ANN202
    return client.post(f"/v1/builds/{build_id}/attestation/verify", json=payload, headers=tenant.headers(role))


def test_an_emulator_document_of_the_builds_pcrs_verifies_in_emulator_mode_only(client, tenant, measured):
    document = emulator_document(BUILD_PCRS | {3: bytes(48)}, NONCE, timestamp=_now())
    out = ok(_verify(client, tenant, measured, {"document": _b64(document), "nonce": NONCE.hex(), "emulator": True}),
             AttestationVerifyResultSchema)
    assert out["verified"] is True and out["mode"] == "emulator" and out["build_id"] == measured
    assert out["checks"]["signature"] == out["checks"]["certificate_chain"] == "skipped_emulator"
    assert out["checks"]["nonce"] == out["checks"]["pcrs"] == "passed"
    assert [(p["index"], p["expected"], p["matched"]) for p in out["pcrs"]] == [
        (0, PCRS["pcr0"], True), (1, PCRS["pcr1"], True), (2, PCRS["pcr2"], True)]
    assert out["warnings"][0].startswith("EMULATOR MODE")

    # The same bytes without the emulator mode: refused as what they are.
    out = ok(_verify(client, tenant, measured, {"document": _b64(document)}), AttestationVerifyResultSchema)
    assert out["verified"] is False and out["error"]["code"] == "unsigned_document" and out["mode"] == "aws"


def test_pcrs_of_another_build_are_a_pcr_mismatch_naming_each(client, tenant, measured):
    document = emulator_document(BUILD_PCRS | {1: bytes.fromhex("0e" * 48)}, timestamp=_now())
    out = ok(_verify(client, tenant, measured, {"document": _b64(document), "emulator": True}),
             AttestationVerifyResultSchema)
    assert out["verified"] is False and out["error"]["code"] == "pcr_mismatch"
    assert [(p["index"], p["matched"]) for p in out["pcrs"]] == [(0, True), (1, False), (2, True)]
    assert out["pcrs"][1]["actual"] == "0e" * 48 and out["checks"]["nonce"] == "not_reached"


def test_the_service_trusts_only_the_pinned_aws_root(client, tenant, measured):
    pki = make_pki()
    document = Doc(pki, pcrs=BUILD_PCRS, timestamp=_now()).encode()  # signed well, by a root AWS never had
    out = ok(_verify(client, tenant, measured, {"document": _b64(document), "nonce": NONCE.hex()}),
             AttestationVerifyResultSchema)
    assert out["verified"] is False and out["error"]["code"] == "untrusted_chain"
    assert out["checks"] == {"cose": "passed", "payload": "passed", "certificate_chain": "failed",
                             "signature": "not_reached", "debug_mode": "not_reached", "pcrs": "not_reached",
                             "nonce": "not_reached", "freshness": "not_reached"}


def test_a_real_aws_document_chains_to_the_pinned_root_and_is_refused_as_expired(client, tenant, measured):
    out = ok(_verify(client, tenant, measured, {"document": REAL.read_text().strip(), "max_age_seconds": None}),
             AttestationVerifyResultSchema)
    # Its three-hour leaf expired in February 2026: the chain up to AWS's root held, its validity did not.
    assert out["error"]["code"] == "expired" and out["error"]["details"]["position"] == 0
    assert out["document"]["module_id"] == "i-0761a4cbcc7632aef-enc019c320cb32f6b7a"


def test_debug_mode_documents_are_refused_unless_allowed(client, tenant, measured):
    zeros = {0: bytes(48), 1: bytes(48), 2: bytes(48)}
    document = _b64(emulator_document(zeros, timestamp=_now()))
    out = ok(_verify(client, tenant, measured, {"document": document, "emulator": True}), AttestationVerifyResultSchema)
    assert out["error"]["code"] == "debug_enclave"
    out = ok(_verify(client, tenant, measured, {"document": document, "emulator": True, "allow_debug": True}),
             AttestationVerifyResultSchema)
    assert out["verified"] is True and out["debug_enclave"] is True and out["checks"]["pcrs"] == "skipped_debug"
    assert len(out["warnings"]) == 2


def test_malformed_documents_are_answered_not_refused(client, tenant, measured):
    document = emulator_document(BUILD_PCRS, timestamp=_now())
    for bad, code in ((document[:-7], "malformed_document"), (b"\x00" * 20000, "document_too_large")):
        out = ok(_verify(client, tenant, measured, {"document": _b64(bad), "emulator": True}),
                 AttestationVerifyResultSchema)
        assert out["verified"] is False and out["error"]["code"] == code and out["document"] is None


def test_a_stale_document_and_its_max_age(client, tenant, measured):
    document = _b64(emulator_document(BUILD_PCRS, timestamp=_now() - dt.timedelta(minutes=10)))
    out = ok(_verify(client, tenant, measured, {"document": document, "emulator": True}), AttestationVerifyResultSchema)
    assert out["error"]["code"] == "stale_document" and out["age_seconds"] >= 600
    out = ok(_verify(client, tenant, measured, {"document": document, "emulator": True, "max_age_seconds": 900}),
             AttestationVerifyResultSchema)
    assert out["verified"] is True


@pytest.mark.parametrize(("payload", "field"), [
    ({}, "document"), ({"document": "not base64!"}, "document"), ({"document": "QUJD", "nonce": "xyz"}, "nonce"),
    ({"document": "A" * 50000}, "document"), ({"document": "QUJD", "max_age_seconds": 0}, "max_age_seconds"),
    ({"document": "QUJD", "emulator": "maybe"}, "emulator"), ({"document": 5}, "document"),
    ({"document": "QUJD", "nonce": "ab" * 513}, "nonce"),
])
def test_a_malformed_request_is_a_422(client, tenant, measured, payload, field):
    error = err(_verify(client, tenant, measured, payload), 422, "validation_failed")
    assert field in error["details"]["fields"], error


def test_a_build_without_pcrs_is_a_conflict(client, tenant):
    build_id = submit(client, tenant.headers("WRITER"), body(tenant.create_app()))
    document = _b64(emulator_document(BUILD_PCRS, timestamp=_now()))
    err(_verify(client, tenant, build_id, {"document": document, "emulator": True}), 409, "build_not_measured")


def test_another_accounts_build_is_not_found_and_a_caller_must_sign_in(client, tenant, make_tenant, measured):
    document = _b64(emulator_document(BUILD_PCRS, timestamp=_now()))
    err(_verify(client, make_tenant(), measured, {"document": document, "emulator": True}), 404, "not_found")
    err(client.post(f"/v1/builds/{measured}/attestation/verify", json={"document": document}), 401)


def test_the_route_is_in_the_openapi_document(client):
    spec = client.get("/v1/openapi.json").json
    operation = spec["paths"]["/v1/builds/{build_id}/attestation/verify"]["post"]
    assert set(operation["responses"]) >= {"200", "409", "422"}
    request = operation["requestBody"]["content"]["application/json"]["schema"]
    assert request["$ref"].endswith("AttestationVerifyRequest")
    props = spec["components"]["schemas"]["AttestationVerifyRequest"]["properties"]
    assert props["document"]["format"] == "byte" and "emulator" in props and "nonce" in props


def test_a_deployment_root_replaces_the_aws_root(client, tenant, measured, settings_with, tmp_path):
    pki = make_pki(at=_now())
    pem = tmp_path / "partition-root.pem"
    pem.write_bytes(pki.root.cert.public_bytes(Encoding.PEM))
    app = create_app(settings_with(attestation_root=pem,
                                   attestation_root_sha256=hashlib.sha256(pki.root.der).hexdigest())).test_client()
    document = Doc(pki, pcrs=BUILD_PCRS, timestamp=_now()).encode()
    out = ok(_verify(app, tenant, measured, {"document": _b64(document), "nonce": NONCE.hex()}),
             AttestationVerifyResultSchema)
    assert out["verified"] is True and out["mode"] == "aws" and out["error"] is None
    assert set(out["checks"].values()) == {"passed"} and out["warnings"] == []
    # The AWS root is then not trusted on this deployment.
    out = ok(_verify(app, tenant, measured, {"document": REAL.read_text().strip(), "max_age_seconds": None}),
             AttestationVerifyResultSchema)
    assert out["error"]["code"] == "untrusted_chain"


def test_a_deployment_root_that_misses_its_pin_is_a_deployment_fault(client, tenant, measured, settings_with,
                                                                      tmp_path):
    pem = tmp_path / "partition-root.pem"
    pem.write_bytes(make_pki().root.cert.public_bytes(Encoding.PEM))
    app = create_app(settings_with(attestation_root=pem, attestation_root_sha256="ab" * 32)).test_client()
    document = _b64(emulator_document(BUILD_PCRS, timestamp=_now()))
    err(_verify(app, tenant, measured, {"document": document, "emulator": True}), 500, "attestation_root_invalid")
