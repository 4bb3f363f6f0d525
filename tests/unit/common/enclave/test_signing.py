"""Unit tests for EIF signing: the signature section and COSE_Sign1 (common/enclave/cose.py), the signing identity's checks
(common/enclave/signing.py), and signed files through the EIF writer, reader and describe-eif (common/enclave/)."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import os
import struct
import zlib
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from common.enclave import cose
from common.enclave.format import crc32_combine
from common.enclave.reader import describe_eif, read_eif
from common.enclave.signing import EifSigner, load_signer
from common.enclave.writer import Section, eif_size, write_eif
from common.errors import (
    InvalidEif,
    InvalidSigningMaterial,
    SigningCertificateExpired,
    SigningCertificateNotYetValid,
    SigningCurveUnsupported,
    SigningKeyMismatch,
    SigningKeyUnsupported,
)
from tests.fixtures.eif_vector import TV1_METADATA, TV1_PCRS, TV1_SHA256
from tests.fixtures.signing import make_certificate, make_signer, pem_of, with_unknown_version, write_key_pair

# TV1 of EIF.md §8 (tests/fixtures/eif_vector.py): the signed vector TV2 is TV1 plus a signature section.
TV1_PCR0, TV1_PCR1, TV1_PCR2 = TV1_PCRS.pcr0, TV1_PCRS.pcr1, TV1_PCRS.pcr2
TV1_SIZE = 904
# EIF.md §8 TV2: the COSE payload for TV1's PCR0 starts with these bytes.
TV2_PAYLOAD_PREFIX = (b"\xa2\x6eregister_index\x00\x6eregister_value\x98\x30" + bytes.fromhex("1861") +
                      bytes.fromhex("18fd") + bytes.fromhex("182b"))

CURVES = {"ES256": (ec.SECP256R1(), hashes.SHA256(), 32, b"\x26"),
          "ES384": (ec.SECP384R1(), hashes.SHA384(), 48, b"\x38\x22"),
          "ES512": (ec.SECP521R1(), hashes.SHA512(), 66, b"\x38\x23")}


def _write_tv1(signer: EifSigner | None, pcr_ramdisk: bytes = b"RAMDISK1") -> bytes:
    out = io.BytesIO()
    write_eif(out, kernel=Section.of_bytes(b"KERNEL"), cmdline=b"console=ttyS0", metadata=TV1_METADATA,
              ramdisks=[Section.of_bytes(b"RAMDISK0"), Section.of_bytes(pcr_ramdisk)], signer=signer)
    return out.getvalue()


def _expected_pcr(content: bytes) -> str:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).hexdigest()


def _u8_values(data: bytes, pos: int, count: int) -> tuple[bytes, int]:
    """`count` CBOR uints of one byte value each, read independently of common.enclave.cose."""
    values = bytearray()
    for _ in range(count):
        if data[pos] < 24:
            values.append(data[pos])
            pos += 1
        else:
            assert data[pos] == 0x18
            values.append(data[pos + 1])
            pos += 2
    return bytes(values), pos


def _array_len(data: bytes, pos: int) -> tuple[int, int]:
    head = data[pos]
    assert head >> 5 == 4
    if head & 0x1F < 24:
        return head & 0x1F, pos + 1
    width = 1 << ((head & 0x1F) - 24)
    return int.from_bytes(data[pos + 1:pos + 1 + width], "big"), pos + 1 + width


def _split_section(section: bytes) -> tuple[bytes, bytes]:
    """(certificate PEM, COSE bytes) out of the section, by the layout of EIF.md §4.2."""
    prefix = b"\x81\xa2\x73signing_certificate"
    assert section.startswith(prefix)
    n, pos = _array_len(section, len(prefix))
    pem, pos = _u8_values(section, pos, n)
    assert section[pos:pos + 10] == b"\x69signature"
    m, pos = _array_len(section, pos + 10)
    signature, pos = _u8_values(section, pos, m)
    assert pos == len(section)
    return pem, signature


def _split_sign1(raw: bytes) -> tuple[bytes, bytes, bytes]:
    """(protected, payload, signature) of an untagged COSE_Sign1 with an empty unprotected map."""
    def bstr(pos: int) -> tuple[bytes, int]:
        head = raw[pos]
        assert head >> 5 == 2
        if head & 0x1F < 24:
            return raw[pos + 1:pos + 1 + (head & 0x1F)], pos + 1 + (head & 0x1F)
        assert head & 0x1F == 24
        length = raw[pos + 1]
        return raw[pos + 2:pos + 2 + length], pos + 2 + length

    assert raw[0] == 0x84
    protected, pos = bstr(1)
    assert raw[pos] == 0xA0
    payload, pos = bstr(pos + 1)
    signature, pos = bstr(pos)
    assert pos == len(raw)
    return protected, payload, signature


def _signature_section(eif: bytes) -> bytes:
    kind, flags, size = struct.unpack(">HHQ", eif[TV1_SIZE:TV1_SIZE + 12])
    assert (kind, flags) == (4, 0)
    return eif[TV1_SIZE + 12:TV1_SIZE + 12 + size]


# --- CBOR / COSE encoding --------------------------------------------------------------------------------------


def test_cose_pcr_info_matches_tv2_payload_prefix() -> None:
    payload = cose.pcr_info(bytes.fromhex(TV1_PCR0))
    assert payload.startswith(TV2_PAYLOAD_PREFIX)
    values, end = _u8_values(payload, len(b"\xa2\x6eregister_index\x00\x6eregister_value\x98\x30"), 48)
    assert values.hex() == TV1_PCR0 and end == len(payload)


def test_a_signing_certificate_of_an_unknown_version_is_an_invalid_eif() -> None:
    from common.enclave.signature import signature_info

    cert = make_certificate(ec.generate_private_key(ec.SECP384R1()))
    pem = pem_of(with_unknown_version(cert.public_bytes(serialization.Encoding.DER)))
    with pytest.raises(InvalidEif) as err:
        signature_info(cose.signature_section(pem, b"\x84"), TV1_PCR0)
    assert err.value.details["reason"] == "invalid_signature"


def test_cose_signature_section_has_tv2_prefix() -> None:
    pem = b"-----BEGIN CERTIFICATE-----\n" + b"A" * 495 + b"\n-----END CERTIFICATE-----\n"
    assert len(pem) == 550  # TV2's certificate length, so the head is TV2's `99 02 26`
    section = cose.signature_section(pem, b"\x84")
    assert section.startswith(b"\x81\xa2\x73signing_certificate\x99\x02\x26\x18\x2d\x18\x2d")
    assert _split_section(section) == (pem, b"\x84")


@pytest.mark.parametrize("alg_name", sorted(CURVES))
def test_cose_sign1_verifies_with_cryptography(alg_name: str) -> None:
    curve, digest, width, alg_label = CURVES[alg_name]
    key = ec.generate_private_key(curve)
    payload = cose.pcr_info(bytes.fromhex(TV1_PCR0))
    raw = cose.sign1(payload, key)

    protected, got_payload, signature = _split_sign1(raw)
    assert protected == b"\xa1\x01" + alg_label
    assert got_payload == payload
    assert len(signature) == 2 * width
    to_be_signed = (b"\x84\x6aSignature1" + bytes([0x40 | len(protected)]) + protected + b"\x40"
                    + b"\x58" + bytes([len(payload)]) + payload)
    r, s = int.from_bytes(signature[:width], "big"), int.from_bytes(signature[width:], "big")
    key.public_key().verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(digest))  # raises if wrong


def test_cose_sign1_is_deterministic_for_one_key_and_payload() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert cose.sign1(b"payload", key) == cose.sign1(b"payload", key)
    assert cose.sign1(b"payload", key) != cose.sign1(b"other", key)


def test_cose_verify_sign1_rejects_other_key_and_accepts_tag_18() -> None:
    key, other = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    raw = cose.sign1(b"payload", key)
    assert cose.verify_sign1(cose.parse_sign1(raw), key.public_key())
    assert not cose.verify_sign1(cose.parse_sign1(raw), other.public_key())
    assert cose.verify_sign1(cose.parse_sign1(b"\xd2" + raw), key.public_key())  # tag 18 = COSE_Sign1
    with pytest.raises(cose.CborError):
        cose.parse_sign1(b"\xd1" + raw)  # tag 17 is COSE_Mac0


def test_cose_max_sign1_size_bounds_real_sections() -> None:
    for curve, _, _, _ in CURVES.values():
        key = ec.generate_private_key(curve)
        alg = cose.algorithm_for(curve)
        assert alg is not None
        bound = len(cose.signature_section(b"PEM", cose.max_sign1_size(alg)))
        for pcr in (b"\x00" * 48, b"\xff" * 48, os.urandom(48)):
            assert len(cose.signature_section(b"PEM", cose.sign1(cose.pcr_info(pcr), key))) <= bound


# --- CRC of a header packed last ---------------------------------------------------------------------------------


def test_crc32_combine_equals_crc_of_concatenation() -> None:
    for a, b in ((b"", b""), (b"head", b""), (b"", b"tail"), (os.urandom(544), os.urandom(100_003)),
                 (b"x", os.urandom(1 << 16))):
        assert crc32_combine(zlib.crc32(a), zlib.crc32(b), len(b)) == zlib.crc32(a + b)


# --- the signing identity ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("curve", [ec.SECP256R1(), ec.SECP384R1(), ec.SECP521R1()], ids=lambda c: c.name)
def test_load_signer_accepts_supported_curves(tmp_path: Path, curve: ec.EllipticCurve) -> None:
    key = ec.generate_private_key(curve)
    cert = make_certificate(key)
    signer = load_signer(*write_key_pair(tmp_path, key, cert))
    assert signer.certificate_der == cert.public_bytes(serialization.Encoding.DER)
    assert signer.certificate_pem == (tmp_path / "cert.pem").read_bytes()
    assert signer.algorithm.curve == curve.name


def test_load_signer_refuses_expired_certificate(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    cert = make_certificate(key, not_before=dt.datetime(2020, 1, 1, tzinfo=dt.UTC),
                        not_after=dt.datetime(2021, 1, 1, tzinfo=dt.UTC))
    with pytest.raises(SigningCertificateExpired) as err:
        load_signer(*write_key_pair(tmp_path, key, cert))
    assert err.value.code == "signing_certificate_expired"


def test_load_signer_refuses_not_yet_valid_certificate(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    paths = write_key_pair(tmp_path, key, make_certificate(key))
    with pytest.raises(SigningCertificateNotYetValid) as err:
        load_signer(*paths, now=dt.datetime(2023, 12, 31, tzinfo=dt.UTC))
    assert err.value.code == "signing_certificate_not_yet_valid"
    assert load_signer(*paths, now=dt.datetime(2024, 1, 2, tzinfo=dt.UTC)).certificate_der


def test_load_signer_refuses_key_not_matching_certificate(tmp_path: Path) -> None:
    key, other = ec.generate_private_key(ec.SECP384R1()), ec.generate_private_key(ec.SECP384R1())
    with pytest.raises(SigningKeyMismatch) as err:
        load_signer(*write_key_pair(tmp_path, other, make_certificate(key)))
    assert err.value.code == "signing_key_mismatch"


def test_load_signer_refuses_rsa_key(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(SigningKeyUnsupported) as err:
        load_signer(*write_key_pair(tmp_path, key, make_certificate(key)))
    assert err.value.code == "signing_key_unsupported" and "RSA" in err.value.message


def test_load_signer_refuses_ed25519_key(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    with pytest.raises(SigningKeyUnsupported):
        load_signer(*write_key_pair(tmp_path, key, make_certificate(key)))


def test_load_signer_refuses_unsupported_curve(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256K1())
    cert = make_certificate(key, signer_key=ec.generate_private_key(ec.SECP256R1()))
    with pytest.raises(SigningCurveUnsupported) as err:
        load_signer(*write_key_pair(tmp_path, key, cert))
    assert err.value.code == "signing_curve_unsupported" and err.value.details["curve"] == "secp256k1"


def test_load_signer_refuses_unreadable_or_encrypted_material(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    key_path, cert_path = write_key_pair(tmp_path, key, make_certificate(key))
    with pytest.raises(InvalidSigningMaterial):
        load_signer(tmp_path / "missing.pem", cert_path)
    with pytest.raises(InvalidSigningMaterial):
        load_signer(key_path, key_path)  # a key where the certificate belongs
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.BestAvailableEncryption(b"secret")))
    with pytest.raises(InvalidSigningMaterial) as err:
        load_signer(key_path, cert_path)
    assert err.value.code == "invalid_signing_material"


# --- signed EIFs --------------------------------------------------------------------------------------------------


def test_write_eif_signed_is_tv1_plus_signature_section(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    unsigned, signed = _write_tv1(None), _write_tv1(signer)
    assert hashlib.sha256(unsigned).hexdigest() == TV1_SHA256

    magic, version, flags, _, _, _, count = struct.unpack(">4sHHQQHH", signed[:28])
    offsets = struct.unpack(">32Q", signed[28:284])
    sizes = struct.unpack(">32Q", signed[284:540])
    section = _signature_section(signed)
    assert (magic, version, flags, count) == (b".eif", 4, 0, 6)
    assert offsets[:7] == (548, 566, 591, 864, 884, 904, 0)
    assert sizes[:7] == (6, 13, 261, 8, 8, len(section), 0)
    assert signed[548:TV1_SIZE] == unsigned[548:]  # signing leaves every other section as it was
    assert len(signed) == TV1_SIZE + 12 + len(section)
    assert struct.unpack(">I", signed[544:548])[0] == zlib.crc32(signed[:544] + signed[548:])
    assert len(signed) <= eif_size(kernel=6, cmdline=13, metadata=261, ramdisks=[8, 8],
                                   signature=signer.max_section_size())


def test_write_eif_signed_section_signs_pcr0_with_the_certificate_key(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    signed = _write_tv1(signer)
    pem, raw = _split_section(_signature_section(signed))
    assert pem == signer.certificate_pem
    protected, payload, signature = _split_sign1(raw)
    assert payload.startswith(TV2_PAYLOAD_PREFIX) and payload == cose.pcr_info(bytes.fromhex(TV1_PCR0))
    cert = x509.load_pem_x509_certificate(pem)
    public = cert.public_key()
    assert isinstance(public, ec.EllipticCurvePublicKey)
    to_be_signed = (b"\x84\x6aSignature1" + bytes([0x40 | len(protected)]) + protected + b"\x40"
                    + b"\x58" + bytes([len(payload)]) + payload)
    r, s = int.from_bytes(signature[:48], "big"), int.from_bytes(signature[48:], "big")
    public.verify(encode_dss_signature(r, s), to_be_signed, ec.ECDSA(hashes.SHA384()))


def test_write_eif_signed_measures_pcr8_from_certificate_der(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    out = io.BytesIO()
    measurements = write_eif(out, kernel=Section.of_bytes(b"KERNEL"), cmdline=b"console=ttyS0",
                             metadata=TV1_METADATA, ramdisks=[Section.of_bytes(b"RAMDISK0"),
                                                              Section.of_bytes(b"RAMDISK1")], signer=signer).measurements
    der = x509.load_pem_x509_certificate((tmp_path / "cert.pem").read_bytes()).public_bytes(
        serialization.Encoding.DER)
    assert measurements.pcr8 == _expected_pcr(der)
    assert (measurements.pcr0, measurements.pcr1, measurements.pcr2) == (TV1_PCR0, TV1_PCR1, TV1_PCR2)
    info = read_eif(io.BytesIO(out.getvalue()))
    assert info.measurements == measurements
    assert info.signature is not None and info.signature.check


def test_write_eif_signed_is_reproducible(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    assert _write_tv1(signer) == _write_tv1(signer)


def test_describe_eif_signed_reports_certificate_and_signature_check(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    path = tmp_path / "signed.eif"
    path.write_bytes(_write_tv1(signer))

    described = describe_eif(path)

    assert list(described) == ["EifVersion", "Measurements", "IsSigned", "SigningCertificate", "CheckCRC",
                               "SignatureCheck", "ImageName", "ImageVersion", "Metadata"]
    assert described["IsSigned"] is True and described["CheckCRC"] is True and described["SignatureCheck"] is True
    cert = x509.load_der_x509_certificate(signer.certificate_der)
    assert described["SigningCertificate"] == {
        "IssuerName": {"commonName": "nitroconv test signer", "organizationName": "nitroconv"},
        "Algorithm": "ecdsa-with-SHA256",
        "NotBefore": "Jan  1 00:00:00 2024 GMT",
        "NotAfter": "Jan  1 00:00:00 2034 GMT",
        "Signature": ":".join(f"{b:02X}" for b in cert.signature),
    }
    assert described["Measurements"]["PCR8"] == _expected_pcr(signer.certificate_der)  # type: ignore[index]


def test_read_eif_signed_with_flipped_signature_byte(tmp_path: Path) -> None:
    signed = bytearray(_write_tv1(make_signer(tmp_path)))
    # The file ends with the last byte of s as a CBOR uint; flipping its low bit keeps the CBOR well-formed.
    signed[-1] ^= 0x01
    with pytest.raises(InvalidEif) as err:
        read_eif(io.BytesIO(bytes(signed)))
    assert err.value.details["reason"] == "crc_mismatch"
    described = describe_eif(io.BytesIO(bytes(signed)))
    assert described["CheckCRC"] is False and described["SignatureCheck"] is False

    signed[544:548] = struct.pack(">I", zlib.crc32(bytes(signed[:544] + signed[548:])))
    info = read_eif(io.BytesIO(bytes(signed)))  # a consistent CRC: the signature itself is what fails
    assert info.signature is not None and not info.signature.check
    assert info.measurements.pcr8 == _expected_pcr(x509.load_pem_x509_certificate(
        info.signature.certificate_pem).public_bytes(serialization.Encoding.DER))


def test_read_eif_signature_of_another_pcr0_fails_check(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    other = _signature_section(_write_tv1(signer, pcr_ramdisk=b"RAMDISK2"))  # a valid signature, other PCR0
    signed = bytearray(_write_tv1(signer))
    head = bytearray(signed[:TV1_SIZE])
    struct.pack_into(">Q", head, 284 + 5 * 8, len(other))
    rebuilt = bytes(head) + struct.pack(">HHQ", 4, 0, len(other)) + other
    rebuilt = rebuilt[:544] + struct.pack(">I", zlib.crc32(rebuilt[:544] + rebuilt[548:])) + rebuilt[548:]

    info = read_eif(io.BytesIO(rebuilt))

    assert info.signature is not None and not info.signature.check
    assert describe_eif(io.BytesIO(rebuilt))["SignatureCheck"] is False
