"""The attestation verifier on documents signed by a test PKI of our own, and on one real AWS document."""
from __future__ import annotations

import base64
import datetime as dt
import hashlib
from pathlib import Path

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from common.enclave import attestation
from common.enclave.attestation import Expectations, check, verify
from common.errors import (
    AttestationFailed,
    BadSignature,
    CertificateExpired,
    DebugEnclave,
    MalformedDocument,
    PcrMismatch,
)
from tests.fixtures.attestation import (
    DROP,
    NONCE,
    NOW,
    PCR0,
    PCR1,
    PCR2,
    PCRS,
    Doc,
    certificate,
    emulator_document,
    make_pki,
)
from tests.fixtures.signing import with_unknown_version

EXPECT = Expectations(pcrs={0: PCR0, 1: PCR1, 2: PCR2}, nonce=NONCE, max_age=dt.timedelta(minutes=5))
REAL = Path(__file__).parents[3] / "data" / "attestation" / "aws_2026-02-06_ap-southeast-2.b64"


@pytest.fixture(scope="module")
def pki():
    return make_pki()


def _code(document: bytes, root, expect: Expectations = EXPECT, now: dt.datetime = NOW) -> str | None:
    report = check(document, expect, now=now, root=root)
    return None if report.error is None else report.error.code


# --- documents that verify -----------------------------------------------------------------------------------
def test_a_valid_document_passes_every_step(pki):
    report = verify(Doc(pki).encode(), EXPECT, now=NOW, root=pki.root.cert)
    assert report.verified and not report.emulator and not report.debug
    assert set(report.checks.values()) == {"passed"}
    assert [(p.index, p.matched) for p in report.pcrs] == [(0, True), (1, True), (2, True)]
    out = report.as_dict()
    assert out["verified"] is True and out["error"] is None and out["mode"] == "aws"
    assert out["document"]["nonce"] == NONCE.hex() and out["document"]["pcrs"]["0"] == PCR0.hex()
    assert out["document"]["user_data"] == base64.b64encode(b"hello").decode() and out["warnings"] == []


@pytest.mark.parametrize("intermediates", [0, 1, 3])
def test_chains_of_any_depth_verify(intermediates):
    pki = make_pki(intermediates=intermediates)
    assert _code(Doc(pki).encode(), pki.root.cert) is None


def test_the_cose_tag_18_is_optional(pki):
    assert _code(Doc(pki, tagged=True).encode(), pki.root.cert) is None


def test_expectations_left_out_are_reported_as_not_requested(pki):
    report = check(Doc(pki).encode(), Expectations(max_age=None), now=NOW, root=pki.root.cert)
    assert report.verified
    assert report.checks["pcrs"] == report.checks["nonce"] == report.checks["freshness"] == "not_requested"


def test_a_real_aws_document_verifies_against_the_pinned_aws_root():
    document = base64.b64decode(REAL.read_text())
    pcr0 = bytes.fromhex("6165855369654a587bdad59fa532f430d7defa38ecf57eeac6d29c7e87a32b62"
                         "1891862d04fb64423f6bb1e1626fc026")
    issued = dt.datetime(2026, 2, 6, 8, 24, 18, 452000, tzinfo=dt.UTC)
    expect = Expectations(pcrs={0: pcr0}, max_age=dt.timedelta(minutes=5))
    report = verify(document, expect, now=issued + dt.timedelta(minutes=1))  # the default root: AWS's
    assert report.verified and report.document is not None
    assert report.document.module_id == "i-0761a4cbcc7632aef-enc019c320cb32f6b7a"
    assert report.document.public_key is None  # the NSM writes null for what was not asked for
    assert len(report.document.cabundle) == 4
    # Its leaf lives three hours; a day later the same bytes are refused.
    assert _code(document, None, Expectations(max_age=None), issued + dt.timedelta(days=1)) == "expired"
    # And it does not chain to any other root.
    assert _code(document, make_pki().root.cert, Expectations(max_age=None), issued) == "untrusted_chain"


def test_the_aws_root_is_pinned_by_its_fingerprint():
    der_sha = hashlib.sha256(attestation.aws_root().public_bytes(Encoding.DER)).hexdigest()
    assert der_sha == attestation.AWS_ROOT_SHA256 == \
        "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"
    with pytest.raises(ValueError, match="fingerprint"):
        attestation.pinned_root(attestation.AWS_ROOT_PEM.read_bytes(), "00" * 32)


# --- each failure its own code ---------------------------------------------------------------------------------
def test_another_root_is_untrusted(pki):
    assert _code(Doc(pki).encode(), make_pki().root.cert) == "untrusted_chain"


