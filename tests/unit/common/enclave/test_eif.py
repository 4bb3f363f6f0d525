"""Unit tests for the EIF writer, strict reader, PCRs and nitro-cli JSON shapes (common/enclave/)."""
from __future__ import annotations

import datetime
import hashlib
import io
import json
import stat
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

import pytest

from common.enclave.cpio import CpioArchive, CpioEntry, iter_cpio
from common.enclave.format import SectionType
from common.enclave.measure import HASH_ALGORITHM, Measurements, pcr_of
from common.enclave.metadata import build_metadata, kernel_info_from_config
from common.enclave.reader import EifInfo, describe_eif, iter_section_data, read_eif
from common.enclave.writer import Section, eif_size, write_eif
from common.errors import InvalidBlobs, InvalidEif, InvalidOptions
from tests.fixtures.eif_vector import (
    EMPTY_PCR,
    TV1_CRC,
    TV1_METADATA,
    TV1_OFFSETS,
    TV1_PCRS,
    TV1_SHA256,
    TV1_SIZES,
    VECTOR,
    vector_bytes,
)

# --- the conformance vector TV1 (EIF.md §8): tests/data/conformance, expected values in tests/fixtures ---------


def _write_tv1(out: io.BytesIO) -> Measurements:
    return write_eif(out, kernel=Section.of_bytes(b"KERNEL"), cmdline=b"console=ttyS0", metadata=TV1_METADATA,
                     ramdisks=[Section.of_bytes(b"RAMDISK0"), Section.of_bytes(b"RAMDISK1")]).measurements


@pytest.fixture(scope="module")
def tv1() -> bytes:
    return vector_bytes()


def _expected_pcr(content: bytes) -> str:
    # Independent of the module: SHA384(0^48 || SHA384(content)).
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).hexdigest()


# --- an independent raw EIF composer, to craft valid and malformed files --------------------------------------


def _raw_eif(
    sections: Sequence[tuple[int, bytes] | tuple[int, bytes, int]],
    *,
    magic: bytes = b".eif",
    version: int = 4,
    flags: int = 0,
    reserved: int = 0,
    unused: int = 0,
    num: int | None = None,
    offsets: list[int] | None = None,
    sizes: list[int] | None = None,
    between: dict[int, bytes] | None = None,
    trailing: bytes = b"",
    crc: int | None = None,
) -> bytes:
    body, real_offsets, pos = b"", [], 548
    for index, section in enumerate(sections):
        junk = (between or {}).get(index, b"")
        body += junk
        pos += len(junk)
        kind, data = section[0], section[1]
        section_flags = section[2] if len(section) == 3 else 0
        real_offsets.append(pos)
        body += struct.pack(">HHQ", kind, section_flags, len(data)) + data
        pos += 12 + len(data)
    count = len(sections) if num is None else num
    offs = real_offsets if offsets is None else offsets
    lens = [len(s[1]) for s in sections] if sizes is None else sizes
    offs = offs + [0] * (32 - len(offs))
    lens = lens + [0] * (32 - len(lens))
    head = struct.pack(">4sHHQQHH32Q32QI", magic, version, flags, 1 << 30, 2, reserved, count, *offs, *lens, unused)
    value = zlib.crc32(head + body) if crc is None else crc
    return head + struct.pack(">I", value) + body + trailing


K, C, R, S, M = 1, 2, 3, 4, 5
STANDARD = [(K, b"KERNEL"), (C, b"console=ttyS0"), (M, TV1_METADATA), (R, b"RAMDISK0"), (R, b"RAMDISK1")]


def _reason(data: bytes) -> str:
    with pytest.raises(InvalidEif) as err:
        read_eif(io.BytesIO(data))
    return str(err.value.details["reason"])


# --- PCRs ---------------------------------------------------------------------------------------------------


def test_pcr_of_empty_content_matches_known_answer() -> None:
    assert pcr_of(b"") == EMPTY_PCR
    assert _expected_pcr(b"") == EMPTY_PCR


