"""Verify an AWS Nitro Enclaves attestation document, step by step as aws-nitro-enclaves-nsm-api's
`docs/attestation_process.md` describes it: COSE_Sign1 (ES384) over a CBOR payload of the documented shape, the
certificate chain from a pinned root through the `cabundle` to the document's certificate, the signature with
that certificate's P-384 key, then the caller's expectations: PCRs, nonce and freshness.

Pure: bytes, expectations, a root and `now` in; a `Report` out (`check`) or a `Verification` / an
`AttestationFailed` subclass (`verify`). No clock, file or network is read here except the pinned root's PEM
beside this module.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import io
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeGuard

import cbor2
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.exceptions import UnsupportedAlgorithm as CryptoUnsupported
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID

from common.enclave.cose import COSE_SIGN1_TAG, HEADER_ALG, sig_structure
from common.errors import (
    AttestationFailed,
    BadSignature,
    CertificateExpired,
    CertificateNotYetValid,
    DebugEnclave,
    DocumentTooLarge,
    InvalidCertificate,
    MalformedDocument,
    NonceMismatch,
    PcrMismatch,
    StaleDocument,
    TimestampInFuture,
    UnsignedDocument,
    UnsupportedAlgorithm,
    UnsupportedDigest,
    UntrustedChain,
)

# The AWS Nitro Enclaves Root G1 (commercial partitions), kept beside this module; its header says where it came from.
# The pin is the SHA-256 of the certificate's DER: the PEM file is trusted only while it hashes to this.
AWS_ROOT_PEM = Path(__file__).with_name("aws_nitro_enclaves_root_g1.pem")
AWS_ROOT_SHA256 = "641a0321a3e244efe456463195d606317ed7cdcc3c1756e09893f3c68f79bb5b"

ES384 = -35
DIGEST = "SHA384"
# attestation_process.md §3.1: the payload is a bstr of 1..16384 bytes. The whole COSE_Sign1 adds a few bytes
# of headers and a 96-byte signature; anything much larger is refused before it is decoded.
MAX_PAYLOAD_BYTES = 16384
MAX_DOCUMENT_BYTES = MAX_PAYLOAD_BYTES + 1024
ES384_SIGNATURE_BYTES = 96  # r ‖ s, 48 bytes each (RFC 9053 §2.1)
PCR_SIZES = frozenset({32, 48, 64})
PCR_COUNT = 32
MAX_CERT_BYTES = 1024
MAX_PUBLIC_KEY_BYTES = 1024
MAX_USER_DATA_BYTES = 512
MAX_NONCE_BYTES = 512
# The measured PCRs of an EIF: a debug-mode enclave reports all three as zeros.
MEASURED_PCRS = (0, 1, 2)
DEFAULT_MAX_AGE = timedelta(minutes=5)
# A document a little ahead of our clock is clock skew; far ahead, it cannot have been issued yet.
MAX_CLOCK_SKEW = timedelta(seconds=60)

_MANDATORY = ("module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle")
_OPTIONAL = ("public_key", "user_data", "nonce")

# The steps of a verification, in order; each ends passed, failed, or one of the skipped states.
STEPS = ("cose", "payload", "certificate_chain", "signature", "debug_mode", "pcrs", "nonce", "freshness")
PASSED, FAILED, NOT_REACHED = "passed", "failed", "not_reached"
SKIPPED_EMULATOR = "skipped_emulator"  # the emulator mode skips exactly the chain and the signature
NOT_REQUESTED = "not_requested"  # no expectation was given for this step
SKIPPED_DEBUG = "skipped_debug"  # PCRs of an allowed debug enclave are zeros: nothing to compare
EMULATOR_WARNING = ("EMULATOR MODE: the signature and the certificate chain were NOT checked; this document "
                    "proves nothing about a real Nitro Enclave")
DEBUG_WARNING = "DEBUG ENCLAVE allowed: its PCRs are zeros, so the image it runs is NOT attested"


def pinned_root(pem: bytes, sha256_hex: str) -> x509.Certificate:
    """The certificate in `pem`, only if its DER hashes to `sha256_hex`: a root is trusted by its pin, not its file."""
    cert = x509.load_pem_x509_certificate(pem)
    der = cert.public_bytes(Encoding.DER)
    if not hmac.compare_digest(hashlib.sha256(der).hexdigest(), sha256_hex.lower()):
        raise ValueError(f"root certificate fingerprint {hashlib.sha256(der).hexdigest()} is not the pin {sha256_hex}")
    return cert


@functools.cache
def aws_root() -> x509.Certificate:
    """AWS Nitro Enclaves Root G1, checked against its pinned fingerprint."""
    return pinned_root(AWS_ROOT_PEM.read_bytes(), AWS_ROOT_SHA256)


def build_pcrs(recorded: Mapping[int, str | None]) -> dict[int, bytes]:
    """A Build's recorded PCRs (hex strings, None where it has none, e.g. PCR8 of an unsigned EIF) as the
    expected values."""
    return {index: bytes.fromhex(value) for index, value in recorded.items() if value}


@dataclass(frozen=True)
class Expectations:
    """What the caller expects of the enclave. An empty `pcrs` and a None `nonce` are not checked (and say so)."""

    pcrs: Mapping[int, bytes] = field(default_factory=dict)
    nonce: bytes | None = None
    max_age: timedelta | None = DEFAULT_MAX_AGE
    allow_debug: bool = False
    # Accept an emulated NSM's (QEMU's) documents: skips ONLY the signature and the certificate chain.
    emulator: bool = False


@dataclass(frozen=True)
class AttestationDocument:
    """The payload's fields, as the document claims them (trusted only once `Report.verified`)."""

    module_id: str
    timestamp: datetime
    digest: str
    pcrs: Mapping[int, bytes]
    certificate: bytes
    cabundle: tuple[bytes, ...]
    public_key: bytes | None
    user_data: bytes | None
    nonce: bytes | None


