"""The strict EIF reader (EIF.md §2, §6): one streaming pass that checks every field nitro-cli would, measures
the PCRs and recomputes the CRC; the check of a file just written; describe-eif's JSON."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import BinaryIO

from common.enclave.format import (
    CHUNK_SIZE,
    CMDLINE_MAX_SIZE,
    CRC_OFFSET,
    EIF_MAGIC,
    EIF_VERSION,
    FLAG_ARCH_ARM64,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAX_SECTIONS,
    METADATA_MAX_SIZE,
    SECTION_HEADER_SIZE,
    SECTION_HEADER_STRUCT,
    SIGNATURE_MAX_SIZE,
    EifSource,
    SectionType,
    crc32,
)
from common.enclave.measure import Measurements, Measurer
from common.enclave.metadata import BUILD_FIELDS, parse_metadata
from common.enclave.signature import SignatureInfo, certificate_description, signature_info
from common.enclave.writer import WrittenEif
from common.errors import InvalidEif
from common.util.exactread import ExactReader


class CrcOfStream:
    """An EIF's CRC recomputed from its bytes as they stream past from the first one (the stored CRC field is
    skipped, as the format says); for checking a written file while another pass reads it anyway."""

    def __init__(self) -> None:
        self.value = 0
        self.offset = 0

    def update(self, data: bytes) -> None:
        start, end = self.offset, self.offset + len(data)
        if start < HEADER_SIZE and end > CRC_OFFSET:
            view = memoryview(data)
            self.value = crc32(view[:max(CRC_OFFSET - start, 0)], self.value)
            self.value = crc32(view[max(HEADER_SIZE - start, 0):], self.value)
        else:
            self.value = crc32(data, self.value)
        self.offset = end


def check_written(path: str | os.PathLike[str], written: WrittenEif) -> None:
    """Check the file at `path` against what the writer says it wrote, without reading the sections' data.

    The bytes themselves are checked by their CRC (`CrcOfStream`, equal to `written.crc`) where a later pass
    reads them anyway. Here: the size; the header, byte for byte (so its table, memory, CPUs and CRC); and
    each section header, order and small section (metadata parsed, signature verified against PCR0) as
    the strict reader checks them. Raises `InvalidEif` with `details["reason"]` like the reader's.
    """
    with open(path, "rb") as stream:
        total = os.fstat(stream.fileno()).st_size
        if total != written.size:
            raise _fail(f"file is {total} bytes, the writer wrote {written.size}", "truncated" if total < written.size
                        else "trailing_bytes", offset=total)
        src = _Input(stream)
        header = src.read_exact(HEADER_SIZE, "the EIF header")
        if header != written.header:
            raise _fail("the header read back differs from the header written", "header_changed")
        h = _Header.unpack(header)
        _check_header(h)
        seen: list[SectionType] = []
        kept: dict[SectionType, bytes] = {}
        for i in range(h.count):
            stream.seek(h.offsets[i])
            type_value, section_flags, size = SECTION_HEADER_STRUCT.unpack(
                _Input(stream).read_exact(SECTION_HEADER_SIZE, f"section {i} header"))
            if type_value not in SectionType._value2member_map_ or type_value == SectionType.INVALID:
                raise _fail(f"section {i} has unknown type {type_value}", "unknown_section_type", section=i)
            kind = SectionType(type_value)
            if section_flags or size != h.sizes[i]:
                raise _fail(f"section {i} ({kind.label}) header does not match the table", "size_mismatch",
                            section=i)
            _check_order(i, kind, seen)
            seen.append(kind)
            cap = _BUFFERED_CAPS.get(kind)
            if cap is not None:
                if size > cap:
                    raise _fail(f"{kind.label} section is {size} bytes, more than {cap}", "section_too_large",
                                section=i)
                kept[kind] = _Input(stream).read_exact(size, f"section {i} ({kind.label}) data")
    if SectionType.RAMDISK not in seen or SectionType.METADATA not in kept:
        raise _fail("no Ramdisk or Metadata section", "missing_section")
    parse_metadata(kept[SectionType.METADATA], stage="read")
    if SectionType.SIGNATURE in kept:
        signature = signature_info(kept[SectionType.SIGNATURE], written.measurements.pcr0)
        if signature.pcr8 != written.measurements.pcr8 or not signature.check:
            raise _fail("the signature read back does not verify PCR0 with the certificate written",
                        "invalid_signature")


@dataclass(frozen=True)
class EifSection:
    """Where a section is: `offset` of its 12-byte header (as in the EIF header table), `size` of its data."""

    index: int
    type: SectionType
    offset: int
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE


@dataclass(frozen=True)
class EifInfo:
    """Everything the strict reader learnt from one pass over an EIF."""

    version: int
    flags: int
    default_mem: int
    default_cpus: int
    sections: tuple[EifSection, ...]
    measurements: Measurements
    metadata: Mapping[str, object]
    cmdline: bytes
    stored_crc: int
    computed_crc: int
    size: int
    signature: SignatureInfo | None = None

    @property
    def signing_certificate(self) -> bytes | None:
        return self.signature.certificate_pem if self.signature is not None else None

    @property
    def crc_ok(self) -> bool:
        return self.stored_crc == self.computed_crc

    @property
    def arch(self) -> str:
        return "aarch64" if self.flags & FLAG_ARCH_ARM64 else "x86_64"

    @property
    def is_signed(self) -> bool:
        return self.signature is not None

    @property
    def kernel(self) -> EifSection:
        return next(s for s in self.sections if s.type == SectionType.KERNEL)

    @property
    def ramdisks(self) -> tuple[EifSection, ...]:
        return tuple(s for s in self.sections if s.type == SectionType.RAMDISK)


def _fail(message: str, reason: str, **details: object) -> InvalidEif:
    return InvalidEif(message, details={"reason": reason, **details})


class _Input(ExactReader):
    def __init__(self, stream: BinaryIO) -> None:
        super().__init__(stream, lambda what, at: _fail(f"file truncated in {what}: ends at byte {at}", "truncated",
                                                        offset=at))


@contextlib.contextmanager
def _opened(source: EifSource) -> Iterator[BinaryIO]:
    if isinstance(source, str | os.PathLike):
        with open(source, "rb") as f:
            yield f
    else:
        yield source


def _remaining_length(stream: BinaryIO) -> int | None:
    try:
        if not stream.seekable():
            return None
        here = stream.tell()
        end = stream.seek(0, os.SEEK_END)
        stream.seek(here)
        return end - here
    except OSError:
        return None


@dataclass(frozen=True)
class _Header:
    magic: bytes
    version: int
    flags: int
    default_mem: int
    default_cpus: int
    reserved: int
    count: int
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    unused: int
    crc: int

    @classmethod
    def unpack(cls, raw: bytes) -> _Header:
        f = HEADER_STRUCT.unpack(raw)
        n = MAX_SECTIONS
        return cls(f[0], f[1], f[2], f[3], f[4], f[5], f[6], tuple(f[7:7 + n]), tuple(f[7 + n:7 + 2 * n]),
                   f[7 + 2 * n], f[8 + 2 * n])


def _check_header(h: _Header) -> None:
    if h.magic != EIF_MAGIC:
        raise _fail(f"bad magic {h.magic!r}, expected {EIF_MAGIC!r}", "bad_magic")
    # Only v4: it is what nitro-cli has written since 1.2.0 (2022), the only version whose metadata
    # section is mandatory, and the minimum QEMU's nitro-enclave loader (our boot check) accepts.
    if h.version != EIF_VERSION:
        raise _fail(f"EIF version {h.version} is not supported (only {EIF_VERSION})", "unsupported_version")
    if h.flags & ~FLAG_ARCH_ARM64:
        raise _fail(f"header flags {h.flags:#06x} set undefined bits (only bit 0, arm64, is defined)", "bad_flags")
    if h.reserved or h.unused:
        raise _fail("reserved header fields are not zero", "reserved_nonzero")
    if not 1 <= h.count <= MAX_SECTIONS:
        raise _fail(f"num_sections is {h.count}, must be 1..{MAX_SECTIONS}", "bad_section_count")
    if any(h.offsets[h.count:]) or any(h.sizes[h.count:]):
        raise _fail(f"section table has entries beyond num_sections={h.count}", "table_nonzero_tail")
    expected = HEADER_SIZE
    for i in range(h.count):
        if h.offsets[i] != expected:
            how = "gap before" if h.offsets[i] > expected else "overlap with the previous section at"
            raise _fail(f"section {i} offset is {h.offsets[i]}, expected {expected} ({how} it): sections must be "
                        "contiguous from byte 548", "offset_mismatch", section=i)
        expected += SECTION_HEADER_SIZE + h.sizes[i]


def _check_order(index: int, kind: SectionType, seen: list[SectionType]) -> None:
    if kind in (SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA, SectionType.SIGNATURE) \
            and kind in seen:
        raise _fail(f"section {index}: second {kind.label} section", "duplicate_section", section=index)
    position_kind = (SectionType.KERNEL, SectionType.CMDLINE, SectionType.METADATA)
    if index < 3:
        ok = kind == position_kind[index]
    elif kind == SectionType.RAMDISK:
        ok = SectionType.SIGNATURE not in seen
    else:
        ok = kind == SectionType.SIGNATURE and SectionType.RAMDISK in seen
    if not ok:
        raise _fail(f"section {index} is {kind.label}; nitro-cli's order is Kernel, Cmdline, Metadata, "
                    "Ramdisk..., [Signature]", "section_order", section=index)


_BUFFERED_CAPS = {
    SectionType.CMDLINE: CMDLINE_MAX_SIZE,
    SectionType.METADATA: METADATA_MAX_SIZE,
    SectionType.SIGNATURE: SIGNATURE_MAX_SIZE,
}


def _read(source: EifSource, *, strict_crc: bool) -> EifInfo:
    measurer = Measurer()
    try:
        return _read_measured(source, strict_crc=strict_crc, measurer=measurer)
    finally:
        measurer.close()


def _read_measured(source: EifSource, *, strict_crc: bool, measurer: Measurer) -> EifInfo:
    with _opened(source) as stream:
        total = _remaining_length(stream)
        src = _Input(stream)
        header = src.read_exact(HEADER_SIZE, "the EIF header")
        h = _Header.unpack(header)
        _check_header(h)
        count, offsets, sizes = h.count, h.offsets, h.sizes
        expected_end = offsets[count - 1] + SECTION_HEADER_SIZE + sizes[count - 1]
        if total is not None and total < expected_end:
            raise _fail(f"file is {total} bytes, its section table needs {expected_end}", "truncated", offset=total)
        if total is not None and total > expected_end:
            raise _fail(f"{total - expected_end} trailing bytes after the last section", "trailing_bytes")

        crc = crc32(header[:CRC_OFFSET])
        kept: dict[SectionType, bytes] = {}
        seen: list[SectionType] = []
        sections: list[EifSection] = []
        for i in range(count):
            raw = src.read_exact(SECTION_HEADER_SIZE, f"section {i} header")
            type_value, section_flags, size = SECTION_HEADER_STRUCT.unpack(raw)
            if type_value not in SectionType._value2member_map_ or type_value == SectionType.INVALID:
                raise _fail(f"section {i} has unknown type {type_value}", "unknown_section_type", section=i)
            kind = SectionType(type_value)
            if section_flags:
                raise _fail(f"section {i} ({kind.label}) has flags {section_flags:#06x}, must be 0",
                            "section_flags", section=i)
            if size != sizes[i]:
                raise _fail(f"section {i} ({kind.label}) header says {size} bytes, the header table {sizes[i]}",
                            "size_mismatch", section=i)
            _check_order(i, kind, seen)
            cap = _BUFFERED_CAPS.get(kind)
            if cap is not None and size > cap:
                raise _fail(f"{kind.label} section is {size} bytes, more than {cap}", "section_too_large", section=i)
            seen.append(kind)
            sections.append(EifSection(i, kind, offsets[i], size))
            crc = crc32(raw, crc)
            measurer.begin(kind)
            parts: list[bytes] = []
            for chunk in src.chunks(size, f"section {i} ({kind.label}) data"):
                crc = crc32(chunk, crc)
                measurer.update(chunk)
                if cap is not None:
                    parts.append(chunk)
            if cap is not None:
                kept[kind] = b"".join(parts)
        if not src.at_eof():
            raise _fail("trailing bytes after the last section", "trailing_bytes")
        if SectionType.RAMDISK not in seen:
            raise _fail("no Ramdisk section (an EIF needs Kernel, Cmdline, Metadata and at least one Ramdisk)",
                        "missing_section")

    stored_crc = h.crc
    if strict_crc and stored_crc != crc:
        raise _fail(f"CRC mismatch: header says {stored_crc:#010x}, content gives {crc:#010x}", "crc_mismatch")
    metadata = parse_metadata(kept[SectionType.METADATA], stage="read")
    signature = None
    if SectionType.SIGNATURE in kept:
        signature = signature_info(kept[SectionType.SIGNATURE], measurer.finish().pcr0)
        measurer.pcr8 = signature.pcr8
    return EifInfo(
        version=h.version, flags=h.flags, default_mem=h.default_mem, default_cpus=h.default_cpus,
        sections=tuple(sections), measurements=measurer.finish(), metadata=metadata,
        cmdline=kept[SectionType.CMDLINE], stored_crc=stored_crc, computed_crc=crc, size=expected_end,
        signature=signature,
    )


def read_eif(source: EifSource) -> EifInfo:
    """Read and verify an EIF in one streaming pass; any deviation raises `InvalidEif`.

    `source` is a path or a binary stream positioned at the EIF's first byte. Checked: magic, version 4,
    header flags (bit 0 only), reserved fields zero, 1..32 sections with the unused table entries zero,
    sections contiguous from byte 548 exactly as the table says (no gap, overlap or trailing byte),
    section flags zero, known types in nitro-cli's order (Kernel, Cmdline, Metadata, Ramdisk…,
    [Signature]), metadata JSON of the shape nitro-cli reads, the signature's certificate, and the CRC.
    `details["reason"]` of the error is a stable lower_snake string naming the failed check.
    """
    return _read(source, strict_crc=True)


def iter_section_data(source: EifSource, section: EifSection, *, base: int = 0,
                      chunk_size: int = CHUNK_SIZE) -> Iterator[bytes]:
    """Stream one section's data, e.g. to hand the kernel, cmdline and ramdisks to a boot check.

    `base` is where the EIF starts in a stream (0 for a file). The section header found there is checked
    against `section`, in case the file changed since it was read.
    """
    with _opened(source) as stream:
        stream.seek(base + section.offset)
        src = _Input(stream)
        kind, flags, size = SECTION_HEADER_STRUCT.unpack(src.read_exact(SECTION_HEADER_SIZE, "a section header"))
        if (kind, flags, size) != (section.type, 0, section.size):
            raise _fail(f"section {section.index} header changed since the file was read", "section_changed",
                        section=section.index)
        remaining = size
        while remaining:
            piece = src.read_exact(min(chunk_size, remaining), f"section {section.index} data")
            remaining -= len(piece)
            yield piece


def describe_eif(source: EifSource) -> dict[str, object]:
    """What `nitro-cli describe-eif` prints, for the fields we reproduce (EIF.md §6.2).

    Like nitro-cli, a CRC mismatch is reported (`"CheckCRC": false`) rather than refused, and so is a
    signature that does not verify (`"SignatureCheck": false`); every other defect raises `InvalidEif`.
    `SigningCertificate` follows OpenSSL's print forms for names, algorithm and times.
    """
    info = _read(source, strict_crc=False)
    meta = info.metadata
    build = meta["BuildMetadata"]
    assert isinstance(build, dict)
    described: dict[str, object] = {key: build[key] for key in BUILD_FIELDS}
    described["DockerInfo"] = meta["DockerInfo"]
    custom = meta["CustomMetadata"]
    if isinstance(custom, dict):
        described.update(custom)  # serde(flatten): the custom keys sit beside the build fields
    result: dict[str, object] = {
        "EifVersion": info.version,
        "Measurements": info.measurements.registers(),
        "IsSigned": info.is_signed,
    }
    if info.signature is not None:
        result["SigningCertificate"] = certificate_description(info.signature.certificate_pem)
    result["CheckCRC"] = info.crc_ok
    if info.signature is not None:
        result["SignatureCheck"] = info.signature.check
    result.update({"ImageName": meta["ImageName"], "ImageVersion": meta["ImageVersion"], "Metadata": described})
    return result
