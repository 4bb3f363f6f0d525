"""Hostile images and misbehaving registries through the whole service (API → Redis → worker process →
Postgres): RELIABILITY.md §C and §D end to end. Each case ends FAILED with its code or converts correctly,
and the worker's host is never written outside its scratch dir."""
from __future__ import annotations

import hashlib
import os
import secrets
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from common.settings import Settings
from common.store import engine as database
from common.store.engine import create_database_if_missing, drop_database, migrate
from tests.fixtures.hostile import HostileRegistry, Reply, Seen
from tests.fixtures.images import LayerBlob, make_layer, make_tar, push_test_image
from tests.fixtures.registries import RunningRegistry
from tests.fixtures.service import PG_BASE
from tests.layertar import LayerTar, header_block

from .conftest import Api, RedisServer, Stack, api_for, blobs_dir, runtime_dir, scratch_dirs, wait_terminal

pytestmark = pytest.mark.integration


@dataclass
class Service:
    s: Settings
    api: Api
    front: HostileRegistry      # in front of the anonymous registry
    auth_front: HostileRegistry  # in front of the basic-auth registry
    cdn: HostileRegistry         # another host, where redirects point


@pytest.fixture(scope="module")
def svc(registry: RunningRegistry, basic_registry: RunningRegistry,
        tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """One worker for every case; each case's rules match only its own image's blobs."""
    tmp = tmp_path_factory.mktemp("hostile-service")
    fronts = [HostileRegistry(registry.host), HostileRegistry(basic_registry.host), HostileRegistry(None)]
    redis = RedisServer(tmp / "redis")
    redis.start()
    url = f"{PG_BASE}/nitroconv_hostile_{os.getpid()}_{secrets.token_hex(3)}"
    create_database_if_missing(url)
    migrate(url)
    (tmp / "state").mkdir()
    s = Settings(database_url=url, redis_url=redis.url, state_dir=tmp / "state", blobs_dir=blobs_dir(),
                 runtime_dir=runtime_dir(), secret_key=secrets.token_urlsafe(32).encode(), lease_seconds=10,
                 requeue_after_seconds=10, sweep_interval_seconds=5, max_attempts=3, soft_time_limit=120,
                 time_limit=150, visibility_timeout=900,
                 insecure_registries=frozenset({registry.host, basic_registry.host, *(f.host for f in fronts)}))
    stack = Stack(s)
    try:
        stack.worker("hostile")
        yield Service(s, api_for(s), *fronts)
    finally:
        stack.close()
        for front in fronts:
            front.close()
        redis.kill()
        database.engine_for(url).dispose()
        drop_database(url)


@pytest.fixture
def probe() -> Iterator[Path]:
    """A host path hostile entries aim at; it must never come into existence."""
    path = Path("/tmp") / f"nitroconv-probe-{uuid.uuid4().hex}"
    yield path
    assert not path.exists(), f"a hostile layer wrote to the worker's host: {path}"


def _run(svc: Service, src: str, auth: dict[str, str] | None = None):  # noqa: ANN202
    build_id = svc.api.submit(src, f"{svc.front.upstream}/hostile/out-{uuid.uuid4().hex[:8]}:1", auth=auth)
    build = wait_terminal(svc.s, build_id, timeout=120)
    assert scratch_dirs(svc.s) == []
    return build


def _ref(front: HostileRegistry, image) -> str:  # noqa: ANN001
    return f"{front.host}/{image.repo}:1"


def _base() -> bytes:
    return make_tar({"hello.txt": b"hello " + uuid.uuid4().bytes})


# --- §C: hostile layers ---------------------------------------------------------------------------------
def _raw_layer(tar: bytes) -> LayerBlob:
    return make_layer(tar, "gzip")


HOSTILE_LAYERS: dict[str, tuple[Callable[[Path], bytes], str, str | None]] = {
    # item 25: `..` entries clamp into the rootfs
    "dotdot": (lambda p: LayerTar().file(f"../../../../..{p}/pwn", b"x").bytes(), "SUCCEEDED", None),
    # item 26: absolute names are rootfs-relative
    "absolute": (lambda p: LayerTar().file(f"{p}/pwn", b"x").bytes(), "SUCCEEDED", None),
    # items 27/29: a symlink to the host path, then a write through it
    "symlink_then_write": (lambda p: LayerTar().symlink("x", str(p)).file("x/pwn", b"x").bytes(), "SUCCEEDED",
                           None),
    # item 31: a hardlink aiming outside resolves in the rootfs
    "hardlink_out": (lambda p: LayerTar().file("etc/passwd", b"root:x:0:0::/:/bin/sh\n")
                     .link("evil", "../../../../../etc/passwd").bytes(), "SUCCEEDED", None),
    # item 33: a hardlink to nothing
    "hardlink_missing": (lambda p: LayerTar().link("evil", f"{p}/nothing").bytes(), "FAILED", "invalid_layer"),
    # item 37: a symlink loop written through
    "symlink_loop": (lambda p: LayerTar().symlink("a", "b").symlink("b", "a").file("a/x", b"x").bytes(), "FAILED",
                     "symlink_loop"),
    # item 38: device nodes and FIFOs are metadata only
    "devices": (lambda p: LayerTar().char("dev/evil", 8, 0).fifo("etc/fifo").bytes(), "SUCCEEDED", None),
    # item 40: a header declaring 1 TiB, no data behind it
    "declared_bomb": (lambda p: header_block(b"huge", size=1 << 40), "FAILED", "limit_exceeded"),
    # item 43: a path deeper than the limit
    "too_deep": (lambda p: LayerTar().file("/".join(["d"] * 300) + "/f", b"x").bytes(), "FAILED", "name_too_long"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_LAYERS))
def test_hostile_layer_through_the_service(svc: Service, registry, probe: Path, case: str):
    build_layer, state, code = HOSTILE_LAYERS[case]
    passwd = Path("/etc/passwd").read_bytes()
    image = push_test_image(registry, f"hostile/{case}-{uuid.uuid4().hex[:6]}", "1",
                            [_base(), _raw_layer(build_layer(probe))])
    build = _run(svc, _ref(svc.front, image))
    assert (build.conversion_state, build.error_code) == (state, code), build.error_message
    if state == "SUCCEEDED":
        assert build.pcr0 and build.output_digest
    assert Path("/etc/passwd").read_bytes() == passwd


# --- §D: registry misbehaviour --------------------------------------------------------------------------
def _alter(fn: Callable[[Reply], None]) -> Callable[[Seen, Callable[[], Reply]], Reply]:
    def respond(seen: Seen, forward: Callable[[], Reply]) -> Reply:
        reply = forward()
        fn(reply)
        return reply
    return respond


def test_hostile_registry_corrupted_blob_is_digest_mismatch(svc: Service, registry):
    image = push_test_image(registry, f"hostile/corrupt-{uuid.uuid4().hex[:6]}", "1", [_base()])
    svc.front.on("GET", f"/blobs/{image.layers[0].digest}", _alter(lambda r: setattr(r, "body", bytes(len(r.body)))))
    build = _run(svc, _ref(svc.front, image))
    assert (build.conversion_state, build.error_code) == ("FAILED", "digest_mismatch")


def test_hostile_registry_blob_of_the_wrong_size_is_size_mismatch(svc: Service, registry):
    image = push_test_image(registry, f"hostile/size-{uuid.uuid4().hex[:6]}", "1", [_base()])
    svc.front.on("GET", f"/blobs/{image.layers[0].digest}", _alter(lambda r: setattr(r, "body", r.body + b"\0")))
    build = _run(svc, _ref(svc.front, image))
    assert (build.conversion_state, build.error_code) == ("FAILED", "size_mismatch")


def test_hostile_registry_lying_digest_header_is_digest_mismatch(svc: Service, registry):
    image = push_test_image(registry, f"hostile/lie-{uuid.uuid4().hex[:6]}", "1", [_base()])
    fake = "sha256:" + hashlib.sha256(b"not the manifest").hexdigest()
    svc.front.on("GET", f"/{image.repo}/manifests/1", _alter(lambda r: r.headers.update({"Docker-Content-Digest": fake})))
    build = _run(svc, _ref(svc.front, image))
    assert (build.conversion_state, build.error_code) == ("FAILED", "digest_mismatch")


def test_hostile_registry_429_with_retry_after_is_waited_out(svc: Service, registry):
    image = push_test_image(registry, f"hostile/slow-{uuid.uuid4().hex[:6]}", "1", [_base()])
    path = f"/blobs/{image.layers[0].digest}"
    svc.front.on("GET", path, lambda seen, fwd: Reply(429, {"Retry-After": "1"}, b"slow down"), times=2)
    build = _run(svc, _ref(svc.front, image))
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    assert build.attempts == 1 and svc.front.count("GET", path) == 3


def test_hostile_registry_redirect_to_another_host_gets_no_credentials(svc: Service, basic_registry):
    image = push_test_image(basic_registry, f"hostile/cdn-{uuid.uuid4().hex[:6]}", "1", [_base()])
    layer = image.layers[0]
    svc.cdn.on("GET", f"/storage/{layer.digest[7:]}", lambda seen, fwd: Reply(200, {}, layer.blob))
    svc.auth_front.on("GET", f"/blobs/{layer.digest}", lambda seen, fwd: Reply(
        307, {"Location": f"{svc.cdn.url}/storage/{layer.digest[7:]}?sig=1"}, b""))
    build = _run(svc, _ref(svc.auth_front, image),
                 auth={"username": basic_registry.username, "password": basic_registry.password})
    assert build.conversion_state == "SUCCEEDED", (build.error_code, build.error_message)
    to_registry = [s for s in svc.auth_front.seen if layer.digest in s.path]
    assert to_registry and all((s.header("Authorization") or "").startswith("Basic ") for s in to_registry)
    to_cdn = [s for s in svc.cdn.seen if layer.digest[7:] in s.path]
    assert to_cdn and all(s.header("Authorization") is None for s in to_cdn)


def test_hostile_registry_redirect_to_cloud_metadata_is_refused(svc: Service, registry):
    image = push_test_image(registry, f"hostile/imds-{uuid.uuid4().hex[:6]}", "1", [_base()])
    svc.front.on("GET", f"/blobs/{image.layers[0].digest}", lambda seen, fwd: Reply(
        302, {"Location": "http://169.254.169.254/latest/meta-data/iam/security-credentials/"}, b""))
    build = _run(svc, _ref(svc.front, image))
    assert (build.conversion_state, build.error_code) == ("FAILED", "host_not_allowed")