@dataclass(frozen=True)
class PcrCheck:
    index: int
    expected: bytes
    actual: bytes | None

    @property
    def matched(self) -> bool:
        return self.actual is not None and hmac.compare_digest(self.expected, self.actual)

    def as_dict(self) -> dict[str, object]:
        return {"index": self.index, "expected": self.expected.hex(),
                "actual": None if self.actual is None else self.actual.hex(), "matched": self.matched}


@dataclass(frozen=True)
class Report:
    """What was checked and how it ended; `error` is the first failure (None when verified)."""

    checks: Mapping[str, str]
    error: AttestationFailed | None
    emulator: bool
    debug: bool
    document: AttestationDocument | None
    pcrs: tuple[PcrCheck, ...]
    age: timedelta | None
    warnings: tuple[str, ...]

    @property
    def verified(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, object]:
        """The JSON the API answers and `nitroconv attestation verify --json` prints."""
        doc = self.document
        return {
            "verified": self.verified,
            "mode": "emulator" if self.emulator else "aws",
            "error": None if self.error is None else {"code": self.error.code, "message": self.error.message,
                                                      "details": {k: v for k, v in self.error.details.items() if k != "checks"}},
            "checks": dict(self.checks),
            "pcrs": [p.as_dict() for p in self.pcrs],
            "debug_enclave": self.debug,
            "age_seconds": None if self.age is None else round(self.age.total_seconds(), 3),
            "warnings": list(self.warnings),
            "document": None if doc is None else {
                "module_id": doc.module_id,
                "timestamp": doc.timestamp.isoformat().replace("+00:00", "Z"),
                "digest": doc.digest,
                "pcrs": {str(i): v.hex() for i, v in sorted(doc.pcrs.items())},
                "public_key": _b64(doc.public_key),
                "user_data": _b64(doc.user_data),
                "nonce": None if doc.nonce is None else doc.nonce.hex(),
                "certificates": 1 + len(doc.cabundle),
            },
        }


Verification = Report  # what `verify` returns: a Report whose `verified` is True


def _b64(value: bytes | None) -> str | None:
    return None if value is None else base64.b64encode(value).decode("ascii")


