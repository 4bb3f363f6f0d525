"""The EIF v4 file format (EIF.md): single-pass writer, strict reader, PCR measurements and nitro-cli JSON shapes."""
from __future__ import annotations

import contextlib
import enum
import hashlib
import json
import math
import os
import re
import struct
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

from isal import isal_zlib

from common.eifprefix import PREFIXES, MeasuredPrefix
from common.errors import InvalidBlobs, InvalidEif, InvalidOptions
from common.exactread import ExactReader
from common.hashpipe import HashPipe
from common.memo import file_identity

if TYPE_CHECKING:
    from cryptography import x509

    from common.signing import EifSigner

EIF_MAGIC = b".eif"
EIF_VERSION = 4
HEADER_SIZE = 548
SECTION_HEADER_SIZE = 12
CRC_OFFSET = 544  # the CRC is the header's last field and is not part of its own input
MAX_SECTIONS = 32
FLAG_ARCH_ARM64 = 0x1
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2
CHUNK_SIZE = 1 << 20
# The image-format README caps the signature section; the other caps are ours. They bound what the
# reader holds in memory; a kernel accepts ~2 KiB of command line, and metadata is a few KiB of JSON.
SIGNATURE_MAX_SIZE = 32768
CMDLINE_MAX_SIZE = 64 * 1024
METADATA_MAX_SIZE = 16 * 1024 * 1024

# nitro-cli prints `format!("{:?}", Sha384::new())`. With sha2 0.9 (image-format <= 0.5, nitro-cli <= 1.4)
# that is "Sha384 { ... }", the string AWS documents for build-enclave and describe-eif; nitro-cli 1.5's
# sha2 0.10 would print "Sha512_48 { .. }" (EIF.md §6.3). We print the documented one, which is also
# what verifiers written against the AWS docs compare with.
HASH_ALGORITHM = "Sha384 { ... }"

_HEADER = struct.Struct(">4sHHQQHH32Q32QII")
_SECTION_HEADER = struct.Struct(">HHQ")
_U16_MAX = 0xFFFF
_U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_ZERO_PCR = b"\0" * 48
# zlib's CRC-32, computed with carry-less multiply by ISA-L: the same values at several GB/s.
_crc32 = isal_zlib.crc32
_JSON_MAX_DEPTH = 128  # serde_json's recursion limit: deeper metadata could not be read back by nitro-cli

EifSource = str | os.PathLike[str] | BinaryIO


class SectionType(enum.IntEnum):
    """EIF section types (EIF.md §2); values are the on-disk u16."""

    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5

    @property
    def label(self) -> str:
        return self.name.capitalize()


# --- measurements ------------------------------------------------------------------------------------------


class PcrHasher:
    """A PCR as nitro-cli computes it: SHA-384 of the streamed content, extended once into a zeroed register."""

    def __init__(self) -> None:
        self._inner = hashlib.sha384()

    def update(self, data: bytes) -> None:
        self._inner.update(data)

    def copy(self) -> PcrHasher:
        twin = PcrHasher()
        twin._inner = self._inner.copy()
        return twin

    def hexdigest(self) -> str:
        """`SHA384(0^48 || SHA384(content))` as 96 lowercase hex digits."""
        return hashlib.sha384(_ZERO_PCR + self._inner.digest()).hexdigest()


def pcr_of(content: bytes) -> str:
    """The PCR value of one blob (what `nitro-cli pcr --input FILE` prints)."""
    hasher = PcrHasher()
    hasher.update(content)
    return hasher.hexdigest()


@dataclass(frozen=True)
class Measurements:
    """PCR0 (kernel, cmdline, all ramdisks), PCR1 (kernel, cmdline, ramdisk 0), PCR2 (ramdisks 1..), PCR8 (cert)."""

    pcr0: str
    pcr1: str
    pcr2: str
    pcr8: str | None = None

    def registers(self) -> dict[str, str]:
        """`{"HashAlgorithm": …, "PCR0": …, …}`: the map nitro-cli prints (sorted keys, PCR8 only when signed)."""
        regs = {"HashAlgorithm": HASH_ALGORITHM, "PCR0": self.pcr0, "PCR1": self.pcr1, "PCR2": self.pcr2}
        if self.pcr8 is not None:
            regs["PCR8"] = self.pcr8
        return regs

    def to_nitro_cli(self) -> dict[str, dict[str, str]]:
        """The JSON object `nitro-cli build-enclave` prints on stdout."""
        return {"Measurements": self.registers()}


