"""The EIF signature section (EIF.md §4.2): the CBOR nitro-cli's serde_cbor writes and its COSE_Sign1 over PCR0."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

# COSE header label 1 is "alg" (RFC 9052 §3.1).
HEADER_ALG = 1
SIGNATURE1_CONTEXT = "Signature1"
COSE_SIGN1_TAG = 18
PCR0_INDEX = 0


@dataclass(frozen=True)
class CoseAlgorithm:
    """One ECDSA COSE algorithm: its label, digest and the width of r and s in the signature."""

    name: str
    label: int
    curve: str
    scalar_size: int

    def hash(self) -> hashes.HashAlgorithm:
        if self.name == "ES256":
            return hashes.SHA256()
        return hashes.SHA384() if self.name == "ES384" else hashes.SHA512()


# nitro-cli's `ec_curve_to_parameters`: the key's curve alone picks the algorithm and digest.
ALGORITHMS: Mapping[str, CoseAlgorithm] = {
    "secp256r1": CoseAlgorithm("ES256", -7, "secp256r1", 32),
    "secp384r1": CoseAlgorithm("ES384", -35, "secp384r1", 48),
    "secp521r1": CoseAlgorithm("ES512", -36, "secp521r1", 66),
}
_BY_LABEL = {alg.label: alg for alg in ALGORITHMS.values()}


def algorithm_for(curve: ec.EllipticCurve) -> CoseAlgorithm | None:
    return ALGORITHMS.get(curve.name)


# --- encoding: canonical CBOR for exactly the shapes serde_cbor and the cose crate produce ---------------


def _head(major: int, arg: int) -> bytes:
    """A CBOR head in shortest form (RFC 8949 §4.2.1), as serde_cbor writes it."""
    if arg < 24:
        return bytes([major << 5 | arg])
    for info, width in ((24, 1), (25, 2), (26, 4), (27, 8)):
        if arg < 1 << (8 * width):
            return bytes([major << 5 | info]) + arg.to_bytes(width, "big")
    raise ValueError(f"CBOR argument {arg} does not fit in 64 bits")


def _int(value: int) -> bytes:
    return _head(0, value) if value >= 0 else _head(1, -1 - value)


def _bstr(data: bytes) -> bytes:
    return _head(2, len(data)) + data


def _tstr(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _head(3, len(raw)) + raw


def _u8_array(data: bytes) -> bytes:
    # serde_cbor serialises a Rust Vec<u8> as a sequence: an array of one uint per byte, not a byte string.
    return _head(4, len(data)) + b"".join(_head(0, b) for b in data)


def pcr_info(pcr: bytes, index: int = PCR0_INDEX) -> bytes:
    """serde_cbor(PcrInfo{register_index, register_value}): the COSE payload nitro-cli signs."""
    return (_head(5, 2) + _tstr("register_index") + _int(index)
            + _tstr("register_value") + _u8_array(pcr))


def protected_header(alg: CoseAlgorithm) -> bytes:
    return _head(5, 1) + _int(HEADER_ALG) + _int(alg.label)


def sig_structure(protected: bytes, payload: bytes) -> bytes:
    """The bytes actually signed (RFC 9052 §4.4), with an empty external_aad."""
    return _head(4, 4) + _tstr(SIGNATURE1_CONTEXT) + _bstr(protected) + _bstr(b"") + _bstr(payload)


def sign1(payload: bytes, key: ec.EllipticCurvePrivateKey) -> bytes:
    """An untagged COSE_Sign1 (protected {1: alg}, empty unprotected map) as `CoseSign1::as_bytes(false)`.

    ECDSA nonces are derived from the key and message (RFC 6979), so the same key signs the same PCR0
    into the same bytes: signed EIFs stay reproducible.
    """
    alg = algorithm_for(key.curve)
    if alg is None:
        raise ValueError(f"curve {key.curve.name} has no COSE algorithm here")
    protected = protected_header(alg)
    der = key.sign(sig_structure(protected, payload), ec.ECDSA(alg.hash(), deterministic_signing=True))
    r, s = decode_dss_signature(der)
    signature = r.to_bytes(alg.scalar_size, "big") + s.to_bytes(alg.scalar_size, "big")
    return _head(4, 4) + _bstr(protected) + _head(5, 0) + _bstr(payload) + _bstr(signature)


def max_sign1_size(alg: CoseAlgorithm) -> bytes:
    """Stand-in COSE bytes as long as the longest `sign1` output for `alg`, every byte >= 24.

    serde_cbor writes a byte below 24 in one CBOR byte and the others in two, so filler of 0xff bytes
    makes `signature_section` of it an upper bound of the real section's size.
    """
    payload = pcr_info(b"\xff" * 48)
    return b"\xff" * len(_head(4, 4) + _bstr(protected_header(alg)) + _head(5, 0) + _bstr(payload)
                        + _bstr(b"\xff" * 2 * alg.scalar_size))


def signature_section(certificate_pem: bytes, cose_sign1: bytes) -> bytes:
    """serde_cbor(vec![PcrSignature{signing_certificate, signature}]): the type-4 section data."""
    return (_head(4, 1) + _head(5, 2) + _tstr("signing_certificate") + _u8_array(certificate_pem)
            + _tstr("signature") + _u8_array(cose_sign1))


# --- decoding ------------------------------------------------------------------------------------------------


class CborError(ValueError):
    """Bytes outside the CBOR subset this module reads."""


_Item = int | bytes | str | list["_Item"] | dict[object, "_Item"] | tuple[int, "_Item"]
_MAX_DEPTH = 8


def _item(data: bytes, pos: int, depth: int) -> tuple[_Item, int]:
    """One definite-length item: ints, byte/text strings, arrays, maps (int or text keys), tags."""
    if depth > _MAX_DEPTH:
        raise CborError("nested too deeply")
    if pos >= len(data):
        raise CborError("truncated")
    major, info = data[pos] >> 5, data[pos] & 0x1F
    pos += 1
    if info < 24:
        arg = info
    elif info <= 27:
        width = 1 << (info - 24)
        if pos + width > len(data):
            raise CborError("truncated")
        arg = int.from_bytes(data[pos:pos + width], "big")
        pos += width
    else:
        raise CborError(f"unsupported additional information {info} (indefinite lengths are not written here)")
    if major == 0:
        return arg, pos
    if major == 1:
        return -1 - arg, pos
    if major in (2, 3):
        if pos + arg > len(data):
            raise CborError("truncated")
        raw = data[pos:pos + arg]
        try:
            return (raw if major == 2 else raw.decode("utf-8")), pos + arg
        except UnicodeDecodeError as exc:
            raise CborError(f"text string is not UTF-8: {exc}") from exc
    if major == 4:
        items: list[_Item] = []
        for _ in range(arg):  # every item takes at least one byte, so a lying count runs out of data fast
            item, pos = _item(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if major == 5:
        entries: dict[object, _Item] = {}
        for _ in range(arg):
            key, pos = _item(data, pos, depth + 1)
            if not isinstance(key, int | str) or key in entries:
                raise CborError("map keys must be distinct integers or text strings")
            entries[key], pos = _item(data, pos, depth + 1)
        return entries, pos
    if major == 6:
        inner, pos = _item(data, pos, depth + 1)
        return (arg, inner), pos
    raise CborError(f"unsupported major type {major}")


def decode(data: bytes) -> _Item:
    item, end = _item(data, 0, 0)
    if end != len(data):
        raise CborError(f"{len(data) - end} trailing bytes after the CBOR item")
    return item


def _byte_values(value: object, what: str) -> bytes:
    if not isinstance(value, list) or not all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        raise CborError(f"{what} is not an array of byte values")
    return bytes(value)


@dataclass(frozen=True)
class PcrSignature:
    """Entry 0 of the signature section: the certificate as given (PEM) and the COSE_Sign1 bytes."""

    signing_certificate: bytes
    signature: bytes


def parse_signature_section(raw: bytes) -> PcrSignature:
    """The first `PcrSignature` of a section; every entry must have nitro-cli's shape. Raises `CborError`."""
    decoded = decode(raw)
    if not isinstance(decoded, list) or not decoded:
        raise CborError("expected a non-empty array of signatures")
    entries = []
    for entry in decoded:
        if not isinstance(entry, dict) or set(entry) != {"signing_certificate", "signature"}:
            raise CborError("expected maps with exactly signing_certificate and signature")
        entries.append(PcrSignature(_byte_values(entry["signing_certificate"], "signing_certificate"),
                                    _byte_values(entry["signature"], "signature")))
    return entries[0]


