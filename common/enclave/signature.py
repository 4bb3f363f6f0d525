"""The EIF signature section (EIF.md §4.2), read side: the certificate, PCR8, whether the signature over PCR0
verifies, and the certificate as describe-eif prints it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from common.enclave.measure import pcr_of
from common.errors import InvalidEif

if TYPE_CHECKING:
    from cryptography import x509


@dataclass(frozen=True)
class SignatureInfo:
    """What the signature section says: the certificate (PEM as embedded), PCR8, and whether the COSE
    signature verifies with the certificate's key over exactly `serde_cbor(PcrInfo(0, PCR0))` of this file."""

    certificate_pem: bytes = field(repr=False)
    pcr8: str
    check: bool


def _load_certificate(pem: bytes) -> x509.Certificate:
    from cryptography import x509

    try:
        return x509.load_pem_x509_certificate(pem)
    except (ValueError, x509.InvalidVersion) as exc:  # InvalidVersion is no ValueError
        raise InvalidEif(f"signature section certificate is not a PEM X.509 certificate: {exc}",
                         details={"reason": "invalid_signature"}) from exc


def signature_info(raw: bytes, pcr0: str) -> SignatureInfo:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    from common.enclave import cose

    try:
        entry = cose.parse_signature_section(raw)
    except cose.CborError as exc:
        raise InvalidEif(f"signature section is not the CBOR nitro-cli writes: {exc}",
                         details={"reason": "invalid_signature"}) from exc
    cert = _load_certificate(entry.signing_certificate)
    pcr8 = pcr_of(cert.public_bytes(Encoding.DER))
    # A well-formed section whose signature is wrong is reported, as nitro-cli's SignatureCheck does,
    # rather than refused: the file's other facts (PCRs, CRC) are still worth describing.
    check = False
    public_key = cert.public_key()
    try:
        message = cose.parse_sign1(entry.signature)
    except cose.CborError:
        message = None
    if message is not None and isinstance(public_key, ec.EllipticCurvePublicKey):
        check = message.payload == cose.pcr_info(bytes.fromhex(pcr0)) and cose.verify_sign1(message, public_key)
    return SignatureInfo(entry.signing_certificate, pcr8, check)


def _openssl_time(moment: object) -> str:
    """ASN1_TIME as OpenSSL prints it (`Jan  1 00:00:00 2024 GMT`), the form describe-eif shows."""
    import datetime as dt

    assert isinstance(moment, dt.datetime)
    return f"{moment:%b} {moment.day:2d} {moment:%H:%M:%S %Y} GMT"


def certificate_description(pem: bytes) -> dict[str, object]:
    """describe-eif's `SigningCertificate`: issuer entries by OpenSSL long name, algorithm, validity, signature."""
    cert = _load_certificate(pem)
    issuer: dict[str, str] = {}
    for attribute in cert.issuer:
        value = attribute.value
        issuer[attribute.oid._name] = value if isinstance(value, str) else value.hex()
    return {
        "IssuerName": issuer,
        "Algorithm": cert.signature_algorithm_oid._name,
        "NotBefore": _openssl_time(cert.not_valid_before_utc),
        "NotAfter": _openssl_time(cert.not_valid_after_utc),
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }

