"""The status machines (conversion, approval, task): the only place that says which status may follow which."""
from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import TypeVar


class ConversionState(enum.StrEnum):
    QUEUED = "QUEUED"
    PULLING = "PULLING"
    BUILDING = "BUILDING"
    MEASURING = "MEASURING"
    PUSHING = "PUSHING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"


class ApprovalStatus(enum.StrEnum):
    """The seed's `Build.status.status`."""

    PENDING = "PENDING"
    WHITELISTED = "WHITELISTED"
    REJECTED = "REJECTED"


class TaskStatus(enum.StrEnum):
    """A BUILD_WHITELIST task, CCM's names."""

    INPROGRESS = "INPROGRESS"
    SUCCESS = "SUCCESS"
    DENIED = "DENIED"


C = ConversionState
_RUNNING = (C.PULLING, C.BUILDING, C.MEASURING, C.PUSHING)

CONVERSION_TRANSITIONS: dict[ConversionState, frozenset[ConversionState]] = {
    C.QUEUED: frozenset({C.PULLING, C.FAILED, C.CANCELLED}),
    # `-> QUEUED` from a running state is the requeue of a conversion whose worker lost its lease
    # (killed, host gone); the store additionally requires the lease to have expired.
    C.PULLING: frozenset({C.BUILDING, C.QUEUED, C.FAILED, C.CANCELLED}),
    C.BUILDING: frozenset({C.MEASURING, C.QUEUED, C.FAILED, C.CANCELLED}),
    C.MEASURING: frozenset({C.PUSHING, C.QUEUED, C.FAILED, C.CANCELLED}),
    C.PUSHING: frozenset({C.SUCCEEDED, C.QUEUED, C.FAILED, C.CANCELLED}),
    C.SUCCEEDED: frozenset(),
    C.FAILED: frozenset(),
    C.CANCELLED: frozenset(),
}

A = ApprovalStatus
APPROVAL_TRANSITIONS: dict[ApprovalStatus, frozenset[ApprovalStatus]] = {
    A.PENDING: frozenset({A.WHITELISTED, A.REJECTED}),
    A.WHITELISTED: frozenset(),
    A.REJECTED: frozenset(),
}

T = TaskStatus
TASK_TRANSITIONS: dict[TaskStatus, frozenset[TaskStatus]] = {
    T.INPROGRESS: frozenset({T.SUCCESS, T.DENIED}),
    T.SUCCESS: frozenset(),
    T.DENIED: frozenset(),
}

CONVERSION_TERMINAL: frozenset[ConversionState] = frozenset(
    s for s, nxt in CONVERSION_TRANSITIONS.items() if not nxt)
PIPELINE: tuple[ConversionState, ...] = _RUNNING
RUNNING: frozenset[ConversionState] = frozenset(_RUNNING)


E = TypeVar("E", bound=enum.Enum)


def allowed(table: Mapping[E, frozenset[E]], src: E, dst: E) -> bool:
    """True when `src -> dst` is an edge of `table`."""
    return dst in table.get(src, frozenset())


def conversion_sources(target: ConversionState) -> frozenset[ConversionState]:
    """States from which `target` may be entered."""
    return frozenset(s for s, nxt in CONVERSION_TRANSITIONS.items() if target in nxt)


def path_to(current: ConversionState, target: ConversionState) -> tuple[ConversionState, ...]:
    """The pipeline states to walk from `current` to `target` (both running or target SUCCEEDED).

    The engine reports the stage it enters; if it skips one (nothing to measure separately),
    the record still passes through every state in order so the history reads as the machine.
    """
    order = (*_RUNNING, C.SUCCEEDED)
    if current not in order or target not in order:
        raise ValueError(f"no pipeline path from {current.value} to {target.value}")
    i, j = order.index(current), order.index(target)
    return order[i + 1: j + 1] if j >= i else ()