def test_measurements_to_nitro_cli_has_build_enclave_shape() -> None:
    assert TV1_PCRS.to_nitro_cli() == {"Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": TV1_PCRS.pcr0,
                                                        "PCR1": TV1_PCRS.pcr1, "PCR2": TV1_PCRS.pcr2}}
    signed = Measurements("a", "b", "c", "d").to_nitro_cli()["Measurements"]
    assert list(signed) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    assert signed["PCR8"] == "d"
    assert HASH_ALGORITHM == "Sha384 { ... }"


# --- writer: conformance -------------------------------------------------------------------------------------


def test_write_eif_reproduces_conformance_vector_byte_for_byte(tv1: bytes) -> None:
    out = io.BytesIO()
    measurements = _write_tv1(out)
    assert hashlib.sha256(out.getvalue()).hexdigest() == TV1_SHA256
    assert out.getvalue() == tv1
    assert measurements == TV1_PCRS


def test_build_metadata_reproduces_conformance_metadata() -> None:
    metadata = build_metadata(image_name="test-image", image_version="1.0", build_time="1970-01-01T00:00:00+00:00",
                              build_tool="eif_verify-selftest", build_tool_version="0.0.0",
                              operating_system="Linux", kernel_version="0.0.0", docker_info=None, custom={"k": "v"})
    assert metadata == TV1_METADATA
    assert len(metadata) == 261


def test_eif_size_predicts_written_length() -> None:
    assert eif_size(kernel=6, cmdline=13, metadata=261, ramdisks=[8, 8]) == 904


# --- writer: behaviour ---------------------------------------------------------------------------------------


def test_write_eif_measures_kernel_cmdline_and_ramdisks_as_nitro_cli() -> None:
    kernel, cmdline, rd0, rd1, rd2 = b"K" * 3000, b"reboot=k console=ttyS0", b"boot" * 100, b"app1", b"app2" * 9
    out = io.BytesIO()
    chunked = Section(len(rd0), lambda: [rd0[:7], b"", rd0[7:250], rd0[250:]])  # chunking must not matter
    measurements = write_eif(out, kernel=Section.of_bytes(kernel), cmdline=cmdline, metadata=TV1_METADATA,
                             ramdisks=[chunked, Section.of_bytes(rd1), Section.of_bytes(rd2)]).measurements
    assert measurements == Measurements(
        pcr0=_expected_pcr(kernel + cmdline + rd0 + rd1 + rd2),
        pcr1=_expected_pcr(kernel + cmdline + rd0),
        pcr2=_expected_pcr(rd1 + rd2),
    )
    assert read_eif(io.BytesIO(out.getvalue())).measurements == measurements


def test_write_eif_with_one_ramdisk_has_empty_pcr2() -> None:
    out = io.BytesIO()
    measurements = write_eif(out, kernel=Section.of_bytes(b"k"), cmdline=b"c", metadata=TV1_METADATA,
                             ramdisks=[Section.of_bytes(b"only")]).measurements
    assert measurements.pcr2 == EMPTY_PCR
    assert measurements.pcr1 == measurements.pcr0 == _expected_pcr(b"kconly")


def test_write_eif_records_header_fields() -> None:
    out = io.BytesIO()
    write_eif(out, kernel=Section.of_bytes(b"k"), cmdline=b"c", metadata=TV1_METADATA,
              ramdisks=[Section.of_bytes(b"r")], flags=1, default_mem=3 << 30, default_cpus=4)
    info = read_eif(io.BytesIO(out.getvalue()))
    assert (info.flags, info.arch, info.default_mem, info.default_cpus) == (1, "aarch64", 3 << 30, 4)


