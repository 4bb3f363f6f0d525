"""The pull step downloads layers ahead in background threads while applying them strictly in order."""
from __future__ import annotations

import errno
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from common.errors import BlobUnknown, DigestMismatch
from common.image.filetree import Tree
from common.registry.blobcache import BlobStore
from tests.fixtures.disks import tmpfs_over
from tests.fixtures.hostile import Reply
from tests.fixtures.images import PushedImage, PushSession, make_layer, push_test_image, sha256
from tests.fixtures.registries import RunningRegistry
from tests.layertar import LayerTar
from worker.pipeline.host import DEFAULT_LIMITS
from worker.pipeline.pull import ABORT_GRACE_SECONDS, PREFETCH_THREADS, PulledImage, pull

pytestmark = pytest.mark.integration


def prefetch_threads(within: float = 0.0) -> list[str]:
    """The prefetch threads alive, waiting up to `within` seconds for them to end (after a failure the pull
    does not join them; they end once their download has, within ABORT_GRACE_SECONDS for a live registry)."""
    deadline = time.monotonic() + within
    while True:
        alive = [t.name for t in threading.enumerate() if t.name.startswith("nitroconv-prefetch")]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.02)


def layered_image(registry: RunningRegistry, repo: str, count: int) -> PushedImage:
    """`count` layers, each replacing /data and deleting the previous layer's own file: only the last one's
    content survives when they are applied in order."""
    layers = []
    for i in range(count):
        tar = LayerTar().file("data", f"layer {i}\n".encode()).file(f"only-{i}", b"x" * (1000 * (i + 1)))
        if i:
            tar = tar.whiteout("", f"only-{i - 1}")
        layers.append(make_layer(tar.bytes()))
    return push_test_image(registry, repo, "v1", layers)


def do_pull(registry: RunningRegistry, ref: str, work: Path, progress: list[float]) -> tuple[Tree, PulledImage]:
    tree = Tree()
    image = pull(ref, tree, credentials=None, insecure_registries=frozenset({registry.host}),
                 cache=BlobStore(work / "cache"), spool_dir=work / "spool", limits=DEFAULT_LIMITS,
                 progress=progress.append)
    return tree, image


def test_pull_prefetch_applies_in_order_and_fills_the_cache(registry: RunningRegistry, repo_name: str,
                                                            tmp_path: Path) -> None:
    count = 2 * PREFETCH_THREADS + 1
    pushed = layered_image(registry, repo_name, count)
    progress: list[float] = []
    tree, image = do_pull(registry, pushed.ref, tmp_path, progress)
    assert image.layers == count
    data = tree.lookup(b"data")
    assert data is not None and data.content is not None
    with data.content.open() as f:
        assert f.read() == f"layer {count - 1}\n".encode()
    assert [name for name in tree.root.children] == [b"data", f"only-{count - 1}".encode()]
    assert progress == sorted(progress) and progress[-1] == 1.0 and len(progress) == count
    cache = BlobStore(tmp_path / "cache")
    assert all(cache.path(layer.digest).is_file() for layer in pushed.layers)
    assert prefetch_threads() == []


def test_pull_prefetch_failure_surfaces_at_the_layers_turn(registry: RunningRegistry, repo_name: str,
                                                           tmp_path: Path) -> None:
    pushed = layered_image(registry, repo_name, 4)
    broken = pushed.layers[2]
    resp = PushSession(registry).request("DELETE", f"/v2/{repo_name}/blobs/{broken.digest}", repo_name)
    assert resp.status_code == 202, resp.text
    progress: list[float] = []
    with pytest.raises(BlobUnknown):
        do_pull(registry, pushed.ref, tmp_path, progress)
    assert len(progress) == 2, "layers 0 and 1 were applied before layer 2's download error was raised"
    assert prefetch_threads(within=ABORT_GRACE_SECONDS) == []
    # Layer 3 was downloaded ahead (a thread freed by layer 0 took it), although the pull failed before it.
    assert registry.log_lines(rf"GET /v2/{repo_name}/blobs/{pushed.layers[3].digest}")
    cache = BlobStore(tmp_path / "cache")
    assert not cache.path(broken.digest).exists()


def test_pull_prefetch_apply_failure_stops_cleanly(registry: RunningRegistry, repo_name: str,
                                                   tmp_path: Path) -> None:
    """The first layer lies about its DiffID: the pull fails there, and the downloads running ahead end."""
    good = [make_layer(LayerTar().file(f"f{i}", bytes(200_000)).bytes()) for i in range(5)]
    liar = make_layer(LayerTar().file("a", b"a").bytes())
    pushed = push_test_image(registry, repo_name, "lie", [liar, *good],
                             diff_ids=[sha256(b"not the tar"), *(g.diff_id for g in good)])
    progress: list[float] = []
    with pytest.raises(DigestMismatch):
        do_pull(registry, pushed.ref, tmp_path, progress)
    assert progress == []
    assert prefetch_threads(within=ABORT_GRACE_SECONDS) == []


def test_pull_evicts_older_blobs_as_it_adds_layers(registry: RunningRegistry, repo_name: str, tmp_path: Path) -> None:
    """A bounded cache makes room while the pull adds layers (not only after the conversion), never evicting
    the layers this pull uses."""
    import os

    from common.registry.digest import Digest
    from common.registry.manifests import Descriptor

    cache = BlobStore(tmp_path / "cache", max_bytes=64 * 1024)
    old = []
    for _ in range(8):  # 8 x 16 KiB used an hour ago: already twice the bound
        data = os.urandom(16 * 1024)
        path = cache.path(Digest.of(data))
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, (time.time() - 3600, time.time() - 3600))
        old.append(path)
    pushed = layered_image(registry, repo_name, 3)
    tree = Tree()
    pull(pushed.ref, tree, credentials=None, insecure_registries=frozenset({registry.host}), cache=cache,
         spool_dir=tmp_path / "spool", limits=DEFAULT_LIMITS, progress=lambda _: None)
    assert all(cache.get(Descriptor(layer.media_type, Digest.parse(layer.digest), len(layer.blob))) is not None
               for layer in pushed.layers)
    assert cache.usage() <= 64 * 1024 and sum(p.exists() for p in old) < len(old)