def verify(document: bytes, expect: Expectations, *, now: datetime,
           root: x509.Certificate | None = None) -> Verification:
    """The verified report, or the first failed check's `AttestationFailed` (its details carry the checks)."""
    report = check(document, expect, now=now, root=root)
    if report.error is not None:
        raise report.error
    return report


def check(document: bytes, expect: Expectations, *, now: datetime,
          root: x509.Certificate | None = None) -> Report:
    """Run every step in order until one fails; never raises an `AttestationFailed`, reports it."""
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    return _Run(document, expect, now.astimezone(UTC), root if root is not None else aws_root()).report()


# --- the steps ---------------------------------------------------------------------------------------------------
@dataclass
class _Sign1:
    protected: bytes
    payload: bytes
    signature: bytes
    alg: object


class _Run:
    def __init__(self, raw: bytes, expect: Expectations, now: datetime, root: x509.Certificate):
        self.raw, self.expect, self.now, self.root = raw, expect, now, root
        self.checks: dict[str, str] = dict.fromkeys(STEPS, NOT_REACHED)
        self.document: AttestationDocument | None = None
        self.pcrs: tuple[PcrCheck, ...] = ()
        self.debug = False
        self.age: timedelta | None = None
        self.warnings: list[str] = [EMULATOR_WARNING] if expect.emulator else []

    def report(self) -> Report:
        error: AttestationFailed | None = None
        step = STEPS[0]
        try:
            steps: list[tuple[str, Callable[[], str]]] = [
                ("cose", self._cose), ("payload", self._payload), ("certificate_chain", self._chain),
                ("signature", self._signature), ("debug_mode", self._debug), ("pcrs", self._pcrs),
                ("nonce", self._nonce), ("freshness", self._freshness)]
            for step, run in steps:
                self.checks[step] = run()
        except AttestationFailed as exc:
            self.checks[step] = FAILED
            exc.details.setdefault("step", step)
            exc.details["checks"] = dict(self.checks)
            error = exc
        return Report(self.checks, error, self.expect.emulator, self.debug, self.document, self.pcrs, self.age,
                      tuple(self.warnings))

    # 1. COSE_Sign1 -----------------------------------------------------------------------------------------------
    def _cose(self) -> str:
        if len(self.raw) > MAX_DOCUMENT_BYTES:
            raise DocumentTooLarge(f"document of {len(self.raw)} bytes, the limit is {MAX_DOCUMENT_BYTES}",
                                   details={"size": len(self.raw), "limit": MAX_DOCUMENT_BYTES})
        item = _decode(self.raw, "COSE_Sign1")
        if isinstance(item, cbor2.CBORTag):
            if item.tag != COSE_SIGN1_TAG:
                raise MalformedDocument(f"CBOR tag {item.tag} is not COSE_Sign1 ({COSE_SIGN1_TAG})")
            item = item.value
        if not _is_array(item) or len(item) != 4:
            raise MalformedDocument("COSE_Sign1 must be an array of 4 items")
        protected, unprotected, payload, signature = item
        if not (isinstance(protected, bytes) and isinstance(unprotected, Mapping)
                and isinstance(payload, bytes) and isinstance(signature, bytes)):
            raise MalformedDocument("COSE_Sign1 items must be bstr, map, bstr, bstr")
        header = _decode(protected, "protected header") if protected else {}
        if not isinstance(header, Mapping):
            raise MalformedDocument("the COSE protected header is not a map")
        if not payload or len(payload) > MAX_PAYLOAD_BYTES:
            raise MalformedDocument(f"payload of {len(payload)} bytes, outside 1..{MAX_PAYLOAD_BYTES}",
                                    details={"field": "payload"})
        self.sign1 = _Sign1(protected, payload, signature, header.get(HEADER_ALG))
        if self.expect.emulator:
            return PASSED
        if not any(signature):
            raise UnsignedDocument("the signature is all zeros: an emulated NSM's unsigned document "
                                   "(only the emulator mode accepts it)")
        if self.sign1.alg != ES384 or HEADER_ALG in unprotected:
            raise UnsupportedAlgorithm(f"COSE algorithm {self.sign1.alg!r} is not ES384 ({ES384})",
                                       details={"alg": repr(self.sign1.alg)})
        return PASSED

    # 2. the payload's fields, types and sizes (attestation_process.md §3.2.2) ------------------------------------
    def _payload(self) -> str:
        payload = self.sign1.payload
        fields = _decode(payload, "payload")
        if not isinstance(fields, Mapping):
            raise MalformedDocument("the payload is not a map")
        unknown = [k for k in fields if k not in _MANDATORY and k not in _OPTIONAL]
        if unknown:
            raise MalformedDocument(f"unknown payload field {unknown[0]!r}", details={"field": str(unknown[0])})
        for name in _MANDATORY:
            if fields.get(name) is None:
                raise MalformedDocument(f"mandatory field {name!r} is missing or null", details={"field": name})
        module_id = fields["module_id"]
        if not isinstance(module_id, str) or not module_id:
            raise _bad("module_id", "a non-empty text string")
        digest = fields["digest"]
        if not isinstance(digest, str):
            raise _bad("digest", "a text string")
        if digest != DIGEST:
            raise UnsupportedDigest(f"digest {digest!r} is not {DIGEST!r}", details={"digest": digest[:64]})
        timestamp = fields["timestamp"]
        if type(timestamp) is not int or not 0 < timestamp < 1 << 64:
            raise _bad("timestamp", "an integer > 0 (milliseconds since the epoch)")
        try:
            when = datetime.fromtimestamp(timestamp / 1000, UTC)
        except (OverflowError, ValueError, OSError):
            raise _bad("timestamp", "a time this side of year 9999") from None
        pcrs = fields["pcrs"]
        if not isinstance(pcrs, Mapping) or not 1 <= len(pcrs) <= PCR_COUNT:
            raise _bad("pcrs", f"a map of 1..{PCR_COUNT} PCRs")
        for index, value in pcrs.items():
            if type(index) is not int or not 0 <= index < PCR_COUNT:
                raise _bad("pcrs", f"indices in [0, {PCR_COUNT})")
            if not isinstance(value, bytes) or len(value) not in PCR_SIZES:
                raise _bad("pcrs", "values of 32, 48 or 64 bytes", index=index)
        certificate = _bstr(fields, "certificate", 1, MAX_CERT_BYTES)
        cabundle = fields["cabundle"]
        if not _is_array(cabundle) or not cabundle:
            raise _bad("cabundle", "a non-empty array")
        bundle: list[bytes] = []
        for entry in cabundle:
            if not isinstance(entry, bytes) or not 1 <= len(entry) <= MAX_CERT_BYTES:
                raise _bad("cabundle", f"entries of 1..{MAX_CERT_BYTES} bytes")
            bundle.append(entry)
        # A null optional field is an absent one: the NSM writes `public_key: null` when none was asked for.
        self.document = AttestationDocument(
            module_id=module_id, timestamp=when, digest=digest, pcrs=dict(pcrs), certificate=certificate,
            cabundle=tuple(bundle),
            public_key=_optional_bstr(fields, "public_key", 1, MAX_PUBLIC_KEY_BYTES),
            user_data=_optional_bstr(fields, "user_data", 0, MAX_USER_DATA_BYTES),
            nonce=_optional_bstr(fields, "nonce", 0, MAX_NONCE_BYTES))
        return PASSED

    # 3. the chain: pinned root = cabundle[0] → cabundle[1..] → certificate (§3.2.3, §3.2.4) -----------------------
    def _chain(self) -> str:
        if self.expect.emulator:
            return SKIPPED_EMULATOR
        doc = self._doc()
        root_der = self.root.public_bytes(Encoding.DER)
        if not hmac.compare_digest(doc.cabundle[0], root_der):
            raise UntrustedChain("the CA bundle does not start with the pinned root certificate",
                                 details={"cabundle_root_sha256": hashlib.sha256(doc.cabundle[0]).hexdigest(),
                                          "pinned_sha256": hashlib.sha256(root_der).hexdigest()})
        # Leaf first, then each issuer: [certificate, cabundle[N-1], …, cabundle[1], root].
        chain = [_certificate(doc.certificate, "certificate")]
        chain += [_certificate(der, f"cabundle[{i}]") for i, der in reversed(list(enumerate(doc.cabundle)))
                  if i > 0]
        chain.append(self.root)
        for position, (child, issuer) in enumerate(zip(chain, chain[1:], strict=False)):
            try:
                child.verify_directly_issued_by(issuer)
            except (ValueError, TypeError, InvalidSignature, CryptoUnsupported) as exc:
                raise UntrustedChain(f"{_where(position, len(chain))} is not issued by the next certificate up "
                                     f"({type(exc).__name__})", details={"position": position}) from None
        for position, cert in enumerate(chain):
            _check_profile(cert, position, len(chain))
        for position, cert in enumerate(chain):
            if self.now < cert.not_valid_before_utc:
                raise CertificateNotYetValid(f"{_where(position, len(chain))} is valid only from "
                                             f"{cert.not_valid_before_utc.isoformat()}",
                                             details={"position": position})
            if self.now > cert.not_valid_after_utc:
                raise CertificateExpired(f"{_where(position, len(chain))} expired at "
                                         f"{cert.not_valid_after_utc.isoformat()}", details={"position": position})
        self.leaf = chain[0]
        return PASSED

    # 4. the COSE signature with the leaf's P-384 key -------------------------------------------------------------
    def _signature(self) -> str:
        if self.expect.emulator:
            return SKIPPED_EMULATOR
        key = self.leaf.public_key()
        signature = self.sign1.signature
        if len(signature) != ES384_SIGNATURE_BYTES:
            raise BadSignature(f"an ES384 signature is {ES384_SIGNATURE_BYTES} bytes, not {len(signature)}")
        assert isinstance(key, ec.EllipticCurvePublicKey)  # _check_profile: the leaf's key is P-384
        r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
        try:
            key.verify(encode_dss_signature(r, s), sig_structure(self.sign1.protected, self.sign1.payload),
                       ec.ECDSA(hashes.SHA384()))
        except InvalidSignature:
            raise BadSignature("the COSE_Sign1 signature does not verify with the document's certificate") from None
        return PASSED

    # 5-8. the caller's expectations -----------------------------------------------------------------------------
    def _debug(self) -> str:
        doc = self._doc()
        self.debug = all(i in doc.pcrs and not any(doc.pcrs[i]) for i in MEASURED_PCRS)
        if not self.debug:
            return PASSED
        if not self.expect.allow_debug:
            raise DebugEnclave("PCR0, PCR1 and PCR2 are all zero: a debug-mode enclave (allow it explicitly "
                               "to check the rest)")
        self.warnings.append(DEBUG_WARNING)
        return PASSED

    def _pcrs(self) -> str:
        doc = self._doc()
        if not self.expect.pcrs:
            return NOT_REQUESTED
        self.pcrs = tuple(PcrCheck(i, bytes(v), doc.pcrs.get(i)) for i, v in sorted(self.expect.pcrs.items()))
        if self.debug:
            return SKIPPED_DEBUG
        wrong = [p for p in self.pcrs if not p.matched]
        if wrong:
            raise PcrMismatch("PCR" + ", PCR".join(str(p.index) for p in wrong) + " not as expected",
                              details={"pcrs": [p.as_dict() for p in self.pcrs]})
        return PASSED

    def _nonce(self) -> str:
        expected = self.expect.nonce
        if expected is None:
            return NOT_REQUESTED
        actual = self._doc().nonce
        if actual is None or not hmac.compare_digest(actual, expected):
            raise NonceMismatch("the document's nonce is not the expected one" if actual is not None
                                else "the document carries no nonce",
                                details={"expected": expected.hex(), "actual": None if actual is None else actual.hex()})
        return PASSED

    def _freshness(self) -> str:
        doc = self._doc()
        self.age = self.now - doc.timestamp
        if -self.age > MAX_CLOCK_SKEW:
            raise TimestampInFuture(f"the document is dated {-self.age.total_seconds():.0f}s ahead of now",
                                    details={"age_seconds": self.age.total_seconds()})
        max_age = self.expect.max_age
        if max_age is None:
            return NOT_REQUESTED
        if self.age > max_age:
            raise StaleDocument(f"the document is {self.age.total_seconds():.0f}s old, the limit is "
                                f"{max_age.total_seconds():.0f}s", details={"age_seconds": self.age.total_seconds(),
                                                                            "max_age_seconds": max_age.total_seconds()})
        return PASSED

    def _doc(self) -> AttestationDocument:
        assert self.document is not None
        return self.document