def test_write_eif_streams_cpio_archive_and_file_sections(tmp_path: Path) -> None:
    kernel_path = tmp_path / "bzImage"
    kernel_path.write_bytes(bytes(range(256)) * 5000)
    archive = CpioArchive([
        CpioEntry(name=b"dev", mode=stat.S_IFDIR | 0o755),
        CpioEntry(name=b"init", mode=stat.S_IFREG | 0o755, size=4, data=lambda: io.BytesIO(b"\x7fELF")),
    ])
    eif_path = tmp_path / "app.eif"
    with eif_path.open("wb") as out:
        measurements = write_eif(out, kernel=Section.of_file(kernel_path, chunk_size=4096), cmdline=b"console=ttyS0",
                                 metadata=TV1_METADATA, ramdisks=[Section(archive.size, archive.chunks)]).measurements

    info = read_eif(eif_path)
    assert info.measurements == measurements
    assert info.size == eif_path.stat().st_size
    assert b"".join(iter_section_data(eif_path, info.kernel)) == kernel_path.read_bytes()
    ramdisk = b"".join(iter_section_data(eif_path, info.ramdisks[0]))
    assert ramdisk == b"".join(archive.chunks())
    assert [(h.name, d) for h, d in iter_cpio(io.BytesIO(ramdisk))] == [(b"dev", b""), (b"init", b"\x7fELF")]
    assert info.cmdline == b"console=ttyS0"


@pytest.mark.parametrize("chunks", [[b"RAMDISK"], [b"RAMDISK0", b"!"]], ids=["short", "long"])
def test_write_eif_rejects_section_of_wrong_length(chunks: list[bytes]) -> None:
    with pytest.raises(InvalidEif) as err:
        write_eif(io.BytesIO(), kernel=Section.of_bytes(b"k"), cmdline=b"c", metadata=TV1_METADATA,
                  ramdisks=[Section(8, lambda: chunks)])
    assert err.value.details["reason"] == "size_mismatch"


def test_write_eif_rejects_file_that_changed_size(tmp_path: Path) -> None:
    path = tmp_path / "kernel"
    path.write_bytes(b"12345")
    section = Section.of_file(path)
    path.write_bytes(b"123456")
    with pytest.raises(InvalidEif) as err:
        write_eif(io.BytesIO(), kernel=section, cmdline=b"c", metadata=TV1_METADATA, ramdisks=[Section.of_bytes(b"r")])
    assert err.value.details["reason"] == "size_mismatch"


class _Unseekable(io.RawIOBase):
    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        return len(b)


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"ramdisks": []}, "missing_section"),
        ({"cmdline": b"console=ttyS0\0"}, "invalid_cmdline"),
        ({"metadata": b"{}"}, "invalid_metadata"),
        ({"metadata": b"not json"}, "invalid_metadata"),
        ({"flags": 2}, "bad_flags"),
        ({"default_cpus": -1}, "field_overflow"),
        ({"default_mem": 1 << 64}, "field_overflow"),
        ({"ramdisks": [Section.of_bytes(b"r")] * 30}, "too_many_sections"),
    ],
)
def test_write_eif_rejects_invalid_arguments(kwargs: dict[str, object], reason: str) -> None:
    args: dict[str, object] = {"kernel": Section.of_bytes(b"k"), "cmdline": b"c", "metadata": TV1_METADATA,
                               "ramdisks": [Section.of_bytes(b"r")]}
    args.update(kwargs)
    with pytest.raises(InvalidEif) as err:
        write_eif(io.BytesIO(), **args)  # type: ignore[arg-type]
    assert err.value.details["reason"] == reason


def test_write_eif_requires_seekable_output() -> None:
    with pytest.raises(InvalidEif) as err:
        write_eif(_Unseekable(), kernel=Section.of_bytes(b"k"), cmdline=b"c",  # type: ignore[arg-type]
                  metadata=TV1_METADATA, ramdisks=[Section.of_bytes(b"r")])
    assert err.value.details["reason"] == "unseekable_output"


# --- reader: conformance and corruption -----------------------------------------------------------------------


