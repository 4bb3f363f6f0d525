"""The worker hits its memory limit mid-conversion (RELIABILITY.md §A 9): a memory cgroup of the test's own around
a real worker, and an image whose layer holds so many entries that the in-memory tree outgrows it."""
from __future__ import annotations

import tarfile
import time
import uuid

import pytest

from tests.fixtures.images import push_test_image

from .conftest import api_for, blob_cache_is_sound, events, row, scratch_dirs, wait_terminal, with_hosts
from .memcg import memory_group

pytestmark = pytest.mark.integration
MiB = 1 << 20


def many_entries_tar(count: int) -> bytes:
    """A tar of `count` empty files (16-byte names), made from one header by patching name and checksum: seconds
    for hundreds of thousands of entries, where tarfile takes a minute."""
    info = tarfile.TarInfo("x" * 16)
    info.mtime, info.mode = 0, 0o644
    template = bytearray(info.tobuf(format=tarfile.USTAR_FORMAT))
    template[148:156] = b" " * 8
    base = sum(template) - ord("x") * 16
    out = bytearray()
    for i in range(count):
        name = b"%04x/%011x" % (i >> 10, i)
        block = bytearray(template)
        block[0:16] = name
        block[148:156] = b"%06o\0 " % (base + sum(name))
        out += block
    return bytes(out + bytes(1024))


ENTRIES = 150_000  # ~175 MiB of the pool child's memory once applied, with nothing else running
LIMIT = 96 * MiB  # counted from when the worker enters the group: what it grows by, not its imports


def test_worker_memory_limit_fails_resource_limit_once_and_cleans_scratch(registry, rel_settings, stack):
    image = push_test_image(registry, f"rel/mem-{uuid.uuid4().hex[:6]}", "1", layers=[many_entries_tar(ENTRIES)])
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    with memory_group(LIMIT) as group:
        procs = stack(s)
        worker = procs.worker()
        for pid in (worker.proc.pid, *worker.children()):
            group.add(pid)
        procs.beat()  # the sweeper runs too: it must not resurrect the failed build
        started = time.monotonic()
        build_id = api.submit(f"{registry.host}/{image.repo}:1", f"{registry.host}/rel/mem-out-{uuid.uuid4().hex[:6]}:1")
        build = wait_terminal(s, build_id, timeout=120)
        took = time.monotonic() - started
        kills = group.oom_kills()
    print(f"\nmemory limit: {kills} OOM kill(s), ended in {took:.1f} s: {build.error_code}: {build.error_message}")
    assert kills >= 1  # the limit was really hit, by the kernel
    assert (build.conversion_state, build.error_code) == ("FAILED", "resource_limit"), (build.error_code,
                                                                                         build.error_message)
    assert build.attempts == 1 and build.approval_status == "REJECTED"
    assert scratch_dirs(s) == []
    blob_cache_is_sound(s.state_dir)
    trail = events(s, build_id)
    time.sleep(3 * s.sweep_interval_seconds + s.requeue_after_seconds)  # several sweeps, no retry storm
    assert events(s, build_id) == trail and row(s, build_id).attempts == 1