class _Measurer:
    """Feeds section data to the PCR hashers in one pass, in file order.

    PCR1's content (kernel, cmdline, ramdisk 0) is a prefix of PCR0's, because the writer and the
    strict reader both insist on nitro-cli's section order; so PCR1 is a snapshot of the PCR0 hasher
    taken when ramdisk 1 starts, and the bootstrap bytes are hashed once instead of twice.

    PCR0 and PCR2 each hash the app ramdisk, the bulk of the file, and SHA-384 has no instruction
    support here (SHA-256 has): each runs in a thread of its own (hashlib releases the GIL on large
    buffers), so the two hashes and the producer of the bytes share the cores. `close()` ends the
    threads on an error path; `finish()` ends them with the result.
    """

    def __init__(self, prefix: MeasuredPrefix | None = None) -> None:
        # From a prefix (kernel, cmdline and ramdisk 0 measured by an earlier EIF) the image hash goes on from
        # its state, and PCR1 is that state: the next section fed is ramdisk 1.
        self._image = HashPipe(prefix.state() if prefix else hashlib.sha384(), name="nitroconv-pcr0")
        self._app = HashPipe(hashlib.sha384(), name="nitroconv-pcr2")
        self._bootstrap: list[Any] = [prefix.state()] if prefix else []
        self._ramdisks = 1 if prefix else 0
        self._kind = SectionType.INVALID
        self._digests: tuple[str, str, str] | None = None
        self.pcr8: str | None = None

    def begin(self, kind: SectionType) -> None:
        if kind == SectionType.RAMDISK:
            if self._ramdisks == 1 and not self._bootstrap:
                self._image.call(lambda h: self._bootstrap.append(h.copy()))
            self._ramdisks += 1
        self._kind = kind

    def update(self, data: bytes) -> None:
        if self._digests is not None:
            return  # measured sections are over (the signature section is not measured)
        kind = self._kind
        if kind in (SectionType.KERNEL, SectionType.CMDLINE):
            self._image.update(data)
        elif kind == SectionType.RAMDISK:
            self._image.update(data)
            if self._ramdisks > 1:
                self._app.update(data)

    def bootstrap_state(self) -> Any | None:
        """The hash of kernel, cmdline and ramdisk 0 (PCR1's content) once `finish()` ran; None with one ramdisk."""
        return self._bootstrap[0] if self._bootstrap else None

    def finish(self) -> Measurements:
        if self._digests is None:
            image, app = self._image.finish(), self._app.finish()
            bootstrap = self._bootstrap[0] if self._bootstrap else image
            self._digests = (_extend(image), _extend(bootstrap), _extend(app))
        return Measurements(*self._digests, self.pcr8)

    def close(self) -> None:
        self._image.abort()
        self._app.abort()


def _extend(inner: Any) -> str:
    return hashlib.sha384(_ZERO_PCR + inner.digest()).hexdigest()