def test_read_eif_returns_conformance_layout_and_pcrs(tv1: bytes) -> None:
    info = read_eif(VECTOR)
    assert isinstance(info, EifInfo)
    assert info.measurements == TV1_PCRS
    assert tuple(s.offset for s in info.sections) == TV1_OFFSETS
    assert tuple(s.size for s in info.sections) == TV1_SIZES
    assert [s.type for s in info.sections] == [SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA,
                                               SectionType.RAMDISK, SectionType.RAMDISK]
    assert info.stored_crc == info.computed_crc == TV1_CRC
    assert info.crc_ok and not info.is_signed
    assert (info.version, info.flags, info.arch, info.default_mem, info.default_cpus) == (4, 0, "x86_64", 1 << 30, 2)
    assert info.size == len(tv1) == 904
    assert info.cmdline == b"console=ttyS0"
    assert info.metadata["ImageName"] == "test-image"
    assert read_eif(io.BytesIO(tv1)).measurements == TV1_PCRS


def test_read_eif_detects_every_single_byte_change(tv1: bytes) -> None:
    for offset in range(len(tv1)):
        for flip in (0x01, 0xFF):
            corrupted = bytearray(tv1)
            corrupted[offset] ^= flip
            with pytest.raises(InvalidEif):
                read_eif(io.BytesIO(bytes(corrupted)))


@pytest.mark.parametrize("length", [0, 4, 547, 548, 559, 560, 600, 903])
def test_read_eif_rejects_truncated_file(tv1: bytes, length: int) -> None:
    assert _reason(tv1[:length]) == "truncated"


def test_read_eif_rejects_truncated_unseekable_stream(tv1: bytes) -> None:
    class Pipe(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._data = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:
            chunk = self._data.read(min(len(b), 100))
            b[:len(chunk)] = chunk
            return len(chunk)

    with pytest.raises(InvalidEif) as err:
        read_eif(io.BufferedReader(Pipe(tv1[:890])))
    assert err.value.details["reason"] == "truncated"
    with pytest.raises(InvalidEif) as err:
        read_eif(io.BufferedReader(Pipe(tv1 + b"\0")))
    assert err.value.details["reason"] == "trailing_bytes"
    assert read_eif(io.BufferedReader(Pipe(tv1))).measurements == TV1_PCRS


def test_raw_eif_composer_matches_vector(tv1: bytes) -> None:
    # The helper below builds the malformed files; it must agree with the vector when given valid input.
    assert _raw_eif(STANDARD) == tv1


@pytest.mark.parametrize(
    ("kwargs", "reason"),
    [
        ({"magic": b"EIF."}, "bad_magic"),
        ({"version": 3}, "unsupported_version"),
        ({"version": 5}, "unsupported_version"),
        ({"flags": 2}, "bad_flags"),
        ({"flags": 0x8000}, "bad_flags"),
        ({"reserved": 1}, "reserved_nonzero"),
        ({"unused": 1}, "reserved_nonzero"),
        ({"num": 0}, "bad_section_count"),
        ({"num": 33}, "bad_section_count"),
        ({"num": 4}, "table_nonzero_tail"),
        ({"num": 6}, "offset_mismatch"),
        ({"trailing": b"\0"}, "trailing_bytes"),
        ({"trailing": b"x" * 12}, "trailing_bytes"),
        ({"between": {3: b"\0\0\0\0"}}, "offset_mismatch"),  # gap, table says so too
        ({"offsets": [548, 566, 589, 864, 884]}, "offset_mismatch"),  # overlap claimed by the table
        ({"sizes": [6, 13, 261, 9, 8]}, "offset_mismatch"),  # table size disagrees with layout
        ({"sizes": [6, 13, 261, 8, 9]}, "truncated"),  # last size claims more than the file holds
        ({"sizes": [6, 13, 261, 8, 7]}, "trailing_bytes"),
        ({"crc": TV1_CRC ^ 1}, "crc_mismatch"),
    ],
)
def test_read_eif_rejects_malformed_header(kwargs: dict[str, object], reason: str) -> None:
    assert _reason(_raw_eif(STANDARD, **kwargs)) == reason  # type: ignore[arg-type]


def test_read_eif_rejects_gap_even_when_table_points_past_it() -> None:
    # Junk bytes between sections, and a table that honestly points past them: still not nitro-cli layout.
    body = _raw_eif(STANDARD, between={4: b"JUNK"}, offsets=[548, 566, 591, 864, 888])
    assert _reason(body) == "offset_mismatch"


def test_read_eif_rejects_section_header_disagreeing_with_table() -> None:
    data = bytearray(_raw_eif(STANDARD))
    struct.pack_into(">Q", data, 864 + 4, 7)  # ramdisk 0 header says 7 bytes, table says 8
    struct.pack_into(">I", data, 544, zlib.crc32(bytes(data[:544]) + bytes(data[548:])))
    assert _reason(bytes(data)) == "size_mismatch"


@pytest.mark.parametrize(
    ("sections", "reason"),
    [
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA), (R, b"r", 1)], "section_flags"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA), (6, b"r")], "unknown_section_type"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA), (0, b"r")], "unknown_section_type"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA)], "missing_section"),
        ([(K, b"k"), (C, b"c"), (R, b"r"), (M, TV1_METADATA)], "section_order"),
        ([(C, b"c"), (K, b"k"), (M, TV1_METADATA), (R, b"r")], "section_order"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA), (R, b"r"), (K, b"k")], "duplicate_section"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA), (M, TV1_METADATA), (R, b"r")], "duplicate_section"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA), (S, b"\x80"), (R, b"r")], "section_order"),
        ([(K, b"k"), (C, b"c"), (M, b"{"), (R, b"r")], "invalid_metadata"),
        ([(K, b"k"), (C, b"c"), (M, b"\xff"), (R, b"r")], "invalid_metadata"),
        ([(K, b"k"), (C, b"c"), (M, b'{"ImageName":"x"}'), (R, b"r")], "invalid_metadata"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA.replace(b',"CustomMetadata":{"k":"v"}', b"")), (R, b"r")],
         "invalid_metadata"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA.replace(b'{"k":"v"}', b"[1]")), (R, b"r")], "invalid_metadata"),
        ([(K, b"k"), (C, b"c" * 70000), (M, TV1_METADATA), (R, b"r")], "section_too_large"),
        ([(K, b"k"), (C, b"c"), (M, TV1_METADATA), (R, b"r"), (S, b"\x80")], "invalid_signature"),
    ],
)
def test_read_eif_rejects_bad_sections(sections: list[tuple[int, bytes]], reason: str) -> None:
    assert _reason(_raw_eif(sections)) == reason


