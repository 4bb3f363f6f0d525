"""The EIF v4 container (EIF.md §2): header and section-table layout, section types, size caps, the CRC."""
from __future__ import annotations

import enum
import os
import struct
from typing import BinaryIO

from isal import isal_zlib

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

HEADER_STRUCT = struct.Struct(">4sHHQQHH32Q32QII")
SECTION_HEADER_STRUCT = struct.Struct(">HHQ")
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF
# zlib's CRC-32, computed with carry-less multiply by ISA-L: the same values at several GB/s.
crc32 = isal_zlib.crc32
# `zlib.crc32(a + b)` from `crc32(a)`, `crc32(b)` and `len(b)`: the signature section's size is known only once
# PCR0 is, after the ramdisks; so the header, first in the file and first in the CRC's input, is packed last and
# its CRC joined to the sections' CRC.
crc32_combine = isal_zlib.crc32_combine

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

