"""The EIF writer (EIF.md §2, §5): sections laid out as nitro-cli's EifBuilder does, measured, CRC'd and
written in one pass."""
from __future__ import annotations

import os
import struct
from collections.abc import Callable, Hashable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from common.enclave.format import (
    CHUNK_SIZE,
    CMDLINE_MAX_SIZE,
    CRC_OFFSET,
    DEFAULT_CPUS,
    DEFAULT_MEM,
    EIF_MAGIC,
    EIF_VERSION,
    FLAG_ARCH_ARM64,
    HEADER_SIZE,
    HEADER_STRUCT,
    MAX_SECTIONS,
    SECTION_HEADER_SIZE,
    SECTION_HEADER_STRUCT,
    SIGNATURE_MAX_SIZE,
    U64_MAX,
    SectionType,
    crc32,
    crc32_combine,
)
from common.enclave.measure import Measurements, Measurer, pcr_of
from common.enclave.metadata import parse_metadata
from common.enclave.prefix import PREFIXES, MeasuredPrefix
from common.errors import InvalidEif
from common.util.memo import file_identity

if TYPE_CHECKING:
    from common.enclave.signing import EifSigner


def _bytes_chunks(data: bytes) -> Callable[[], Iterable[bytes]]:
    return lambda: (data,)


def _file_chunks(path: str | os.PathLike[str], chunk_size: int) -> Callable[[], Iterator[bytes]]:
    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as f:
            while piece := f.read(chunk_size):
                yield piece

    return chunks


