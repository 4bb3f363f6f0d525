"""A host out of disk or memory is a `resource_limit` failure wherever the OSError surfaced (RELIABILITY.md §A 9)."""
from __future__ import annotations

import errno

import pytest

from common.errors import InvalidLayer, ResourceLimit
from worker.runner import _host_exhausted


def _raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as caught:  # noqa: BLE001 - returned for inspection
        return caught


def _raised_from(fn) -> BaseException:  # noqa: ANN001
    try:
        fn()
    except BaseException as caught:  # noqa: BLE001 - returned for inspection
        return caught
    raise AssertionError("did not raise")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_runner_exhaustion_disk_full_is_resource_limit(code: int):
    found = _host_exhausted(OSError(code, "No space left on device"))
    assert isinstance(found, ResourceLimit) and found.code == "resource_limit" and not found.retryable


def test_runner_exhaustion_seen_through_a_wrapping_error():
    def wrapped() -> None:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as exc:
            raise InvalidLayer("layer could not be read") from exc

    assert isinstance(_host_exhausted(_raised_from(wrapped)), ResourceLimit)


def test_runner_exhaustion_memory_error_is_resource_limit():
    assert isinstance(_host_exhausted(MemoryError()), ResourceLimit)


@pytest.mark.parametrize("exc", [OSError(errno.EIO, "I/O error"), ValueError("x"), InvalidLayer("bad tar")])
def test_runner_exhaustion_other_errors_are_not(exc: BaseException):
    assert _host_exhausted(_raised(exc)) is None


def test_runner_exhaustion_survives_a_cyclic_chain():
    a, b = ValueError("a"), ValueError("b")
    a.__context__, b.__context__ = b, a
    assert _host_exhausted(a) is None


def test_runner_exhaustion_seen_under_a_cause_that_is_another_error():
    """An error whose `__cause__` is something else and whose `__context__` is the disk-full it was raised
    while handling: the disk-full is still found."""
    disk_full = _raised(OSError(errno.ENOSPC, "No space left on device"))
    err = InvalidLayer("the layer's download failed")
    err.__context__, err.__cause__ = disk_full, ValueError("the reader gave up")
    assert isinstance(_host_exhausted(err), ResourceLimit)
