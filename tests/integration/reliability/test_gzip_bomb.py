"""A real gzip bomb through the service (RELIABILITY.md §C 40): a few MB of gzip that inflate to 4 GiB, pushed
into the local registry and submitted through the API. The worker stops at its image limit with FAILED
`limit_exceeded`, does not retry, and its memory and disk stay bounded (a tmpfs state dir is the backstop)."""
from __future__ import annotations

import hashlib
import shutil
import tarfile
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.settings import Settings
from tests.fixtures.disks import tmpfs_over
from tests.fixtures.images import LAYER_TYPES, LayerBlob, push_test_image

from .conftest import Proc, api_for, events, row, scratch_dirs, wait_terminal, with_hosts

pytestmark = pytest.mark.integration
MiB = 1 << 20
FILE_BYTES = 128 * MiB
FILES = 32  # 4 GiB once inflated
LIMIT = 512 * MiB  # NITROCONV_MAX_IMAGE_BYTES for the worker
DISK = 1024 * MiB  # the worker's whole state dir: a runaway spool would hit ENOSPC, not pass


def _gzip_member(data: bytes | None = None, zeros: int = 0) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [packer.compress(data or b"")]
    chunk = bytes(16 * MiB)
    for _ in range(zeros // len(chunk)):
        out.append(packer.compress(chunk))
    out.append(packer.flush())
    return b"".join(out)


def gzip_bomb() -> LayerBlob:
    """A tar of FILES files of FILE_BYTES zeros, as concatenated gzip members (valid gzip, RFC 1952 §2.2):
    the zeros member is compressed once and repeated, so making the bomb costs seconds, not minutes."""
    zeros = _gzip_member(zeros=FILE_BYTES)
    diff = hashlib.sha256()
    chunk = bytes(16 * MiB)
    members = []
    for i in range(FILES):
        info = tarfile.TarInfo(f"bomb/{i:03d}.bin")
        info.size, info.mode, info.mtime = FILE_BYTES, 0o644, 0
        header = info.tobuf(format=tarfile.USTAR_FORMAT)
        diff.update(header)
        for _ in range(FILE_BYTES // len(chunk)):
            diff.update(chunk)
        members += [_gzip_member(header), zeros]
    trailer = bytes(1024)  # two zero blocks end the archive
    diff.update(trailer)
    members.append(_gzip_member(trailer))
    return LayerBlob(b"".join(members), LAYER_TYPES[("oci", "gzip")], "sha256:" + diff.hexdigest())


@pytest.fixture
def bounded_state(rel_settings: Settings) -> Iterator[Path]:
    with tmpfs_over(rel_settings.state_dir, DISK // MiB) as state:
        yield state


class Peaks:
    """Samples the worker's pool children (RSS high-water mark) and the state dir's disk use."""

    def __init__(self, worker: Proc, state: Path) -> None:
        self.worker, self.state = worker, state
        self.rss = self.disk = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            for pid in self.worker.children():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                for line in status.splitlines():
                    if line.startswith("VmHWM:"):
                        self.rss = max(self.rss, int(line.split()[1]) * 1024)
            self.disk = max(self.disk, shutil.disk_usage(self.state).used)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_gzip_bomb_through_the_service_fails_limit_exceeded_bounded(registry, rel_settings, bounded_state, stack):
    started = time.monotonic()
    bomb = gzip_bomb()
    made = time.monotonic() - started
    assert len(bomb.blob) < 8 * MiB
    image = push_test_image(registry, f"rel/bomb-{uuid.uuid4().hex[:6]}", "1", layers=[bomb])
    s = with_hosts(rel_settings, registry.host)
    api = api_for(s)
    procs = stack(s)
    worker = procs.worker("bombed", NITROCONV_MAX_IMAGE_BYTES=str(LIMIT))
    procs.beat()
    peaks = Peaks(worker, bounded_state)
    try:
        submitted = time.monotonic()
        build_id = api.submit(f"{registry.host}/{image.repo}:1", f"{registry.host}/rel/bomb-out-{uuid.uuid4().hex[:6]}:1")
        build = wait_terminal(s, build_id, timeout=120)
        took = time.monotonic() - submitted
    finally:
        peaks.stop()
    print(f"\ngzip bomb: {len(bomb.blob) / MiB:.1f} MiB gzip -> {FILES * FILE_BYTES / MiB:.0f} MiB tar "
          f"(made in {made:.1f} s); limit {LIMIT // MiB} MiB; worker child peak RSS {peaks.rss / MiB:.0f} MiB; "
          f"state dir peak {peaks.disk / MiB:.0f} MiB; FAILED after {took:.1f} s")
    assert (build.conversion_state, build.error_code) == ("FAILED", "limit_exceeded"), build.error_message
    assert build.approval_status == "REJECTED"
    assert scratch_dirs(s) == []
    assert peaks.rss and peaks.rss < 400 * MiB  # streamed: the inflated bytes never sit in memory
    assert peaks.disk < LIMIT + 64 * MiB  # what was spooled before the limit, and nothing after it
    assert took < 45  # stopped at the limit: the 3.5 GiB past it were never inflated (~10 s on a 2-core box)
    trail = events(s, build_id)
    time.sleep(3 * s.sweep_interval_seconds + s.requeue_after_seconds)  # sweeps pass; nothing retries it
    assert events(s, build_id) == trail and row(s, build_id).attempts == 1
