"""The EIF written header first (`write_eif(header_first=True)`): its CRC announced from the sections' own CRCs
before their bytes, the file written strictly in order (common/enclave/writer.py, common/enclave/cpio.py)."""
from __future__ import annotations

import hashlib
import io
import random
import stat
from pathlib import Path

import pytest
from isal.isal_zlib import crc32

from common.enclave.cpio import CpioArchive, CpioEntry
from common.enclave.reader import read_eif
from common.enclave.signing import EifSigner
from common.enclave.writer import Section, eif_spans, write_eif
from common.errors import InvalidEif
from tests.fixtures.eif_vector import TV1_CRC, TV1_METADATA, TV1_PCRS, TV1_SHA256


class _InOrder(io.RawIOBase):
    """An output that cannot seek: what it holds is exactly what was written, in order."""

    def __init__(self) -> None:
        super().__init__()
        self.data = bytearray()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def, override]
        self.data += b
        return len(b)


def _tv1(out: io.RawIOBase | io.BytesIO, *, header_first: bool, ramdisk1: Section | None = None):  # type: ignore[no-untyped-def]
    return write_eif(out, kernel=Section.of_bytes(b"KERNEL"), cmdline=b"console=ttyS0",  # type: ignore[arg-type]
                     metadata=TV1_METADATA,
                     ramdisks=[Section.of_bytes(b"RAMDISK0"), ramdisk1 or Section.of_bytes(b"RAMDISK1")],
                     header_first=header_first)


def test_header_first_writes_the_conformance_vector_in_order() -> None:
    out = _InOrder()
    written = _tv1(out, header_first=True)
    assert hashlib.sha256(out.data).hexdigest() == TV1_SHA256
    assert (written.crc, written.size, written.measurements) == (TV1_CRC, len(out.data), TV1_PCRS)
    assert written.header == bytes(out.data[:548])


def test_header_first_gives_the_same_file_and_record_as_the_header_last(tmp_path: Path) -> None:
    data = random.Random(5).randbytes(3 << 20)
    archive = CpioArchive([CpioEntry(name=b"big", mode=stat.S_IFREG | 0o644, size=len(data),
                                     data=lambda: io.BytesIO(data), crc=crc32(data))])
    first, last = _InOrder(), io.BytesIO()
    a = _tv1(first, header_first=True, ramdisk1=Section(archive.size, archive.chunks, crc=archive.crc32))
    b = _tv1(last, header_first=False, ramdisk1=Section(archive.size, archive.chunks, crc=archive.crc32))
    assert bytes(first.data) == last.getvalue()
    assert a == b
    path = tmp_path / "first.eif"
    path.write_bytes(first.data)
    assert read_eif(path).measurements == a.measurements


def test_header_first_spans_are_known_before_writing() -> None:
    kernel, ramdisk0 = Section.of_bytes(b"KERNEL", key="k"), Section.of_bytes(b"RAMDISK0", key="r0")
    ramdisks = [ramdisk0, Section.of_bytes(b"RAMDISK1")]
    spans = eif_spans(kernel=kernel, cmdline=b"console=ttyS0", metadata=TV1_METADATA, ramdisks=ramdisks)
    written = write_eif(_InOrder(), kernel=kernel, cmdline=b"console=ttyS0",  # type: ignore[arg-type]
                        metadata=TV1_METADATA, ramdisks=ramdisks, header_first=True)
    assert spans == written.spans and [s.key for s in spans] == ["k", ("bytes", b"console=ttyS0"), "r0"]


def test_header_first_refuses_content_that_does_not_have_the_announced_crc() -> None:
    """A section whose bytes differ from what its CRC said (content changed while read): the error comes after
    the last byte, so whoever took the bytes must drop them."""
    lying = Section(8, lambda: [b"RAMDISK1"], crc=lambda: crc32(b"RAMDISK2"))
    with pytest.raises(InvalidEif) as err:
        _tv1(_InOrder(), header_first=True, ramdisk1=lying)
    assert err.value.details["reason"] == "crc_mismatch"


def test_header_first_needs_every_crc_and_no_signer(tmp_path: Path) -> None:
    with pytest.raises(InvalidEif) as err:
        _tv1(_InOrder(), header_first=True, ramdisk1=Section(8, lambda: [b"RAMDISK1"]))
    assert err.value.details["reason"] == "no_crc"
    signer = EifSigner.__new__(EifSigner)  # never asked to sign: refused before any byte
    with pytest.raises(InvalidEif) as err:
        write_eif(_InOrder(), kernel=Section.of_bytes(b"k"), cmdline=b"c", metadata=TV1_METADATA,  # type: ignore[arg-type]
                  ramdisks=[Section.of_bytes(b"r")], signer=signer, header_first=True)
    assert err.value.details["reason"] == "signed_header_first"


def test_file_section_crc_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "kernel"
    path.write_bytes(b"bzImage" * 1000)
    section = Section.of_file(path, chunk_size=4096)
    assert section.crc is not None and section.crc() == crc32(path.read_bytes())
