"""The worker's disk fills up mid-conversion (RELIABILITY.md §A 9): its state dir (blob cache and scratch) is a
small tmpfs, and the image inflates past it. Expected: FAILED `resource_limit`, scratch removed, not retried."""
from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from common.settings import Settings
from tests.fixtures.disks import tmpfs_over
from tests.fixtures.images import make_tar, push_test_image

from .conftest import (
    api_for,
    blob_cache_is_sound,
    events,
    row,
    scratch_dirs,
    wait_terminal,
    with_hosts,
)

pytestmark = pytest.mark.integration
DISK_MIB = 24


@pytest.fixture
def small_disk(rel_settings: Settings) -> Iterator[Path]:
    """The workers' state dir, a DISK_MIB tmpfs."""
    with tmpfs_over(rel_settings.state_dir, DISK_MIB) as state:
        yield state


@pytest.mark.parametrize("layer", [
    # The compressed blob itself does not fit: ENOSPC while downloading it into the blob cache.
    pytest.param(lambda: make_tar({"big/noise.bin": os.urandom(32 << 20)}), id="download"),
    # Zeros: a few KiB of gzip in the blob cache, many MiB once applied.
    pytest.param(lambda: make_tar({"big/zeros.bin": bytes(64 << 20), "hello.txt": b"hi"}), id="apply"),  # the file
    # The EIF file: written only when something reads it, here the boot check (which never starts: it does not fit).
    pytest.param(lambda: make_tar({"big/zeros.bin": bytes(9 << 20), "hello.txt": b"hi"}), id="eif-file"),
])
def test_worker_disk_full_fails_resource_limit_once_and_cleans_scratch(
        registry, rel_settings, small_disk, stack, layer: Callable[[], bytes], request: pytest.FixtureRequest):
    image = push_test_image(registry, f"rel/full-{uuid.uuid4().hex[:6]}", "1", layers=[layer()])
    s = with_hosts(rel_settings, registry.host)
    if request.node.callspec.id == "eif-file":
        s = replace(s, boot_check=True, boot_check_mode="plain")
    api = api_for(s)
    procs = stack(s)
    worker = procs.worker()
    procs.beat()  # the sweeper runs too: it must not resurrect the failed build
    used_before, started = shutil.disk_usage(s.state_dir).used, time.monotonic()
    build_id = api.submit(f"{registry.host}/{image.repo}:1", f"{registry.host}/rel/full-out-{uuid.uuid4().hex[:6]}:1")
    build = wait_terminal(s, build_id, timeout=90)
    assert (build.conversion_state, build.error_code) == ("FAILED", "resource_limit"), build.error_message
    assert time.monotonic() - started < 30
    assert "blob read broke" not in worker.text()  # a full disk is not a broken connection: no resumed downloads
    assert build.approval_status == "REJECTED"
    assert scratch_dirs(s) == []
    blob_cache_is_sound(s.state_dir)
    trail = events(s, build_id)
    time.sleep(3 * s.sweep_interval_seconds + s.requeue_after_seconds)  # several sweeps, no retry storm
    assert events(s, build_id) == trail
    # A second attempt would name who started it: the sweeper (a lease that ran out) or the worker (a retry).
    assert row(s, build_id).attempts == 1, (trail, [ln for ln in worker.text().splitlines()
                                                   if "lease" in ln or "requeue" in ln or "claimed" in ln])
    # The space is given back: what stays is at most the verified layer blob, kept in the cache.
    assert shutil.disk_usage(s.state_dir).used - used_before <= len(image.layers[0].blob) + (1 << 20)