def test_an_intermediate_forged_under_the_right_name_is_untrusted(pki):
    forged = certificate("intermediate-0.test.nitro-enclaves", pki.intermediates[0].key,
                         make_pki(intermediates=0).root, ca=True, path_length=1)
    forged_pki = type(pki)(pki.root, [forged, *pki.intermediates[1:]], pki.leaf)
    assert _code(Doc(forged_pki).encode(), pki.root.cert) == "untrusted_chain"


def test_a_bundle_in_the_wrong_order_is_untrusted(pki):
    bundle = [pki.root.der, pki.intermediates[1].der, pki.intermediates[0].der]
    assert _code(Doc(pki, overrides={"cabundle": bundle}).encode(), pki.root.cert) == "untrusted_chain"


def test_a_flipped_signature_byte_is_a_bad_signature(pki):
    document = bytearray(Doc(pki).encode())
    document[-10] ^= 0x01  # the signature is the last item
    assert _code(bytes(document), pki.root.cert) == "bad_signature"


def test_a_payload_byte_changed_after_signing_is_a_bad_signature(pki):
    doc = Doc(pki)
    signed = doc.encode()
    tampered = signed.replace(b"hello", b"jello")
    assert tampered != signed and _code(tampered, pki.root.cert) == "bad_signature"


def test_a_document_signed_by_another_key_is_a_bad_signature(pki):
    assert _code(Doc(pki, sign_with=ec.generate_private_key(ec.SECP384R1())).encode(),
                 pki.root.cert) == "bad_signature"


def test_an_expired_leaf_is_expired():
    pki = make_pki(leaf_not_before=NOW - dt.timedelta(hours=4), leaf_not_after=NOW - dt.timedelta(hours=1))
    report = check(Doc(pki).encode(), EXPECT, now=NOW, root=pki.root.cert)
    assert report.error is not None and report.error.code == "expired"
    assert report.error.details["position"] == 0 and report.checks["certificate_chain"] == "failed"
    assert report.checks["signature"] == "not_reached"


def test_a_leaf_not_yet_valid_is_not_yet_valid():
    pki = make_pki(leaf_not_before=NOW + dt.timedelta(minutes=10))
    assert _code(Doc(pki).encode(), pki.root.cert) == "not_yet_valid"


def test_an_intermediate_not_yet_valid_is_not_yet_valid():
    pki = make_pki(intermediate_not_before=NOW + dt.timedelta(days=1))
    assert _code(Doc(pki).encode(), pki.root.cert) == "not_yet_valid"


def test_a_wrong_pcr_is_a_pcr_mismatch_naming_what_matched(pki):
    expect = Expectations(pcrs={0: PCR0, 1: bytes.fromhex("00" * 47 + "01"), 2: PCR2}, nonce=NONCE)
    report = check(Doc(pki).encode(), expect, now=NOW, root=pki.root.cert)
    assert report.error is not None and report.error.code == "pcr_mismatch"
    assert [(p["index"], p["matched"]) for p in report.as_dict()["pcrs"]] == [(0, True), (1, False), (2, True)]
    assert report.checks["signature"] == "passed" and report.checks["nonce"] == "not_reached"


def test_an_expected_pcr_the_document_lacks_is_a_pcr_mismatch(pki):
    report = check(Doc(pki).encode(), Expectations(pcrs={9: PCR0}), now=NOW, root=pki.root.cert)
    assert report.error is not None and report.error.code == "pcr_mismatch" and report.pcrs[0].actual is None


def test_a_wrong_nonce_is_a_nonce_mismatch(pki):
    expect = Expectations(pcrs={0: PCR0}, nonce=b"another nonce")
    assert _code(Doc(pki).encode(), pki.root.cert, expect) == "nonce_mismatch"


def test_a_missing_nonce_is_a_nonce_mismatch(pki):
    assert _code(Doc(pki, nonce=None).encode(), pki.root.cert) == "nonce_mismatch"


def test_zero_pcrs_are_a_debug_enclave(pki):
    zeros = {**PCRS, 0: bytes(48), 1: bytes(48), 2: bytes(48)}
    assert _code(Doc(pki, pcrs=zeros).encode(), pki.root.cert) == "debug_enclave"