# --- helpers -----------------------------------------------------------------------------------------------------
def _decode(data: bytes, what: str) -> object:
    """One CBOR item filling `data` exactly."""
    stream = io.BytesIO(data)
    try:
        item = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # noqa: BLE001 - hostile bytes: cbor2's semantic tags raise more than its own errors
        raise MalformedDocument(f"{what} is not valid CBOR: {str(exc)[:200]}") from None
    if stream.tell() != len(data):
        raise MalformedDocument(f"{len(data) - stream.tell()} trailing bytes after the {what}")
    return item


def _is_array(value: object) -> TypeGuard[Sequence[object]]:
    return isinstance(value, Sequence) and not isinstance(value, str | bytes)


def _bad(name: str, wanted: str, **details: object) -> MalformedDocument:
    return MalformedDocument(f"field {name!r} must be {wanted}", details={"field": name, **details})


def _bstr(fields: Mapping[object, object], name: str, low: int, high: int) -> bytes:
    value = fields[name]
    if not isinstance(value, bytes) or not low <= len(value) <= high:
        raise _bad(name, f"a byte string of {low}..{high} bytes")
    return value


def _optional_bstr(fields: Mapping[object, object], name: str, low: int, high: int) -> bytes | None:
    return None if fields.get(name) is None else _bstr(fields, name, low, high)


