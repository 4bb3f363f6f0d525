"""The transition tables are the spec: every allowed and every forbidden edge, spelled out."""
from __future__ import annotations

import itertools

import pytest

from common.store.status import (
    APPROVAL_TRANSITIONS,
    CONVERSION_TERMINAL,
    CONVERSION_TRANSITIONS,
    TASK_TRANSITIONS,
    ApprovalStatus,
    ConversionState,
    TaskStatus,
    allowed,
    conversion_sources,
    path_to,
)

C, A, T = ConversionState, ApprovalStatus, TaskStatus

CONVERSION_EDGES = {
    (C.QUEUED, C.PULLING), (C.QUEUED, C.FAILED), (C.QUEUED, C.CANCELLED),
    (C.PULLING, C.BUILDING), (C.BUILDING, C.MEASURING), (C.MEASURING, C.PUSHING), (C.PUSHING, C.SUCCEEDED),
    *((s, C.FAILED) for s in (C.PULLING, C.BUILDING, C.MEASURING, C.PUSHING)),
    *((s, C.CANCELLED) for s in (C.PULLING, C.BUILDING, C.MEASURING, C.PUSHING)),
    *((s, C.QUEUED) for s in (C.PULLING, C.BUILDING, C.MEASURING, C.PUSHING)),  # lease-expiry requeue
}
APPROVAL_EDGES = {(A.PENDING, A.WHITELISTED), (A.PENDING, A.REJECTED)}
TASK_EDGES = {(T.INPROGRESS, T.SUCCESS), (T.INPROGRESS, T.DENIED)}


@pytest.mark.parametrize("src,dst", list(itertools.product(C, C)))
def test_conversion_table_allows_exactly_the_designed_edges(src, dst):
    assert allowed(CONVERSION_TRANSITIONS, src, dst) == ((src, dst) in CONVERSION_EDGES)


@pytest.mark.parametrize("src,dst", list(itertools.product(A, A)))
def test_approval_table_allows_exactly_the_designed_edges(src, dst):
    assert allowed(APPROVAL_TRANSITIONS, src, dst) == ((src, dst) in APPROVAL_EDGES)


@pytest.mark.parametrize("src,dst", list(itertools.product(T, T)))
def test_task_table_allows_exactly_the_designed_edges(src, dst):
    assert allowed(TASK_TRANSITIONS, src, dst) == ((src, dst) in TASK_EDGES)


def test_conversion_terminal_states_are_the_three_ends():
    assert CONVERSION_TERMINAL == {C.SUCCEEDED, C.FAILED, C.CANCELLED}


def test_conversion_sources_of_succeeded_is_pushing_only():
    assert conversion_sources(C.SUCCEEDED) == {C.PUSHING}
    assert conversion_sources(C.PULLING) == {C.QUEUED}


def test_path_to_walks_skipped_stages_in_order():
    assert path_to(C.PULLING, C.MEASURING) == (C.BUILDING, C.MEASURING)
    assert path_to(C.PULLING, C.SUCCEEDED) == (C.BUILDING, C.MEASURING, C.PUSHING, C.SUCCEEDED)
    assert path_to(C.PUSHING, C.PUSHING) == ()
    assert path_to(C.PUSHING, C.BUILDING) == ()


def test_path_to_refuses_states_outside_the_pipeline():
    with pytest.raises(ValueError):
        path_to(C.QUEUED, C.BUILDING)