def test_a_debug_enclave_allowed_explicitly_passes_loudly_without_comparing_pcrs(pki):
    zeros = {**PCRS, 0: bytes(48), 1: bytes(48), 2: bytes(48)}
    expect = Expectations(pcrs={0: PCR0}, nonce=NONCE, allow_debug=True)
    report = check(Doc(pki, pcrs=zeros).encode(), expect, now=NOW, root=pki.root.cert)
    assert report.verified and report.debug and report.checks["pcrs"] == "skipped_debug"
    assert attestation.DEBUG_WARNING in report.warnings


def test_one_zero_pcr_is_not_a_debug_enclave_but_a_mismatch(pki):
    assert _code(Doc(pki, pcrs={**PCRS, 0: bytes(48)}).encode(), pki.root.cert) == "pcr_mismatch"


def test_a_stale_document_is_stale(pki):
    old = Doc(pki, timestamp=NOW - dt.timedelta(minutes=6)).encode()
    assert _code(old, pki.root.cert) == "stale_document"
    assert _code(old, pki.root.cert, Expectations(max_age=dt.timedelta(minutes=10))) is None


def test_a_document_from_the_future_is_refused(pki):
    assert _code(Doc(pki, timestamp=NOW + dt.timedelta(minutes=5)).encode(), pki.root.cert) == "timestamp_in_future"
    assert _code(Doc(pki, timestamp=NOW + dt.timedelta(seconds=30)).encode(), pki.root.cert) is None  # skew


@pytest.mark.parametrize("cut", [1, 10, 200, 2000])
def test_truncated_cbor_is_malformed(pki, cut):
    document = Doc(pki).encode()
    assert _code(document[:-cut], pki.root.cert) == "malformed_document"


def test_trailing_bytes_are_malformed(pki):
    assert _code(Doc(pki).encode() + b"\x00", pki.root.cert) == "malformed_document"


def test_an_oversized_document_is_refused_before_decoding(pki):
    assert _code(Doc(pki).encode() + bytes(attestation.MAX_DOCUMENT_BYTES), pki.root.cert) == "document_too_large"


def test_an_oversized_payload_is_malformed(pki):
    doc = Doc(pki)
    payload = doc.payload()
    big = cbor2.dumps({**cbor2.loads(payload), "module_id": "m" * (attestation.MAX_PAYLOAD_BYTES - len(payload) + 20)})
    document = doc.encode(big)
    assert len(big) > attestation.MAX_PAYLOAD_BYTES and len(document) <= attestation.MAX_DOCUMENT_BYTES
    report = check(document, EXPECT, now=NOW, root=pki.root.cert)
    assert report.error is not None and report.error.code == "malformed_document"
    assert report.error.details["field"] == "payload"


@pytest.mark.parametrize(("name", "value"), [
    ("user_data", bytes(513)), ("nonce", bytes(513)), ("public_key", bytes(1025)), ("public_key", b""),
    ("certificate", bytes(1025)), ("cabundle", [b""]), ("cabundle", []), ("cabundle", b"not an array"),
    ("pcrs", {0: bytes(47)}), ("pcrs", {32: PCR0}), ("pcrs", {-1: PCR0}), ("pcrs", {"0": PCR0}), ("pcrs", {}),
    ("pcrs", {i: PCR0 for i in range(32)} | {0: "text"}), ("module_id", ""), ("module_id", b"bytes"),
    ("timestamp", 0), ("timestamp", -5), ("timestamp", "2026"), ("timestamp", 1.5), ("digest", 384),
    ("nonce", "text"),
])
def test_fields_out_of_their_types_or_sizes_are_malformed(pki, name, value):
    report = check(Doc(pki, overrides={name: value}).encode(), EXPECT, now=NOW, root=pki.root.cert)
    assert report.error is not None and report.error.code == "malformed_document", report.error
    assert report.error.details["field"] == name


@pytest.mark.parametrize("name", ["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle"])
@pytest.mark.parametrize("how", [DROP, None])
def test_a_missing_or_null_mandatory_field_is_malformed(pki, name, how):
    report = check(Doc(pki, overrides={name: how}).encode(), EXPECT, now=NOW, root=pki.root.cert)
    assert report.error is not None and report.error.code == "malformed_document"
    assert report.error.details["field"] == name


def test_an_unknown_field_is_malformed(pki):
    assert _code(Doc(pki, overrides={"extra": b"x"}).encode(), pki.root.cert) == "malformed_document"


def test_a_wrong_digest_name_is_an_unsupported_digest(pki):
    assert _code(Doc(pki, overrides={"digest": "SHA256"}).encode(), pki.root.cert) == "unsupported_digest"