def _certificate(der: bytes, where: str) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except (ValueError, x509.InvalidVersion):  # InvalidVersion is no ValueError: a version field of 87, say
        raise InvalidCertificate(f"{where} is not a DER X.509 certificate", details={"certificate": where}) from None


def _where(position: int, length: int) -> str:
    if position == 0:
        return "the document's certificate"
    return "the root certificate" if position == length - 1 else f"intermediate certificate {position}"


_KNOWN_CRITICAL = {ExtensionOID.BASIC_CONSTRAINTS, ExtensionOID.KEY_USAGE}


def _check_profile(cert: x509.Certificate, position: int, length: int) -> None:
    """Basic constraints and key usage for the certificate's place (§3.2.3.2-3), and an EC P-384 leaf key."""
    where = _where(position, length)

    def bad(reason: str) -> InvalidCertificate:
        return InvalidCertificate(f"{where}: {reason}", details={"position": position})

    for ext in cert.extensions:
        if ext.critical and ext.oid not in _KNOWN_CRITICAL:
            raise bad(f"unknown critical extension {ext.oid.dotted_string}")
    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        constraints = None
    try:
        usage: x509.KeyUsage | None = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if position == 0:
        if constraints is not None and (constraints.value.ca or constraints.value.path_length is not None):
            raise bad("a CA certificate cannot sign attestation documents")
        if usage is None or not usage.digital_signature:
            raise bad("key usage lacks digitalSignature")
        key = cert.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
            raise bad("its key is not an EC P-384 key (ES384)")
        return
    if constraints is None or not constraints.critical or not constraints.value.ca:
        raise bad("not a CA (basic constraints must be critical with CA true)")
    below = position - 1  # CA certificates between this one and the leaf
    if constraints.value.path_length is not None and constraints.value.path_length < below:
        raise bad(f"path length constraint {constraints.value.path_length} < {below} CA certificates below it")
    if usage is None or not usage.key_cert_sign:
        raise bad("key usage lacks keyCertSign")
