"""Checking a written EIF without measuring it again: the writer's record, the CRC recomputed from the bytes as
they stream past, and `check_written` on the file (common/enclave/)."""
from __future__ import annotations

import hashlib
import random
import threading
from pathlib import Path

import pytest

from common.enclave.format import CRC_OFFSET, HEADER_SIZE
from common.enclave.reader import CrcOfStream, check_written, read_eif
from common.enclave.writer import Section, WrittenEif, write_eif
from common.errors import InvalidEif
from tests.fixtures.eif_vector import TV1_CRC, TV1_METADATA, TV1_PCRS, TV1_SHA256


def write(path: Path, ramdisk1: bytes = b"RAMDISK1") -> WrittenEif:
    with path.open("wb") as out:
        return write_eif(out, kernel=Section.of_bytes(b"KERNEL"), cmdline=b"console=ttyS0",
                                metadata=TV1_METADATA,
                                ramdisks=[Section.of_bytes(b"RAMDISK0"), Section.of_bytes(ramdisk1)])


def big_ramdisk() -> bytes:
    return random.Random(3).randbytes(3 << 20)


def test_eif_written_record_matches_the_conformance_vector(tmp_path: Path) -> None:
    path = tmp_path / "tv1.eif"
    written = write(path)
    data = path.read_bytes()
    assert hashlib.sha256(data).hexdigest() == TV1_SHA256
    assert (written.size, written.crc, written.header) == (len(data), TV1_CRC, data[:HEADER_SIZE])
    assert written.measurements == TV1_PCRS
    check_written(path, written)


def test_eif_written_pcrs_from_threads_equal_the_strict_readers(tmp_path: Path) -> None:
    """Several MiB through the PCR threads: the same values a fresh single pass of the reader finds."""
    path = tmp_path / "big.eif"
    written = write(path, big_ramdisk())
    assert read_eif(path).measurements == written.measurements
    assert not [t for t in threading.enumerate() if t.name.startswith("nitroconv-pcr")]


@pytest.mark.parametrize("piece", [1, 7, 544, 545, 548, 549, 4096, 1 << 20])
def test_eif_crc_of_stream_any_chunking(tmp_path: Path, piece: int) -> None:
    path = tmp_path / "tv1.eif"
    written = write(path)
    data = path.read_bytes()
    crc = CrcOfStream()
    for i in range(0, len(data), piece):
        crc.update(data[i:i + piece])
    assert crc.value == written.crc == int.from_bytes(data[CRC_OFFSET:HEADER_SIZE], "big")


def _mutate(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_eif_check_written_refuses_a_short_file(tmp_path: Path) -> None:
    path = tmp_path / "a.eif"
    written = write(path, big_ramdisk())
    with path.open("r+b") as f:
        f.truncate(written.size - 1)
    with pytest.raises(InvalidEif) as exc:
        check_written(path, written)
    assert exc.value.details["reason"] == "truncated"


@pytest.mark.parametrize(("offset", "reason"), [
    (8, "header_changed"),  # default_mem
    (HEADER_SIZE + 1, "unknown_section_type"),  # the kernel section's type
])
def test_eif_check_written_refuses_a_changed_header(tmp_path: Path, offset: int, reason: str) -> None:
    path = tmp_path / "a.eif"
    written = write(path)
    _mutate(path, offset)
    with pytest.raises(InvalidEif) as exc:
        check_written(path, written)
    assert exc.value.details["reason"] == reason


def test_eif_check_written_leaves_data_bytes_to_the_crc(tmp_path: Path) -> None:
    """A flipped data byte passes the layout check; the CRC of the bytes streamed past catches it."""
    path = tmp_path / "a.eif"
    written = write(path, big_ramdisk())
    _mutate(path, written.size - 100)
    check_written(path, written)
    crc = CrcOfStream()
    crc.update(path.read_bytes())
    assert crc.value != written.crc