# --- sections and the writer -------------------------------------------------------------------------------


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

    A `CpioArchive` adapts as `Section(archive.size, archive.chunks)`.

    `key`, when given, names the content: equal keys promise equal bytes (a blob file's identity, say). When
    the kernel, the cmdline and ramdisk 0 all have one, the writer measures them once per process and then
    reuses that (common.eifprefix), and `WrittenEif.spans` tells later passes where such content lies.
    """

    size: int
    chunks: Callable[[], Iterable[bytes]]
    key: Hashable | None = None

    @classmethod
    def of_bytes(cls, data: bytes, *, key: Hashable | None = None) -> Section:
        return cls(len(data), _bytes_chunks(bytes(data)), key)

    @classmethod
    def of_file(cls, path: str | os.PathLike[str], *, chunk_size: int = CHUNK_SIZE) -> Section:
        """The file's current size; the writer fails if the file has changed size when it is read. Keyed by the
        file's identity (device, inode, size, change times), which any rewrite of the file changes."""
        identity = file_identity(path)
        return cls(identity[2], _file_chunks(path, chunk_size), ("file", identity))


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
# PCR0 is, after the ramdisks; so the header, first in the file and first in the CRC's input, is packed last and
# its CRC joined to the sections' CRC.
crc32_combine = isal_zlib.crc32_combine


def _pack_header(*, flags: int, default_mem: int, default_cpus: int, sizes: Sequence[int], crc: int) -> bytes:
    offsets, pos = [], HEADER_SIZE
    for size in sizes:
        offsets.append(pos)
        pos += SECTION_HEADER_SIZE + size
    pad = [0] * (MAX_SECTIONS - len(sizes))
    return _HEADER.pack(EIF_MAGIC, EIF_VERSION, flags, default_mem, default_cpus, 0, len(sizes),
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
) -> WrittenEif:
    """Write an EIF v4 exactly as nitro-cli's EifBuilder lays it out; return its PCRs, header, size and CRC.

    Sections go in nitro-cli's order (Kernel, Cmdline, Metadata, Ramdisk…, [Signature]), contiguous from
    byte 548 of the EIF, which starts at `out`'s current position. With a `signer`, a signature section
    over PCR0 (EIF.md §4.2) comes last and the result has PCR8. Every section is read once: its bytes are written,
    hashed into the PCRs and added to the CRC in the same pass; the CRC is then written into the header,
    so `out` must be seekable. A section whose chunks do not add up to its declared size raises
    `InvalidEif` (the output is then incomplete and must be discarded).
    """
    if not ramdisks:
        raise _writer_error("an EIF needs at least one ramdisk", "missing_section")
    if b"\0" in cmdline:
        # nitro-cli passes the command line through CString::new, which refuses interior NULs.
        raise _writer_error("kernel command line contains NUL", "invalid_cmdline")
    if len(cmdline) > CMDLINE_MAX_SIZE:
        raise _writer_error(f"kernel command line longer than {CMDLINE_MAX_SIZE} bytes", "section_too_large")
    _parse_metadata(metadata, stage="write")  # never write what the strict reader would refuse
    planned = [(SectionType.KERNEL, kernel), (SectionType.CMDLINE, Section.of_bytes(cmdline, key=("bytes", cmdline))),
               (SectionType.METADATA, Section.of_bytes(metadata)),
               *((SectionType.RAMDISK, ramdisk) for ramdisk in ramdisks)]
    return _write_sections(out, planned, flags=flags, default_mem=default_mem, default_cpus=default_cpus,
                           signer=signer)


def _write_sections(out: BinaryIO, planned: Sequence[tuple[SectionType, Section]], *, flags: int,
                    default_mem: int, default_cpus: int, signer: EifSigner | None = None) -> WrittenEif:
    count = len(planned) + (signer is not None)
    if count > MAX_SECTIONS:
        raise _writer_error(f"{count} sections; an EIF holds at most {MAX_SECTIONS}", "too_many_sections")
    if flags & ~FLAG_ARCH_ARM64 or flags < 0:
        raise _writer_error(f"header flags {flags:#x}: only bit 0 (arm64) is defined", "bad_flags")
    for label, value in (("default_mem", default_mem), ("default_cpus", default_cpus)):
        if not 0 <= value <= _U64_MAX:
            raise _writer_error(f"{label}={value} does not fit in 64 bits", "field_overflow")
    for kind, section in planned:
        if not 0 <= section.size <= _U64_MAX:
            raise _writer_error(f"{kind.label} size {section.size} does not fit in 64 bits", "field_overflow")
    if not out.seekable():
        raise _writer_error("the EIF CRC is written last into the header, so the output must be seekable",
                            "unseekable_output")

    start = out.tell()
    _write_all(out, b"\0" * HEADER_SIZE)  # the real header once every size, and so the CRC, is known
    crc, length = 0, 0  # CRC and length of everything after the header
    prefix_key = _prefix_key(planned)
    prefix = PREFIXES.get(prefix_key) if prefix_key is not None else None
    measurer = _Measurer(prefix)
    known_crcs = dict(zip(_PREFIX_INDEXES, prefix.crcs, strict=True)) if prefix is not None else {}
    prefix_crcs: list[int] = []  # measured here, for the memo
    sizes: list[int] = []
    spans: list[KnownSpan] = []

    def emit(index: int, kind: SectionType, section: Section) -> None:
        nonlocal crc, length
        section_header = _SECTION_HEADER.pack(kind, 0, section.size)
        crc = _crc32(section_header, crc)
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
                crc = _crc32(chunk, crc)
                if track:
                    data_crc = _crc32(chunk, data_crc)
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
    end = out.tell()
    header = _pack_header(flags=flags, default_mem=default_mem, default_cpus=default_cpus, sizes=sizes, crc=0)
    crc = crc32_combine(_crc32(header[:CRC_OFFSET]), crc, length)
    header = header[:CRC_OFFSET] + struct.pack(">I", crc)
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
            self.value = _crc32(view[:max(CRC_OFFSET - start, 0)], self.value)
            self.value = _crc32(view[max(HEADER_SIZE - start, 0):], self.value)
        else:
            self.value = _crc32(data, self.value)
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
            type_value, section_flags, size = _SECTION_HEADER.unpack(
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
    _parse_metadata(kept[SectionType.METADATA], stage="read")
    if SectionType.SIGNATURE in kept:
        signature = _signature_info(kept[SectionType.SIGNATURE], written.measurements.pcr0)
        if signature.pcr8 != written.measurements.pcr8 or not signature.check:
            raise _fail("the signature read back does not verify PCR0 with the certificate written",
                        "invalid_signature")


# --- metadata (EIF.md §4.1) ----------------------------------------------------------------------------------


def _json_float(value: float) -> str:
    """A float as serde_json (ryu) prints it: "1.0", "0.0001", "1e16", "1.5e-7", non-finite as null."""
    if not math.isfinite(value):
        return "null"  # serde_json turns non-finite floats into null
    if value == 0:
        return "-0.0" if math.copysign(1.0, value) < 0 else "0.0"
    sign = "-" if value < 0 else ""
    mantissa, _, exponent = repr(abs(value)).partition("e")  # repr gives the shortest round-trip digits
    whole, _, fraction = mantissa.partition(".")
    digits = whole + fraction
    point = len(whole) + (int(exponent) if exponent else 0)  # value = 0.<digits> * 10**point
    stripped = digits.lstrip("0")
    point -= len(digits) - len(stripped)
    digits = stripped.rstrip("0")
    length = len(digits)
    if length <= point <= 16:
        text = digits + "0" * (point - length) + ".0"
    elif 0 < point <= 16:
        text = digits[:point] + "." + digits[point:]
    elif -5 < point <= 0:
        text = "0." + "0" * -point + digits
    elif length == 1:
        text = f"{digits}e{point - 1}"
    else:
        text = f"{digits[0]}.{digits[1:]}e{point - 1}"
    return sign + text


def _json_value(value: object, out: list[str], depth: int) -> None:
    """serde_json's compact output for a `serde_json::Value` (maps are BTreeMaps: keys sorted)."""
    if depth > _JSON_MAX_DEPTH:
        raise InvalidOptions(f"metadata nested deeper than {_JSON_MAX_DEPTH} levels",
                             details={"reason": "invalid_metadata"})
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, int):
        if not -(1 << 63) <= value <= _U64_MAX:
            # serde_json would read such a number back as a float, so it could not round-trip.
            raise InvalidOptions(f"integer {value} in metadata is outside the 64-bit range",
                                 details={"reason": "invalid_metadata"})
        out.append(str(value))
    elif isinstance(value, float):
        out.append(_json_float(value))
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))  # same escapes as serde_json
    elif isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise InvalidOptions("metadata object keys must be strings", details={"reason": "invalid_metadata"})
        out.append("{")
        for i, key in enumerate(sorted(value)):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _json_value(value[key], out, depth + 1)
        out.append("}")
    elif isinstance(value, list | tuple):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _json_value(item, out, depth + 1)
        out.append("]")
    else:
        raise InvalidOptions(f"metadata value of type {type(value).__name__} is not JSON",
                             details={"reason": "invalid_metadata"})