@pytest.mark.parametrize("alg", [-7, -36, -1, "ES384", None])
def test_a_wrong_algorithm_is_unsupported(pki, alg):
    assert _code(Doc(pki, alg=alg).encode(), pki.root.cert) == "unsupported_algorithm"


def test_an_algorithm_in_the_unprotected_header_is_unsupported(pki):
    doc = Doc(pki)
    protected, _, payload, signature = cbor2.loads(doc.encode())
    assert _code(cbor2.dumps([protected, {1: -35}, payload, signature]), pki.root.cert) == "unsupported_algorithm"


@pytest.mark.parametrize("document", [
    cbor2.dumps({"not": "cose"}), cbor2.dumps([b"", {}, b"x"]), cbor2.dumps(cbor2.CBORTag(98, [b"", {}, b"", b""])),
    cbor2.dumps([b"", {}, b"", bytes(96)]), cbor2.dumps(["text", {}, b"x", bytes(96)]),
    cbor2.dumps([cbor2.dumps([1]), {}, b"x", bytes(96)]), b"", b"\xff", b"\x81" * 5000 + b"\x00",
])
def test_what_is_not_a_cose_sign1_is_malformed(document):
    assert _code(document, make_pki(intermediates=0).root.cert) == "malformed_document"


def test_a_payload_that_is_not_a_map_is_malformed(pki):
    assert _code(Doc(pki).encode(cbor2.dumps([1, 2])), pki.root.cert) == "malformed_document"


def test_a_certificate_that_is_not_der_is_invalid(pki):
    assert _code(Doc(pki, overrides={"certificate": b"\x30\x03junk"}).encode(), pki.root.cert) == "invalid_certificate"


def test_a_certificate_of_an_unknown_version_is_invalid(pki):
    bundle = [pki.root.der, pki.intermediates[0].der, with_unknown_version(pki.intermediates[1].der)]
    assert _code(Doc(pki, overrides={"cabundle": bundle}).encode(), pki.root.cert) == "invalid_certificate"
    leaf = with_unknown_version(pki.leaf.der)
    assert _code(Doc(pki, overrides={"certificate": leaf}).encode(), pki.root.cert) == "invalid_certificate"


def _leaf_variant(**options) -> str | None:
    pki = make_pki(**options)
    return _code(Doc(pki).encode(), pki.root.cert)


_NO_USAGE = dict(digital_signature=False, content_commitment=True, key_encipherment=False, data_encipherment=False,
                 key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)


def test_a_leaf_without_digital_signature_is_an_invalid_certificate():
    assert _leaf_variant(key_usage=x509.KeyUsage(**_NO_USAGE)) == "invalid_certificate"


def test_a_ca_as_leaf_is_an_invalid_certificate():
    pki = make_pki()
    leaf = certificate("leaf-ca", pki.leaf.key, pki.intermediates[-1], ca=True,
                       key_usage=x509.KeyUsage(**{**_NO_USAGE, "digital_signature": True, "key_cert_sign": True}))
    assert _code(Doc(type(pki)(pki.root, pki.intermediates, leaf)).encode(), pki.root.cert) == "invalid_certificate"


def test_a_p256_leaf_is_an_invalid_certificate():
    pki = make_pki()
    p256 = ec.generate_private_key(ec.SECP256R1())
    leaf = certificate("p256", p256, pki.intermediates[-1], ca=False)
    assert _code(Doc(type(pki)(pki.root, pki.intermediates, leaf)).encode(), pki.root.cert) == "invalid_certificate"


def test_an_intermediate_without_cert_sign_is_an_invalid_certificate():
    pki = make_pki(intermediates=0)
    usage = x509.KeyUsage(**{**_NO_USAGE, "digital_signature": True})
    middle = certificate("no-cert-sign", ec.generate_private_key(ec.SECP384R1()), pki.root, ca=True, key_usage=usage)
    leaf = certificate("leaf", pki.leaf.key, middle, ca=False)
    assert _code(Doc(type(pki)(pki.root, [middle], leaf)).encode(), pki.root.cert) == "invalid_certificate"


def test_a_path_length_constraint_is_enforced():
    pki = make_pki(intermediates=0)
    first = certificate("first", ec.generate_private_key(ec.SECP384R1()), pki.root, ca=True, path_length=0)
    second = certificate("second", ec.generate_private_key(ec.SECP384R1()), first, ca=True, path_length=0)
    leaf = certificate("leaf", pki.leaf.key, second, ca=False)
    report = check(Doc(type(pki)(pki.root, [first, second], leaf)).encode(), EXPECT, now=NOW, root=pki.root.cert)
    assert report.error is not None and report.error.code == "invalid_certificate"
    assert "path length" in report.error.message


