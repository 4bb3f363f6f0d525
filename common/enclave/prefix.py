"""The measured start of EIFs built from one set of blobs: kept per process, so it is measured once, not per EIF.

Every EIF a worker builds begins with the same kernel, cmdline and bootstrap ramdisk (PCR1's content: ~15 MB
with Debian's cloud kernel, more than the whole application ramdisk of a small image). The writer keeps the
SHA-384 state after them and the CRC-32 of each, under the sections' keys (`common.enclave.writer.Section.key`: a blob
file's identity), and the next EIF's PCR0 goes on from that state. The bytes are still written every time;
the CRC the writer then reports for them is the remembered one, so a blob whose content changed behind an
unchanged key fails the check of the written file (the CRC of the read that makes the layer) instead of
giving a wrong PCR.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common.util.memo import ProcessMemo


@dataclass(frozen=True)
class MeasuredPrefix:
    """SHA-384 of the prefix's content (never updated: `state()` hands out copies) and each section's CRC-32."""

    _state: Any
    crcs: tuple[int, ...]

    def state(self) -> Any:
        return self._state.copy()


# A worker uses one blobs dir; a few more entries cover tests and a blobs upgrade while it runs.
PREFIXES: ProcessMemo[MeasuredPrefix] = ProcessMemo(capacity=4)