def build_metadata(
    *,
    image_name: str,
    image_version: str,
    build_time: str,
    build_tool: str = "nitroconv",
    build_tool_version: str,
    operating_system: str,
    kernel_version: str,
    docker_info: object,
    custom: object | None = None,
) -> bytes:
    """The metadata section bytes, as nitro-cli's `serde_json::to_vec(&EifIdentityInfo)` writes them.

    Compact JSON; the top level and BuildMetadata in struct-field order; DockerInfo and CustomMetadata
    are `serde_json::Value`s whose object keys nitro-cli emits sorted (its serde_json has no
    preserve_order). `custom` must be an object or None: describe-eif flattens it into its Metadata.
    Values that are not JSON, or that nitro-cli could not read back, raise `InvalidOptions`.
    """
    if custom is not None and not isinstance(custom, Mapping):
        raise InvalidOptions("custom metadata must be a JSON object", details={"reason": "invalid_metadata"})
    out: list[str] = ["{"]
    top: list[tuple[str, object]] = [("ImageName", image_name), ("ImageVersion", image_version)]
    build: list[tuple[str, str]] = [("BuildTime", build_time), ("BuildTool", build_tool),
                                    ("BuildToolVersion", build_tool_version),
                                    ("OperatingSystem", operating_system), ("KernelVersion", kernel_version)]
    for key, text in [*top, *build]:
        if not isinstance(text, str):
            raise InvalidOptions(f"metadata field {key} must be a string", details={"reason": "invalid_metadata"})
    for key, text in top:
        out.append(f"{json.dumps(key)}:")
        _json_value(text, out, 1)
        out.append(",")
    out.append('"BuildMetadata":{')
    out.append(",".join(f"{json.dumps(key)}:{json.dumps(text, ensure_ascii=False)}" for key, text in build))
    out.append('},"DockerInfo":')
    _json_value(docker_info, out, 1)
    out.append(',"CustomMetadata":')
    _json_value(custom, out, 1)
    out.append("}")
    try:
        return "".join(out).encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates have no UTF-8 form
        raise InvalidOptions("metadata contains text that is not valid Unicode",
                             details={"reason": "invalid_metadata"}) from exc