def test_an_intermediate_without_basic_constraints_is_an_invalid_certificate():
    pki = make_pki(intermediates=0)
    middle = certificate("no-bc", ec.generate_private_key(ec.SECP384R1()), pki.root, ca=True,
                         basic_constraints=False)
    leaf = certificate("leaf", pki.leaf.key, middle, ca=False)
    assert _code(Doc(type(pki)(pki.root, [middle], leaf)).encode(), pki.root.cert) == "invalid_certificate"


# --- the emulator mode ------------------------------------------------------------------------------------------
def test_an_emulator_document_is_refused_as_unsigned(pki):
    assert _code(emulator_document(PCRS, NONCE), pki.root.cert) == "unsigned_document"


def test_the_emulator_mode_skips_only_the_signature_and_the_chain_and_says_so(pki):
    expect = Expectations(pcrs={0: PCR0, 1: PCR1, 2: PCR2}, nonce=NONCE, emulator=True)
    report = verify(emulator_document(PCRS, NONCE), expect, now=NOW, root=pki.root.cert)
    assert report.verified and report.emulator
    assert report.checks["certificate_chain"] == report.checks["signature"] == "skipped_emulator"
    assert report.checks["pcrs"] == report.checks["nonce"] == report.checks["freshness"] == "passed"
    assert report.warnings[0].startswith("EMULATOR MODE") and report.as_dict()["mode"] == "emulator"


@pytest.mark.parametrize(("document", "expect", "code"), [
    (emulator_document({**PCRS, 1: bytes(48)}, NONCE),
     Expectations(pcrs={1: PCR1}, nonce=NONCE, emulator=True), "pcr_mismatch"),
    (emulator_document(PCRS, b"other"), Expectations(nonce=NONCE, emulator=True), "nonce_mismatch"),
    (emulator_document(PCRS, NONCE, NOW - dt.timedelta(hours=1)), Expectations(emulator=True), "stale_document"),
    (emulator_document(PCRS, NONCE)[:-3], Expectations(emulator=True), "malformed_document"),
    (emulator_document({0: bytes(48), 1: bytes(48), 2: bytes(48)}), Expectations(emulator=True), "debug_enclave"),
])
def test_the_emulator_mode_still_checks_everything_else(pki, document, expect, code):
    assert _code(document, pki.root.cert, expect) == code


# --- the raising form --------------------------------------------------------------------------------------------
def test_verify_raises_the_failed_checks_own_class_with_the_checks(pki):
    with pytest.raises(BadSignature) as caught:
        verify(Doc(pki, sign_with=ec.generate_private_key(ec.SECP384R1())).encode(), EXPECT, now=NOW,
               root=pki.root.cert)
    assert caught.value.details["step"] == "signature"
    assert caught.value.details["checks"]["certificate_chain"] == "passed"
    for cls in (BadSignature, CertificateExpired, DebugEnclave, MalformedDocument, PcrMismatch):
        assert issubclass(cls, AttestationFailed)


def test_now_must_be_timezone_aware(pki):
    with pytest.raises(ValueError, match="timezone"):
        check(Doc(pki).encode(), EXPECT, now=NOW.replace(tzinfo=None), root=pki.root.cert)


# --- hostile bytes -------------------------------------------------------------------------------------------------
def _mutations(data: bytes, seed: int, count: int):
    import random

    rng = random.Random(seed)
    for _ in range(count):
        out = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            kind, at = rng.random(), rng.randrange(len(out))
            if kind < 0.5:
                out[at] = rng.randrange(256)
            elif kind < 0.75:
                del out[at:at + rng.randint(1, 16)]
            else:
                out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        yield bytes(out)


def test_mutated_documents_always_end_in_a_report(pki):
    """Random damage anywhere, or in a payload that is then signed properly: every outcome is a report with a
    code of its own, never another exception, and never `verified` for bytes the signer did not produce."""
    doc = Doc(pki)
    original, payload = doc.encode(), doc.payload()
    codes: set[str] = set()
    for mutated in _mutations(original, seed=18, count=600):
        report = check(mutated, EXPECT, now=NOW, root=pki.root.cert)
        assert not report.verified or mutated == original
        codes.add("verified" if report.error is None else report.error.code)
    for mutated in _mutations(payload, seed=19, count=600):
        report = check(doc.encode(mutated), EXPECT, now=NOW, root=pki.root.cert)
        codes.add("verified" if report.error is None else report.error.code)
    assert {"malformed_document", "bad_signature"} <= codes, codes