def test_read_eif_error_names_the_check() -> None:
    with pytest.raises(InvalidEif) as err:
        read_eif(io.BytesIO(_raw_eif(STANDARD, crc=0)))
    assert err.value.code == "invalid_eif"
    assert "CRC mismatch" in err.value.message and "0xe7696213" in err.value.message


def test_iter_section_data_detects_changed_file(tmp_path: Path, tv1: bytes) -> None:
    path = tmp_path / "x.eif"
    path.write_bytes(tv1)
    info = read_eif(path)
    assert b"".join(iter_section_data(path, info.ramdisks[1], chunk_size=3)) == b"RAMDISK1"
    # Rewritten with a longer kernel: byte 884 is no longer ramdisk 1's header.
    path.write_bytes(_raw_eif([(K, b"KERNEL!!"), (C, b"console=ttyS0"), (M, TV1_METADATA), (R, b"RAMDISK0"),
                               (R, b"RAMDISK1")]))
    with pytest.raises(InvalidEif) as err:
        list(iter_section_data(path, info.ramdisks[1]))
    assert err.value.details["reason"] == "section_changed"


# --- signature section (read side) ---------------------------------------------------------------------------


def _cbor_head(major: int, n: int) -> bytes:
    if n < 24:
        return bytes([major << 5 | n])
    if n < 256:
        return bytes([major << 5 | 24, n])
    return bytes([major << 5 | 25]) + n.to_bytes(2, "big")


def _cbor_byte_array(data: bytes) -> bytes:
    return _cbor_head(4, len(data)) + b"".join(_cbor_head(0, b) for b in data)


def _cbor_text(text: bytes) -> bytes:
    return _cbor_head(3, len(text)) + text