_CONFIG_SPLIT = re.compile(r"[ /-]")


def kernel_info_from_config(path: str | os.PathLike[str]) -> tuple[str, str]:
    """(OperatingSystem, KernelVersion) from a kernel config, as nitro-cli derives them.

    nitro-cli splits the third line (e.g. `# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel
    Configuration`) on ' ', '/' and '-' and takes words 1 and 3: ("Linux", "4.14.256").
    """
    try:
        with open(path, encoding="utf-8", newline=None) as f:
            lines = [f.readline() for _ in range(3)]
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidBlobs(f"cannot read kernel config {os.fspath(path)!r}: {exc}") from exc
    words = _CONFIG_SPLIT.split(lines[2].rstrip("\n"))
    if len(words) < 4:
        raise InvalidBlobs(f"kernel config {os.fspath(path)!r}: third line {lines[2]!r} has no OS and version")
    return words[1], words[3]


_BUILD_FIELDS = ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion")


def _parse_metadata(raw: bytes, *, stage: str) -> dict[str, object]:
    """The metadata JSON, checked against the shape nitro-cli deserialises (EifIdentityInfo)."""
    def bad(message: str) -> InvalidEif:
        return InvalidEif(f"metadata section: {message}", details={"reason": "invalid_metadata", "stage": stage})

    if len(raw) > METADATA_MAX_SIZE:
        raise InvalidEif(f"metadata section larger than {METADATA_MAX_SIZE} bytes",
                         details={"reason": "section_too_large", "stage": stage})
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise bad(f"not valid UTF-8 JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise bad("not a JSON object")
    for key in ("ImageName", "ImageVersion"):
        if not isinstance(meta.get(key), str):
            raise bad(f"{key} missing or not a string")
    build = meta.get("BuildMetadata")
    if not isinstance(build, dict) or not all(isinstance(build.get(k), str) for k in _BUILD_FIELDS):
        raise bad(f"BuildMetadata must be an object with string fields {', '.join(_BUILD_FIELDS)}")
    for key in ("DockerInfo", "CustomMetadata"):
        if key not in meta:
            raise bad(f"{key} missing (nitro-cli requires the key, null allowed)")
    if meta["CustomMetadata"] is not None and not isinstance(meta["CustomMetadata"], dict):
        raise bad("CustomMetadata must be an object or null (describe-eif flattens it)")
    return meta


# --- signature section (EIF.md §4.2): read side ----------------------------------------------------------------


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
    except ValueError as exc:
        raise InvalidEif(f"signature section certificate is not a PEM X.509 certificate: {exc}",
                         details={"reason": "invalid_signature"}) from exc


def _signature_info(raw: bytes, pcr0: str) -> SignatureInfo:
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import Encoding

    from common import cose

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


# --- reader ----------------------------------------------------------------------------------------------------


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
        f = _HEADER.unpack(raw)
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
    measurer = _Measurer()
    try:
        return _read_measured(source, strict_crc=strict_crc, measurer=measurer)
    finally:
        measurer.close()


def _read_measured(source: EifSource, *, strict_crc: bool, measurer: _Measurer) -> EifInfo:
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

        crc = _crc32(header[:CRC_OFFSET])
        kept: dict[SectionType, bytes] = {}
        seen: list[SectionType] = []
        sections: list[EifSection] = []
        for i in range(count):
            raw = src.read_exact(SECTION_HEADER_SIZE, f"section {i} header")
            type_value, section_flags, size = _SECTION_HEADER.unpack(raw)
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
            crc = _crc32(raw, crc)
            measurer.begin(kind)
            parts: list[bytes] = []
            for chunk in src.chunks(size, f"section {i} ({kind.label}) data"):
                crc = _crc32(chunk, crc)
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
    metadata = _parse_metadata(kept[SectionType.METADATA], stage="read")
    signature = None
    if SectionType.SIGNATURE in kept:
        signature = _signature_info(kept[SectionType.SIGNATURE], measurer.finish().pcr0)
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
        kind, flags, size = _SECTION_HEADER.unpack(src.read_exact(SECTION_HEADER_SIZE, "a section header"))
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
    described: dict[str, object] = {key: build[key] for key in _BUILD_FIELDS}
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
