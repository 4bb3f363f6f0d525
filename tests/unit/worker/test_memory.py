"""Enclave memory sizing: the 4x minimum and the 256 MiB default."""
from __future__ import annotations

import pytest

from worker.pipeline.memory import MEM_STEP_MIB, MIB, default_mem_mib, minimum_mem_mib


@pytest.mark.parametrize(("eif_size", "minimum"), [
    (0, 0),
    (1, 1),  # any byte needs a whole MiB
    (MIB // 4, 1),
    (MIB // 4 + 1, 2),
    (16 * MIB, 64),
    (16 * MIB + 1, 65),
])
def test_minimum_mem_mib_is_four_times_the_eif_rounded_up_to_a_mib(eif_size: int, minimum: int) -> None:
    assert minimum_mem_mib(eif_size) == minimum


@pytest.mark.parametrize(("eif_size", "default"), [
    (0, 256),
    (1, 256),
    (64 * MIB, 256),  # exactly 256 MiB needed: no extra step
    (64 * MIB + 1, 512),
    (100 * MIB, 512),
    (300 * MIB, 1280),
])
def test_default_mem_mib_rounds_the_minimum_up_to_256_mib(eif_size: int, default: int) -> None:
    assert default_mem_mib(eif_size) == default


@pytest.mark.parametrize("eif_size", [0, 1, 5 * MIB + 3, 64 * MIB - 1, 64 * MIB, 1 << 33])
def test_default_mem_mib_is_the_least_valid_multiple_of_256(eif_size: int) -> None:
    value = default_mem_mib(eif_size)
    assert value % MEM_STEP_MIB == 0 and value >= minimum_mem_mib(eif_size)
    assert value - MEM_STEP_MIB < max(minimum_mem_mib(eif_size), 1)


def test_minimum_mem_mib_refuses_a_negative_size() -> None:
    with pytest.raises(ValueError):
        minimum_mem_mib(-1)