def _test_certificate() -> tuple[bytes, bytes]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nitroconv test signer")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(datetime.datetime(2024, 1, 1, tzinfo=datetime.UTC))
            .not_valid_after(datetime.datetime(2034, 1, 1, tzinfo=datetime.UTC)).sign(key, hashes.SHA384()))
    return cert.public_bytes(serialization.Encoding.PEM), cert.public_bytes(serialization.Encoding.DER)


def test_read_eif_measures_pcr8_from_signature_certificate(tmp_path: Path) -> None:
    pem, der = _test_certificate()
    signature = (_cbor_head(4, 1) + _cbor_head(5, 2) + _cbor_text(b"signing_certificate") + _cbor_byte_array(pem)
                 + _cbor_text(b"signature") + _cbor_byte_array(b"\x84\x44\xa1\x01\x38\x22\xa0"))
    assert signature.startswith(b"\x81\xa2\x73signing_certificate\x99")  # the prefix EIF.md §8 TV2 shows
    path = tmp_path / "signed.eif"
    path.write_bytes(_raw_eif([*STANDARD, (S, signature)]))

    info = read_eif(path)

    assert info.measurements == Measurements(TV1_PCRS.pcr0, TV1_PCRS.pcr1, TV1_PCRS.pcr2, _expected_pcr(der))
    assert info.is_signed and info.signing_certificate == pem
    described = describe_eif(path)
    assert described["IsSigned"] is True
    assert described["Measurements"]["PCR8"] == _expected_pcr(der)  # type: ignore[index]


# --- describe-eif ---------------------------------------------------------------------------------------------


def test_describe_eif_has_nitro_cli_shape(tv1: bytes) -> None:
    described = describe_eif(VECTOR)
    assert list(described) == ["EifVersion", "Measurements", "IsSigned", "CheckCRC", "ImageName", "ImageVersion",
                               "Metadata"]
    assert described == {
        "EifVersion": 4,
        "Measurements": {"HashAlgorithm": "Sha384 { ... }", "PCR0": TV1_PCRS.pcr0, "PCR1": TV1_PCRS.pcr1,
                         "PCR2": TV1_PCRS.pcr2},
        "IsSigned": False,
        "CheckCRC": True,
        "ImageName": "test-image",
        "ImageVersion": "1.0",
        "Metadata": {"BuildTime": "1970-01-01T00:00:00+00:00", "BuildTool": "eif_verify-selftest",
                     "BuildToolVersion": "0.0.0", "OperatingSystem": "Linux", "KernelVersion": "0.0.0",
                     "DockerInfo": None, "k": "v"},
    }
    metadata = described["Metadata"]
    assert isinstance(metadata, dict)
    assert list(metadata) == ["BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion",
                              "DockerInfo", "k"]


def test_describe_eif_reports_crc_mismatch_instead_of_refusing(tmp_path: Path, tv1: bytes) -> None:
    data = bytearray(tv1)
    data[548 + 12] ^= 0x20  # "KERNEL" -> "kERNEL": only the CRC notices
    path = tmp_path / "bad.eif"
    path.write_bytes(bytes(data))
    described = describe_eif(path)
    assert described["CheckCRC"] is False
    assert described["Measurements"]["PCR0"] == _expected_pcr(b"kERNELconsole=ttyS0RAMDISK0RAMDISK1")  # type: ignore[index]
    with pytest.raises(InvalidEif):
        read_eif(path)
    with pytest.raises(InvalidEif):  # structural defects are still refused
        describe_eif(io.BytesIO(_raw_eif(STANDARD, version=3)))


# --- metadata --------------------------------------------------------------------------------------------------


def _metadata(docker_info: object = None, custom: object | None = None, **overrides: str) -> bytes:
    fields = {"image_name": "img", "image_version": "v", "build_time": "t", "build_tool_version": "1",
              "operating_system": "Linux", "kernel_version": "6.1"}
    fields.update(overrides)
    return build_metadata(docker_info=docker_info, custom=custom, **fields)


