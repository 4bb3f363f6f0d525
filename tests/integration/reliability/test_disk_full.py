"""The worker's disk fills up mid-conversion (RELIABILITY.md §A 9): its state dir (blob cache and scratch) is a
small tmpfs, and the image inflates past it. Expected: FAILED `resource_limit`, scratch removed, not retried."""
from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.settings import Settings
from tests.fixtures.images import make_tar, push_test_image

from .conftest import api_for, events, row, scratch_dirs, tmpfs_over, wait_terminal, with_hosts

pytestmark = pytest.mark.integration
DISK_MIB = 24


@pytest.fixture
def small_disk(rel_settings: Settings) -> Iterator[Path]:
    """The workers' state dir, a DISK_MIB tmpfs."""
    with tmpfs_over(rel_settings.state_dir, DISK_MIB) as state:
        yield state


@pytest.mark.parametrize("megabytes", [
    64,  # the layer's file alone does not fit: ENOSPC while applying it
    9,  # the applied tree fits, the ramdisk/EIF written after it does not
])
def test_worker_disk_full_fails_resource_limit_once_and_cleans_scratch(
        registry, rel_settings, small_disk, stack, megabytes: int):
    # Zeros: a few KiB of gzip in the blob cache, `megabytes` MiB once applied.
    layer = make_tar({"big/zeros.bin": bytes(megabytes << 20), "hello.txt": b"hi"})
    image = push_test_image(registry, f"rel/full-{uuid.uuid4().hex[:6]}", "1", layers=[layer])
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    procs = stack(s)
    procs.worker()
    procs.beat()  # the sweeper runs too: it must not resurrect the failed build
    build_id = api.submit(f"{registry.host}/{image.repo}:1", f"{registry.host}/rel/full-out-{uuid.uuid4().hex[:6]}:1")
    build = wait_terminal(s, build_id, timeout=90)
    assert (build.conversion_state, build.error_code) == ("FAILED", "resource_limit"), build.error_message
    assert build.approval_status == "REJECTED"
    assert scratch_dirs(s) == []
    trail = events(s, build_id)
    time.sleep(3 * s.sweep_interval_seconds + s.requeue_after_seconds)  # several sweeps, no retry storm
    assert events(s, build_id) == trail
    assert row(s, build_id).attempts == 1