@dataclass(frozen=True)
class Sign1:
    protected: bytes
    algorithm: CoseAlgorithm
    payload: bytes
    signature: bytes


def parse_sign1(raw: bytes) -> Sign1:
    """A COSE_Sign1, tagged (18) or not, whose protected header names one of the ECDSA algorithms."""
    item = decode(raw)
    if isinstance(item, tuple):
        tag, item = item
        if tag != COSE_SIGN1_TAG:
            raise CborError(f"tag {tag} is not COSE_Sign1 ({COSE_SIGN1_TAG})")
    if not isinstance(item, list) or len(item) != 4:
        raise CborError("COSE_Sign1 must be an array of 4 items")
    protected, unprotected, payload, signature = item
    if not isinstance(protected, bytes) or not isinstance(unprotected, dict) \
            or not isinstance(payload, bytes) or not isinstance(signature, bytes):
        raise CborError("COSE_Sign1 items must be bstr, map, bstr, bstr")
    header = decode(protected) if protected else {}
    if not isinstance(header, dict):
        raise CborError("protected header is not a map")
    label = header.get(HEADER_ALG, unprotected.get(HEADER_ALG))
    alg = _BY_LABEL.get(label) if isinstance(label, int) else None
    if alg is None:
        raise CborError(f"COSE algorithm {label!r} is not ES256, ES384 or ES512")
    return Sign1(protected, alg, payload, signature)


def verify_sign1(message: Sign1, public_key: ec.EllipticCurvePublicKey) -> bool:
    """Whether `message`'s signature verifies with `public_key` under the algorithm it names."""
    alg = message.algorithm
    if algorithm_for(public_key.curve) != alg or len(message.signature) != 2 * alg.scalar_size:
        return False
    r = int.from_bytes(message.signature[:alg.scalar_size], "big")
    s = int.from_bytes(message.signature[alg.scalar_size:], "big")
    try:
        public_key.verify(encode_dss_signature(r, s), sig_structure(message.protected, message.payload),
                          ec.ECDSA(alg.hash()))
    except InvalidSignature:
        return False
    return True