def test_build_metadata_keeps_struct_order_and_sorts_value_maps() -> None:
    docker_info = {"Id": "sha256:ab", "Config": {"Env": ["A=1"], "Cmd": ["sh"]}, "Architecture": "amd64"}
    raw = _metadata(docker_info, {"zeta": 1, "alpha": [True, False, None]})
    assert raw == (
        b'{"ImageName":"img","ImageVersion":"v","BuildMetadata":{"BuildTime":"t","BuildTool":"nitroconv",'
        b'"BuildToolVersion":"1","OperatingSystem":"Linux","KernelVersion":"6.1"},'
        b'"DockerInfo":{"Architecture":"amd64","Config":{"Cmd":["sh"],"Env":["A=1"]},"Id":"sha256:ab"},'
        b'"CustomMetadata":{"alpha":[true,false,null],"zeta":1}}'
    )
    assert json.loads(raw)["DockerInfo"] == docker_info


def test_build_metadata_escapes_strings_as_serde_json() -> None:
    raw = _metadata({"s": "é\u2028\"\\/\n\t\x01\x7f"}, image_name="名前")
    assert '"ImageName":"名前"'.encode() in raw
    assert '{"s":"é\u2028\\"\\\\/\\n\\t\\u0001\x7f"}'.encode() in raw


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (1.0, "1.0"), (0.5, "0.5"), (-2.5, "-2.5"), (100.0, "100.0"), (0.0, "0.0"), (-0.0, "-0.0"),
        (1e15, "1000000000000000.0"), (1e16, "1e16"), (1.5e16, "1.5e16"), (123456.789, "123456.789"),
        (0.0001, "0.0001"), (1e-5, "0.00001"), (1.25e-5, "0.0000125"), (1e-6, "1e-6"), (1.5e-7, "1.5e-7"),
        (1.7976931348623157e308, "1.7976931348623157e308"), (5e-324, "5e-324"), (float("nan"), "null"),
        (float("inf"), "null"),
    ],
)
def test_build_metadata_formats_floats_as_serde_json(value: float, text: str) -> None:
    raw = _metadata(None, {"f": value})
    assert raw.endswith(b'"CustomMetadata":{"f":' + text.encode() + b"}}")


@pytest.mark.parametrize(
    "custom",
    [["not", "an", "object"], "text", {1: "int key"}, {"x": 1 << 64}, {"x": object()}, {"x": "\ud800"}],
)
def test_build_metadata_rejects_what_nitro_cli_cannot_read(custom: object) -> None:
    with pytest.raises(InvalidOptions):
        _metadata(None, custom)


def test_build_metadata_output_is_accepted_by_strict_reader() -> None:
    raw = _metadata({"Config": {"Labels": {"a": "b"}}}, {"team": "x"})
    out = io.BytesIO()
    write_eif(out, kernel=Section.of_bytes(b"k"), cmdline=b"c", metadata=raw, ramdisks=[Section.of_bytes(b"r")])
    assert read_eif(io.BytesIO(out.getvalue())).metadata["CustomMetadata"] == {"team": "x"}


@pytest.mark.parametrize(
    ("third_line", "expected"),
    [
        ("# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel Configuration", ("Linux", "4.14.256")),
        ("# Linux/x86 6.1.192 Kernel Configuration", ("Linux", "6.1.192")),
        ("# Linux/arm64 6.6.79 Kernel Configuration", ("Linux", "6.6.79")),
    ],
)
def test_kernel_info_from_config_takes_words_1_and_3(tmp_path: Path, third_line: str,
                                                     expected: tuple[str, str]) -> None:
    config = tmp_path / "bzImage.config"
    config.write_text(f"#\n# Automatically generated file; DO NOT EDIT.\n{third_line}\n#\nCONFIG_X=y\n")
    assert kernel_info_from_config(config) == expected


@pytest.mark.parametrize("content", ["#\n#\n", "#\n#\n# Linux\n", b"#\n#\n# \xff\xfe x y z\n"])
def test_kernel_info_from_config_rejects_unusable_config(tmp_path: Path, content: str | bytes) -> None:
    config = tmp_path / "bzImage.config"
    config.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InvalidBlobs):
        kernel_info_from_config(config)
    with pytest.raises(InvalidBlobs):
        kernel_info_from_config(tmp_path / "missing.config")
