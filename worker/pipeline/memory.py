"""Enclave memory sizing: the 4x-the-EIF rule and the smallest valid size when the request names none."""
from __future__ import annotations

MIB = 1024 * 1024
# The enclave needs room for the EIF it boots from plus the unpacked ramdisks and the program (DESIGN.md §5).
MEMORY_FACTOR = 4
# Enclave memory is handed out in 2 MiB huge pages at least; a 256 MiB step keeps the figure a round one
# that operators recognise, and leaves the program some room above the bare minimum.
MEM_STEP_MIB = 256


def minimum_mem_mib(eif_size: int) -> int:
    """The least memory (MiB) an enclave booting an EIF of `eif_size` bytes may be given."""
    if eif_size < 0:
        raise ValueError(f"negative EIF size {eif_size}")
    return -(-MEMORY_FACTOR * eif_size // MIB)


def default_mem_mib(eif_size: int) -> int:
    """The size used when the request names none: the minimum rounded up to a multiple of 256 MiB."""
    return max(1, -(-minimum_mem_mib(eif_size) // MEM_STEP_MIB)) * MEM_STEP_MIB