def _spooled(work: Path) -> bool:
    return any(p.stat().st_size for p in (work / "spool").glob("layer-0000-*.spool"))


def _second_half_held(work: Path, seen_while_held: list[bool]) -> Callable[..., Reply]:
    """A blob reply whose second half waits until the pull into `work` spooled some of the layer's first file,
    so the apply is certainly following the download when the rest arrives; `seen_while_held` records it."""

    def held(seen, forward) -> Reply:  # type: ignore[no-untyped-def]
        reply = forward()
        body = reply.body
        assert isinstance(body, bytes)

        def halves():  # type: ignore[no-untyped-def]
            yield body[:len(body) // 2]
            deadline = time.monotonic() + 10
            while not _spooled(work) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen_while_held.append(_spooled(work))
            yield body[len(body) // 2:]

        reply.body, reply.length = halves(), len(body)
        return reply

    return held


def test_pull_applies_a_layer_while_it_downloads(registry: RunningRegistry, hostile_front, repo_name: str,
                                                 tmp_path: Path) -> None:
    """The registry holds back the second half of the only layer until some of its first file is spooled: a pull
    that waited for the whole blob before applying it would never spool anything while the body is held. (The
    download hands on its bytes a MiB at a time: the layer is incompressible and several MiB.)"""
    first, second = random.Random(4).randbytes(8 << 20), b"2" * 100_000
    pushed = push_test_image(registry, repo_name, "v1",
                             [make_layer(LayerTar().file("a", first).file("b", second).bytes())])
    front = hostile_front(registry.host)
    seen_while_held: list[bool] = []
    front.on("GET", f"/blobs/{pushed.layers[0].digest}", _second_half_held(tmp_path, seen_while_held))
    tree = Tree()
    pull(f"{front.host}/{repo_name}:v1", tree, credentials=None, insecure_registries=frozenset({front.host}),
         cache=BlobStore(tmp_path / "cache"), spool_dir=tmp_path / "spool", limits=DEFAULT_LIMITS,
         progress=lambda done: None)
    assert seen_while_held == [True]
    node = tree.lookup(b"b")
    assert node is not None and node.content is not None
    with node.content.open() as f:
        assert f.read() == second
    assert BlobStore(tmp_path / "cache").path(pushed.layers[0].digest).is_file()


def test_pull_following_a_download_with_wrong_bytes_is_digest_mismatch(registry: RunningRegistry, hostile_front,
                                                                       repo_name: str, tmp_path: Path) -> None:
    """Bytes of the right size that are not the blob: the apply stumbles on them first, and the pull reports
    what the download found (the digest), not a corrupt layer; nothing reaches the cache."""
    pushed = push_test_image(registry, repo_name, "v1", [make_layer(LayerTar().file("a", b"a" * 300_000).bytes())])
    front = hostile_front(registry.host)

    def zeros(seen, forward):  # type: ignore[no-untyped-def]
        reply = forward()
        reply.body = bytes(len(reply.body))
        return reply

    front.on("GET", f"/blobs/{pushed.layers[0].digest}", zeros)
    with pytest.raises(DigestMismatch):
        pull(f"{front.host}/{repo_name}:v1", Tree(), credentials=None, insecure_registries=frozenset({front.host}),
             cache=BlobStore(tmp_path / "cache"), spool_dir=tmp_path / "spool", limits=DEFAULT_LIMITS,
             progress=lambda done: None)
    assert not BlobStore(tmp_path / "cache").path(pushed.layers[0].digest).exists()
    assert prefetch_threads(within=ABORT_GRACE_SECONDS) == []


def test_pull_disk_full_while_following_a_download_is_the_disk_error(registry: RunningRegistry, hostile_front,
                                                                     repo_name: str, tmp_path: Path) -> None:
    """The blob cache fills up while the apply follows the download: the pull raises the disk's own ENOSPC (so
    the worker fails the build `resource_limit` and does not retry it), not a registry fault or a broken read."""
    (tmp_path / "cache").mkdir()
    pushed = push_test_image(registry, repo_name, "v1",
                             [make_layer(LayerTar().file("a", random.Random(5).randbytes(8 << 20)).bytes())])
    front = hostile_front(registry.host)
    seen_while_held: list[bool] = []
    front.on("GET", f"/blobs/{pushed.layers[0].digest}", _second_half_held(tmp_path, seen_while_held))
    with tmpfs_over(tmp_path / "cache", 6) as cache, pytest.raises(OSError) as raised:
        pull(f"{front.host}/{repo_name}:v1", Tree(), credentials=None, insecure_registries=frozenset({front.host}),
             cache=BlobStore(cache), spool_dir=tmp_path / "spool", limits=DEFAULT_LIMITS,
             progress=lambda done: None)
    assert seen_while_held == [True]
    assert raised.value.errno == errno.ENOSPC, raised.value
    assert front.count("GET", f"/blobs/{pushed.layers[0].digest}") == 1  # a full disk is not resumed
    assert prefetch_threads(within=ABORT_GRACE_SECONDS) == []
