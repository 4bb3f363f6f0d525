"""The deployment's EIF signing identity: an EC key and its certificate, checked before any build uses them."""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_private_key

from common.enclave import cose
from common.errors import (
    InvalidSigningMaterial,
    SigningCertificateExpired,
    SigningCertificateNotYetValid,
    SigningCurveUnsupported,
    SigningKeyMismatch,
    SigningKeyUnsupported,
)


@dataclass(frozen=True)
class EifSigner:
    """What the EIF writer needs to add the signature section and PCR8."""

    certificate_pem: bytes  # the PEM file as given: nitro-cli embeds the file's bytes, not a re-encoding
    certificate_der: bytes  # what PCR8 measures (EIF.md §3.3)
    key: ec.EllipticCurvePrivateKey = field(repr=False, compare=False)

    @property
    def algorithm(self) -> cose.CoseAlgorithm:
        alg = cose.algorithm_for(self.key.curve)
        assert alg is not None  # load_signer refuses other curves
        return alg

    def max_section_size(self) -> int:
        """An upper bound of the section's size: its exact size depends on the PCR0 and signature byte values."""
        return len(cose.signature_section(self.certificate_pem, cose.max_sign1_size(self.algorithm)))

    def signature_section(self, pcr0: bytes) -> bytes:
        """The type-4 section data signing this PCR0."""
        return cose.signature_section(self.certificate_pem, cose.sign1(cose.pcr_info(pcr0), self.key))


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise InvalidSigningMaterial(f"cannot read the signing {what} {str(path)!r}: {exc.strerror or exc}",
                                     details={"path": str(path)}) from exc


def check_validity(cert: x509.Certificate, now: dt.datetime) -> None:
    """nitro-cli's run-enclave refuses a signature whose certificate is outside NotBefore..NotAfter."""
    if now < cert.not_valid_before_utc:
        raise SigningCertificateNotYetValid(
            f"the signing certificate is not valid before {cert.not_valid_before_utc.isoformat()}",
            details={"not_before": cert.not_valid_before_utc.isoformat()})
    if now > cert.not_valid_after_utc:
        raise SigningCertificateExpired(
            f"the signing certificate expired at {cert.not_valid_after_utc.isoformat()}",
            details={"not_after": cert.not_valid_after_utc.isoformat()})


def load_signer(key_path: Path, cert_path: Path, *, now: dt.datetime | None = None) -> EifSigner:
    """Load and check a PEM key and certificate: EC on P-256/384/521, matching, and valid at `now`.

    Each failure has its own error code, so a deployment mistake is named before any image is pulled.
    The certificate's chain is not checked: nitro-cli does not either, and PCR8 pins the exact certificate.
    """
    cert_pem = _read(cert_path, "certificate")
    key_pem = _read(key_path, "key")
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise InvalidSigningMaterial(f"{str(cert_path)!r} is not a PEM X.509 certificate: {exc}",
                                     details={"path": str(cert_path)}) from exc
    try:
        key = load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError) as exc:  # TypeError: the key is encrypted
        raise InvalidSigningMaterial(f"{str(key_path)!r} is not an unencrypted PEM private key: {exc}",
                                     details={"path": str(key_path)}) from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        kind = type(key).__name__.removeprefix("_").replace("PrivateKey", "") or "unknown"
        raise SigningKeyUnsupported(f"the signing key is {kind}; EIF signatures need an ECDSA key (P-256, P-384 "
                                    "or P-521), as nitro-cli supports only ECDSA", details={"key_type": kind})
    if cose.algorithm_for(key.curve) is None:
        raise SigningCurveUnsupported(f"the signing key's curve {key.curve.name} is not P-256, P-384 or P-521",
                                      details={"curve": key.curve.name})
    spki = PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(Encoding.DER, spki) != key.public_key().public_bytes(Encoding.DER, spki):
        raise SigningKeyMismatch("the signing key does not belong to the signing certificate "
                                 "(their public keys differ)")
    check_validity(cert, now or dt.datetime.now(dt.UTC))
    return EifSigner(cert_pem, cert.public_bytes(Encoding.DER), key)
