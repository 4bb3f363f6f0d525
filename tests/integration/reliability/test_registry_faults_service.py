"""A slow or hostile input registry, through the whole service (API → Redis → one worker process → Postgres): a blob
served at one byte per second, a connection reset mid-layer (once, and every time), and a blob whose bytes are not
the digest the manifest promised. Each ends by the rules (FAILED with its code, retried with backoff when the error
is transient, or resumed), within its deadline, and the worker's only slot is free again: the next conversion on
the same worker succeeds."""
from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytest

from tests.fixtures.hostile import HostileRegistry, Reply, Seen
from tests.fixtures.images import make_tar, push_test_image

from .conftest import TERMINAL, Api, Proc, Stack, api_for, events, scratch_dirs, wait_terminal, with_hosts

pytestmark = pytest.mark.integration
SOFT, HARD = 8, 18  # the conversion's time limits (an aborted pull waits up to 5 s for its downloads)


@dataclass
class Service:
    api: Api
    front: HostileRegistry
    worker: Proc
    registry_host: str


@pytest.fixture
def svc(registry, hostile_front, rel_settings, stack) -> Iterator[Service]:  # noqa: ANN001
    front = hostile_front(registry.host)
    s = replace(with_hosts(rel_settings, registry.host, front.host), soft_time_limit=SOFT, time_limit=HARD,
                max_attempts=2)
    procs: Stack = stack(s)
    worker = procs.worker("only")  # -c 1: one slot, which every case must give back
    procs.beat()
    yield Service(api_for(s), front, worker, registry.host)


def _image(registry, name: str):  # noqa: ANN001, ANN202
    # 256 KiB that gzip cannot shrink much, so "mid-layer" is well inside the blob.
    return push_test_image(registry, f"rel/{name}-{uuid.uuid4().hex[:6]}", "1",
                           [make_tar({"noise.bin": os.urandom(256 << 10)})])


def _slot_is_free(svc: Service, registry) -> None:  # noqa: ANN001
    """A good conversion submitted now starts and ends promptly on the same (single-slot) worker."""
    good = push_test_image(registry, f"rel/after-{uuid.uuid4().hex[:6]}", "1")
    started = time.monotonic()
    build = wait_terminal(svc.api.s, svc.api.submit(f"{registry.host}/{good.repo}:1", _out(svc)), timeout=60)
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert time.monotonic() - started < 30


def _out(svc: Service) -> str:
    return f"{svc.registry_host}/rel/regfault-out-{uuid.uuid4().hex[:6]}:1"


def _forwarded(change: Callable[[Reply], None]) -> Callable[[Seen, Callable[[], Reply]], Reply]:
    def respond(seen: Seen, forward: Callable[[], Reply]) -> Reply:
        reply = forward()
        change(reply)
        return reply
    return respond


def _run(svc: Service, registry, name: str, rule: Callable[[Seen, Callable[[], Reply]], Reply],  # noqa: ANN001
         times: int | None, timeout: float):  # noqa: ANN202
    image = _image(registry, name)
    path = f"/blobs/{image.layers[0].digest}"
    svc.front.on("GET", path, rule, times=times)
    started = time.monotonic()
    build = wait_terminal(svc.api.s, svc.api.submit(f"{svc.front.host}/{image.repo}:1", _out(svc)), timeout=timeout)
    return build, time.monotonic() - started, path


class _Trickle:
    """Serves the real blob one byte per second, noting when each byte was handed to the socket."""

    def __init__(self) -> None:
        self.sent: list[float] = []

    def _bytes(self, body: bytes) -> Iterator[bytes]:
        for i in range(len(body)):
            self.sent.append(time.monotonic())
            yield body[i:i + 1]
            time.sleep(1.0)

    def __call__(self, seen: Seen, forward: Callable[[], Reply]) -> Reply:
        reply = forward()
        assert isinstance(reply.body, bytes)
        return Reply(reply.status, reply.headers, self._bytes(reply.body), length=len(reply.body))


def test_registry_one_byte_per_second_blob_fails_timeout_within_the_time_limit(svc: Service, registry):
    trickle = _Trickle()
    build, took, _ = _run(svc, registry, "trickle", trickle, None, timeout=SOFT + 30)
    assert (build.conversion_state, build.error_code) == ("FAILED", "timeout"), (build.error_code,
                                                                                   build.error_message)
    assert build.error_message == f"the conversion exceeded {SOFT} seconds"  # the soft limit, not the hard kill
    assert build.attempts == 1 and took < HARD + 10
    assert scratch_dirs(svc.api.s) == []
    # The abandoned download does not trickle on in the pool child (a thread and a socket per incident, for as long
    # as the server cares to send): its connection is gone, so the server's writes stop.
    time.sleep(4)
    assert time.monotonic() - trickle.sent[-1] > 2.5, f"still receiving {len(trickle.sent)} bytes in"
    _slot_is_free(svc, registry)


def test_registry_reset_mid_layer_once_resumes_in_the_same_attempt(svc: Service, registry):
    build, took, path = _run(svc, registry, "reset1", _forwarded(lambda r: setattr(r, "cut_after", 100_000)), 1,
                             timeout=60)
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert build.attempts == 1
    gets = [s for s in svc.front.seen if s.method == "GET" and s.path.endswith(path)]
    assert len(gets) == 2 and (gets[1].header("Range") or "").startswith("bytes=100000-")
    _slot_is_free(svc, registry)


def test_registry_reset_mid_layer_every_time_is_retried_with_backoff_then_fails(svc: Service, registry):
    # 1,000 bytes per connection: resuming makes progress, too little to finish within the retry budget.
    build, took, path = _run(svc, registry, "resetall", _forwarded(lambda r: setattr(r, "cut_after", 1000)),
                             None, timeout=120)
    assert build.conversion_state == "FAILED", (build.error_code, build.error_message)
    assert build.error_code in {"registry_unavailable", "size_mismatch"}, (build.error_code, build.error_message)
    trail = events(svc.api.s, str(build.id))
    assert build.attempts == 2  # transient: retried once (max_attempts=2), after a backoff, then given up
    assert sum(dst in TERMINAL for _, dst, _ in trail) == 1
    requests_made = svc.front.count("GET", path)
    assert requests_made <= 2 * 6  # each attempt's retries are bounded too
    _slot_is_free(svc, registry)
    assert svc.front.count("GET", path) == requests_made  # and nothing retries it after it FAILED


def test_registry_blob_other_than_promised_fails_digest_mismatch_at_once(svc: Service, registry):
    build, took, path = _run(svc, registry, "otherdigest",
                             _forwarded(lambda r: setattr(r, "body", bytes(len(r.body)))), None, timeout=60)
    assert (build.conversion_state, build.error_code) == ("FAILED", "digest_mismatch"), build.error_message
    assert build.attempts == 1 and took < 30  # not transient: no retry
    _slot_is_free(svc, registry)