@dataclass(frozen=True)
class Section:
    """Section content for the writer: its exact size up front, and a callable giving its bytes when written.

    A `CpioArchive` adapts as `Section(archive.size, archive.chunks, crc=archive.crc32)`.

    `key`, when given, names the content: equal keys promise equal bytes (a blob file's identity, say). When
    the kernel, the cmdline and ramdisk 0 all have one, the writer measures them once per process and then
    reuses that (common.enclave.prefix), and `WrittenEif.spans` tells later passes where such content lies.
    `crc`, when given, returns the CRC-32 the bytes will have, without necessarily reading them: with it on
    every section the header can be written first (`write_eif(header_first=True)`).
    """

    size: int
    chunks: Callable[[], Iterable[bytes]]
    key: Hashable | None = None
    crc: Callable[[], int] | None = None

    @classmethod
    def of_bytes(cls, data: bytes, *, key: Hashable | None = None) -> Section:
        data = bytes(data)
        return cls(len(data), _bytes_chunks(data), key, lambda: crc32(data))

    @classmethod
    def of_file(cls, path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> Section:
        """The file's current size; the writer fails if the file has changed size when it is read. Keyed by the
        file's identity (device, inode, size, change times), which any rewrite of the file changes."""
        identity = file_identity(path)
        chunks = _file_chunks(path, chunk_size)

        def crc() -> int:
            value = 0
            for piece in chunks():
                value = crc32(piece, value)
            return value

        return cls(identity[2], chunks, ("file", identity), crc)


def eif_size(*, kernel: int, cmdline: int, metadata: int, ramdisks: Sequence[int],
             signature: int | None = None) -> int:
    """Length of the EIF `write_eif` produces for sections of these data sizes (`signature` when signed)."""
    sizes = [kernel, cmdline, metadata, *ramdisks, *([] if signature is None else [signature])]
    return HEADER_SIZE + sum(SECTION_HEADER_SIZE + s for s in sizes)


def _write_all(out: BinaryIO, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = out.write(view)
        # Buffered files write everything; a raw stream may take less and say so.
        view = view[len(view) if n is None else n:]


def _writer_error(message: str, reason: str) -> InvalidEif:
    return InvalidEif(message, details={"reason": reason, "stage": "write"})


# `zlib.crc32(a + b)` from `crc32(a)`, `crc32(b)` and `len(b)`: the signature section's size is known only once

def _pack_header(*, flags: int, default_mem: int, default_cpus: int, sizes: Sequence[int], crc: int) -> bytes:
    offsets, pos = [], HEADER_SIZE
    for size in sizes:
        offsets.append(pos)
        pos += SECTION_HEADER_SIZE + size
    pad = [0] * (MAX_SECTIONS - len(sizes))
    return HEADER_STRUCT.pack(EIF_MAGIC, EIF_VERSION, flags, default_mem, default_cpus, 0, len(sizes),
                        *offsets, *pad, *sizes, *pad, 0, crc)


@dataclass(frozen=True)
class KnownSpan:
    """A keyed section's data in the written file: `size` bytes at `offset` whose content `key` names."""

    offset: int
    size: int
    key: Hashable


@dataclass(frozen=True)
class WrittenEif:
    """What the writer wrote: enough to check the file later without measuring it again (`check_written`)."""

    measurements: Measurements
    header: bytes  # the final 548 header bytes (section table and CRC included)
    size: int
    crc: int
    # Where sections with a key (`Section.key`) lie, so a later pass can reuse work done on the same content.
    spans: tuple[KnownSpan, ...] = ()


def _plan(kernel: Section, cmdline: bytes, metadata: bytes, ramdisks: Sequence[Section]
          ) -> list[tuple[SectionType, Section]]:
    return [(SectionType.KERNEL, kernel), (SectionType.CMDLINE, Section.of_bytes(cmdline, key=("bytes", cmdline))),
            (SectionType.METADATA, Section.of_bytes(metadata)),
            *((SectionType.RAMDISK, ramdisk) for ramdisk in ramdisks)]


def eif_spans(*, kernel: Section, cmdline: bytes, metadata: bytes, ramdisks: Sequence[Section]
              ) -> tuple[KnownSpan, ...]:
    """The `WrittenEif.spans` that `write_eif` will report for these sections, known before it writes a byte."""
    spans, offset = [], HEADER_SIZE
    for _, section in _plan(kernel, cmdline, metadata, ramdisks):
        if section.key is not None:
            spans.append(KnownSpan(offset + SECTION_HEADER_SIZE, section.size, section.key))
        offset += SECTION_HEADER_SIZE + section.size
    return tuple(spans)


def write_eif(
    out: BinaryIO,
    *,
    kernel: Section,
    cmdline: bytes,
    metadata: bytes,
    ramdisks: Sequence[Section],
    flags: int = 0,
    default_mem: int = DEFAULT_MEM,
    default_cpus: int = DEFAULT_CPUS,
    signer: EifSigner | None = None,
    header_first: bool = False,
) -> WrittenEif:
    """Write an EIF v4 exactly as nitro-cli's EifBuilder lays it out; return its PCRs, header, size and CRC.

    Sections go in nitro-cli's order (Kernel, Cmdline, Metadata, Ramdisk…, [Signature]), contiguous from
    byte 548 of the EIF, which starts at `out`'s current position. With a `signer`, a signature section
    over PCR0 (EIF.md §4.2) comes last and the result has PCR8. Every section is read once: its bytes are written,
    hashed into the PCRs and added to the CRC in the same pass; the CRC is then written into the header,
    so `out` must be seekable. A section whose chunks do not add up to its declared size raises
    `InvalidEif` (the output is then incomplete and must be discarded).

    `header_first` (unsigned EIFs whose every section gives its `crc`): the final header is written first and
    `out` is written strictly in order, once, so it need not be seekable (a consumer can take the EIF as it is
    made: the output layer). The CRC of the bytes written must then equal the one announced, else `InvalidEif`
    (reason `crc_mismatch`) after the last byte: whatever `out` received must be discarded.
    """
    if not ramdisks:
        raise _writer_error("an EIF needs at least one ramdisk", "missing_section")
    if b"\0" in cmdline:
        # nitro-cli passes the command line through CString::new, which refuses interior NULs.
        raise _writer_error("kernel command line contains NUL", "invalid_cmdline")
    if len(cmdline) > CMDLINE_MAX_SIZE:
        raise _writer_error(f"kernel command line longer than {CMDLINE_MAX_SIZE} bytes", "section_too_large")
    parse_metadata(metadata, stage="write")  # never write what the strict reader would refuse
    planned = _plan(kernel, cmdline, metadata, ramdisks)
    return _write_sections(out, planned, flags=flags, default_mem=default_mem, default_cpus=default_cpus,
                           signer=signer, header_first=header_first)


def _announced_crc(planned: Sequence[tuple[SectionType, Section]], known: dict[int, int]) -> int:
    """The CRC-32 of everything after the header, from the sections' own CRCs (the prefix's when memoised)."""
    crc = 0
    for index, (kind, section) in enumerate(planned):
        crc = crc32(SECTION_HEADER_STRUCT.pack(kind, 0, section.size), crc)
        value = known.get(index)
        if value is None:
            if section.crc is None:
                raise _writer_error(f"section {index} ({kind.label}) has no CRC to write the header first",
                                    "no_crc")
            value = section.crc()
        crc = crc32_combine(crc, value, section.size)
    return crc


def _write_sections(out: BinaryIO, planned: Sequence[tuple[SectionType, Section]], *, flags: int,
                    default_mem: int, default_cpus: int, signer: EifSigner | None = None,
                    header_first: bool = False) -> WrittenEif:
    count = len(planned) + (signer is not None)
    if count > MAX_SECTIONS:
        raise _writer_error(f"{count} sections; an EIF holds at most {MAX_SECTIONS}", "too_many_sections")
    if flags & ~FLAG_ARCH_ARM64 or flags < 0:
        raise _writer_error(f"header flags {flags:#x}: only bit 0 (arm64) is defined", "bad_flags")
    for label, value in (("default_mem", default_mem), ("default_cpus", default_cpus)):
        if not 0 <= value <= U64_MAX:
            raise _writer_error(f"{label}={value} does not fit in 64 bits", "field_overflow")
    for kind, section in planned:
        if not 0 <= section.size <= U64_MAX:
            raise _writer_error(f"{kind.label} size {section.size} does not fit in 64 bits", "field_overflow")
    if header_first and signer is not None:
        raise _writer_error("a signed EIF's header is final only after its signature", "signed_header_first")
    if not header_first and not out.seekable():
        raise _writer_error("the EIF CRC is written last into the header, so the output must be seekable",
                            "unseekable_output")

    prefix_key = _prefix_key(planned)
    prefix = PREFIXES.get(prefix_key) if prefix_key is not None else None
    known_crcs = dict(zip(_PREFIX_INDEXES, prefix.crcs, strict=True)) if prefix is not None else {}
    announced: bytes | None = None
    if header_first:
        body_crc = _announced_crc(planned, known_crcs)
        body = sum(SECTION_HEADER_SIZE + section.size for _, section in planned)
        unsealed = _pack_header(flags=flags, default_mem=default_mem, default_cpus=default_cpus,
                                sizes=[section.size for _, section in planned], crc=0)
        announced = unsealed[:CRC_OFFSET] + struct.pack(
            ">I", crc32_combine(crc32(unsealed[:CRC_OFFSET]), body_crc, body))
        _write_all(out, announced)
    else:
        start = out.tell()
        _write_all(out, b"\0" * HEADER_SIZE)  # the real header once every size, and so the CRC, is known
    crc, length = 0, 0  # CRC and length of everything after the header
    measurer = Measurer(prefix)
    prefix_crcs: list[int] = []  # measured here, for the memo
    sizes: list[int] = []
    spans: list[KnownSpan] = []

    def emit(index: int, kind: SectionType, section: Section) -> None:
        nonlocal crc, length
        section_header = SECTION_HEADER_STRUCT.pack(kind, 0, section.size)
        crc = crc32(section_header, crc)
        _write_all(out, section_header)
        if section.key is not None:
            spans.append(KnownSpan(HEADER_SIZE + length + SECTION_HEADER_SIZE, section.size, section.key))
        known = known_crcs.get(index)
        # A section of the prefix is measured (and its CRC kept) only while the memo does not hold it.
        track = prefix_key is not None and known is None and index in _PREFIX_INDEXES
        if known is None:
            measurer.begin(kind)
        written, data_crc = 0, 0
        for chunk in section.chunks():
            written += len(chunk)
            if written > section.size:
                raise _writer_error(f"section {index} ({kind.label}) yields more than its size {section.size}",
                                    "size_mismatch")
            if known is None:
                # The PCR threads hash this chunk while it is written and the next one is produced.
                measurer.update(chunk)
                crc = crc32(chunk, crc)
                if track:
                    data_crc = crc32(chunk, data_crc)
            _write_all(out, chunk)
        if written != section.size:
            raise _writer_error(f"section {index} ({kind.label}) yields {written} bytes, declared {section.size}",
                                "size_mismatch")
        if known is not None:
            crc = crc32_combine(crc, known, section.size)
        elif track:
            prefix_crcs.append(data_crc)
        sizes.append(section.size)
        length += SECTION_HEADER_SIZE + section.size

    try:
        for index, (kind, section) in enumerate(planned):
            emit(index, kind, section)
        if signer is not None:
            # PCR0 does not cover the signature section, so it is final here; the signature signs it.
            signature = signer.signature_section(bytes.fromhex(measurer.finish().pcr0))
            if len(signature) > SIGNATURE_MAX_SIZE:
                raise _writer_error(f"signature section of {len(signature)} bytes exceeds {SIGNATURE_MAX_SIZE} "
                                    "(is the certificate file very large?)", "section_too_large")
            emit(len(planned), SectionType.SIGNATURE, Section.of_bytes(signature))
            measurer.pcr8 = pcr_of(signer.certificate_der)
        measurements = measurer.finish()
        state = measurer.bootstrap_state()
        if prefix_key is not None and prefix is None and state is not None:
            PREFIXES.put(prefix_key, MeasuredPrefix(state.copy(), tuple(prefix_crcs)))
    finally:
        measurer.close()
    header = _pack_header(flags=flags, default_mem=default_mem, default_cpus=default_cpus, sizes=sizes, crc=0)
    crc = crc32_combine(crc32(header[:CRC_OFFSET]), crc, length)
    header = header[:CRC_OFFSET] + struct.pack(">I", crc)
    if announced is not None:
        if header != announced:
            raise _writer_error("the sections' bytes do not have the CRC announced in the header written first "
                                "(content changed while it was read?)", "crc_mismatch")
        return WrittenEif(measurements, header, HEADER_SIZE + length, crc, tuple(spans))
    end = out.tell()
    out.seek(start)
    _write_all(out, header)
    out.seek(end)
    return WrittenEif(measurements, header, end - start, crc, tuple(spans))


# PCR1's sections in `write_eif`'s plan: kernel, cmdline and ramdisk 0 (the metadata between them is not measured).
_PREFIX_INDEXES = (0, 1, 3)


def _prefix_key(planned: Sequence[tuple[SectionType, Section]]) -> Hashable | None:
    """The memo key of the plan's measured prefix, when every section of it has a key and ramdisks follow it."""
    if len(planned) <= max(_PREFIX_INDEXES) + 1:
        return None
    parts = [planned[i] for i in _PREFIX_INDEXES]
    if [kind for kind, _ in parts] != [SectionType.KERNEL, SectionType.CMDLINE, SectionType.RAMDISK]:
        return None
    if any(section.key is None for _, section in parts):
        return None
    return tuple((kind, section.size, section.key) for kind, section in parts)
