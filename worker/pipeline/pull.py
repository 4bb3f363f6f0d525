"""Pull step: resolve the input image (a registry, or a local Docker engine), verify every byte, apply its layers."""
from __future__ import annotations

import json
import logging
import os
import tarfile
import threading
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import BinaryIO, cast

from common.errors import DigestMismatch, InvalidLayer, InvalidManifest, LimitExceeded, RegistryError
from common.image.filetree import Tree
from common.image.layers import ApplyState, Limits, apply_layer
from common.registry.blobcache import BlobStore, open_layer
from common.registry.client import Credentials, FetchedManifest, RegistryClient
from common.registry.digest import Digest, HashingReader
from common.registry.hostpolicy import HostPolicy
from common.registry.manifests import Descriptor, load_json_object, parse_image_config
from common.registry.reference import DaemonImage, Reference, parse_image_source

Progress = Callable[[float], None]

# Layers downloading at once ahead of the one being applied: enough to keep a link busy while a layer
# is unpacked, few enough that one conversion does not hog the registry or the disk.
PREFETCH_THREADS = 3
# How long a failed pull waits for downloads already running before it lets them end on their own.
ABORT_GRACE_SECONDS = 5.0

log = logging.getLogger(__name__)


class DownloadFailed(Exception):
    """Raised to a reader following a download that failed; the download's own error is its future's."""


# What unpacking raises on bytes that are wrong or cut short: possibly the download's doing.
_BAD_BYTES = (DownloadFailed, InvalidLayer, LimitExceeded, tarfile.TarError, EOFError, zlib.error)


@dataclass(frozen=True)
class PulledImage:
    """What later steps need to know about the input, all derived from verified bytes."""

    name: str  # repository path, e.g. "library/busybox"; the EIF's ImageName
    config: dict[str, object]  # the image config document exactly as hashed
    config_digest: str
    input_digest: str | None  # what the reference resolved to in its registry; None from a local engine
    size: int  # compressed bytes fetched (registry) or uncompressed bytes (engine)
    layers: int


def pull(
    source: str,
    tree: Tree,
    *,
    credentials: Credentials | None,
    insecure_registries: frozenset[str],
    cache: BlobStore,
    spool_dir: Path,
    limits: Limits,
    progress: Progress,
    manifest: FetchedManifest | None = None,
) -> PulledImage:
    """Apply the image named by `source` into `tree`; `docker-daemon:NAME` reads from the local engine.

    `manifest`: the registry's answer for `source`, fetched earlier by the caller: what it names is pulled."""
    parsed = parse_image_source(source)
    if isinstance(parsed, DaemonImage):
        return _pull_daemon(parsed, tree, spool_dir=spool_dir, limits=limits, progress=progress)
    return _pull_registry(parsed, tree, credentials=credentials, insecure_registries=insecure_registries,
                          cache=cache, spool_dir=spool_dir, limits=limits, progress=progress, manifest=manifest)


def _pull_registry(
    ref: Reference,
    tree: Tree,
    *,
    credentials: Credentials | None,
    insecure_registries: frozenset[str],
    cache: BlobStore,
    spool_dir: Path,
    limits: Limits,
    progress: Progress,
    manifest: FetchedManifest | None = None,
) -> PulledImage:
    # The whole list, not just "is this host insecure": a token realm on another listed host must be reachable too.
    policy = HostPolicy.allowing(insecure_registries)
    state = ApplyState()
    with RegistryClient.for_reference(ref, credentials=credentials, policy=policy) as client:
        image = client.resolve(ref, top=manifest)
        total = max(image.compressed_size, 1)
        done = 0
        with _Prefetch(client, image.repository, cache, image.layers) as prefetch:
            for index, (descriptor, diff_id) in enumerate(zip(image.layers, image.diff_ids, strict=True)):
                # Downloads run ahead; applying stays strictly in order (a later layer's deletions must win).
                # A layer still downloading is applied as its bytes arrive; its end is read only once the
                # whole blob is verified, so the DiffID check at that end covers verified bytes alone.
                source = prefetch.source(index)
                try:
                    with open_layer(source, descriptor.media_type, diff_id,
                                    max_bytes=limits.max_total_bytes) as layer:
                        try:
                            apply_layer(tree, cast(BinaryIO, layer), spool_dir=spool_dir, limits=limits,
                                        state=state)
                        except BaseException:
                            # Before the layer's reader closes: a read left blocked on bytes not yet downloaded
                            # (a time limit, a cancel) holds the decompressor's lock until this wakes it.
                            if not isinstance(source, Path):
                                source.close()
                            raise
                except _BAD_BYTES as exc:
                    # Bytes that fail to apply may be the download's fault (wrong or cut bytes): then its error,
                    # which says so, is raised instead, if it comes within the grace an aborted pull gives.
                    # Anything else (a time limit, a cancel) leaves at once: only _Prefetch's exit waits.
                    if not isinstance(source, Path):
                        prefetch.raise_download_error(index, exc)
                    raise
                prefetch.wait(index)
                done += descriptor.size
                progress(done / total)
    config = load_json_object(image.config_bytes, what="image config")
    return PulledImage(
        name=ref.repository,
        config=config,
        config_digest=str(image.manifest.config.digest),
        input_digest=str(image.digest),
        size=image.compressed_size,
        layers=len(image.layers),
    )


class _Following:
    """A blob read while it downloads: `read()` returns what the download has written (pread on a duplicate of
    its temporary file's descriptor), waits while it has no more, and gives the end only once the blob is
    verified. Owned by one reader, which closes it."""

    def __init__(self) -> None:
        self._changed = threading.Condition()
        self._fd: int | None = None
        self._size = 0
        self._end = False
        self._failed = False
        self._pos = 0
        self.closed = False
        self.claimed = False

    # --- the download's side
    def wrote(self, fd: int, size: int) -> None:
        with self._changed:
            if self._fd is None and not self.closed:
                self._fd = os.dup(fd)
            self._size = size
            self._changed.notify_all()

    def ended(self, *, failed: bool) -> None:
        with self._changed:
            self._end, self._failed = True, failed
            self._changed.notify_all()

    # --- the reader's side (enough of a file for the layer's decompressor)
    def read(self, size: int = -1) -> bytes:
        with self._changed:
            while self._pos >= self._size and not self._end and not self._failed and not self.closed:
                self._changed.wait()
            if self._failed or self.closed:
                raise DownloadFailed("the layer's download failed" if self._failed else "the pull was abandoned")
            fd, available = self._fd, self._size - self._pos
        if available <= 0 or fd is None:
            return b""
        data = os.pread(fd, available if size is None or size < 0 else min(size, available), self._pos)
        self._pos += len(data)
        return data

    def readinto(self, buffer: bytearray | memoryview) -> int:
        data = self.read(len(buffer))
        memoryview(buffer)[:len(data)] = data
        return len(data)

    def readable(self) -> bool:
        return True

    def close(self) -> None:
        with self._changed:
            self.closed = True
            fd, self._fd = self._fd, None
            self._changed.notify_all()  # a reader the pull left behind (ReadAhead) stops waiting for bytes
        if fd is not None:
            os.close(fd)


class _Prefetch:
    """Downloads an image's layers into the blob cache in background threads, at most PREFETCH_THREADS at once.

    `wait(i)` returns layer i's verified file, or raises what its download raised: a failure shows at
    that layer's turn, after the layers before it were applied. Leaving the block cancels downloads not
    yet started; a normal exit finds the rest done, while an abort (cancel, time limit, a cold shutdown's
    SIGTERM) waits for running ones at most ABORT_GRACE_SECONDS, then lets them end at their own
    timeouts: a hung registry must not hold the worker's shutdown for minutes of read timeouts and
    retries. The threads share the caller's `RegistryClient`, which supports concurrent blob downloads
    (one token cache, one pool).
    """

    def __init__(self, client: RegistryClient, repository: str, cache: BlobStore,
                 layers: Sequence[Descriptor]) -> None:
        self._client, self._repository, self._cache = client, repository, cache
        self._layers = layers
        self._pool = ThreadPoolExecutor(max_workers=PREFETCH_THREADS, thread_name_prefix="nitroconv-prefetch")
        self._futures: list[Future[Path]] = []
        self._following: list[_Following] = []

    def __enter__(self) -> _Prefetch:
        # One download per digest: an image may list the same blob twice, and two writers of one
        # cache path would only race to the same verified bytes.
        by_digest: dict[str, Future[Path]] = {}
        try:
            follow: dict[str, _Following] = {}
            for descriptor in self._layers:
                key = str(descriptor.digest)
                if key not in by_digest:
                    follow[key] = _Following()
                    by_digest[key] = self._pool.submit(self._fetch, descriptor, follow[key])
                self._futures.append(by_digest[key])
                self._following.append(follow[key])
        except BaseException:
            self._pool.shutdown(wait=True, cancel_futures=True)
            raise
        return self

    def _fetch(self, descriptor: Descriptor, following: _Following) -> Path:
        # The cache holds only verified blobs; the registry has just authorised this caller for the
        # manifest that names them, so a hit never lends one tenant's private layer to another.
        try:
            found = self._cache.get(descriptor)
            if found is not None:
                with found.open("rb") as f:  # a reader that asked before this hit was known follows the file
                    following.wrote(f.fileno(), descriptor.size)
                following.ended(failed=False)
                return found
            path = self._client.fetch_blob(self._repository, descriptor, self._cache.path(descriptor.digest),
                                           on_write=following.wrote)
        except BaseException:
            following.ended(failed=True)  # a follower never waits for bytes that will not come
            raise
        following.ended(failed=False)
        # Older blobs make room now, not after the conversion: this image's are in use, so never evicted.
        try:
            self._cache.trim()
        except OSError as exc:  # the layer is here and verified: a failed eviction pass costs disk only
            log.warning("blob cache: eviction pass failed: %s", exc)
        return path

    def wait(self, index: int) -> Path:
        return self._futures[index].result()

    def raise_download_error(self, index: int, cause: BaseException) -> None:
        """Raise layer `index`'s download error, if its download fails within ABORT_GRACE_SECONDS (or fails
        already, for `DownloadFailed`); return if it succeeds or is still running."""
        future = self._futures[index]
        wait_futures([future], timeout=None if isinstance(cause, DownloadFailed) else ABORT_GRACE_SECONDS)
        if future.done() and future.exception() is not None:
            # Its own chain stays (`from cause` would replace it: a disk-full under a registry error would be
            # lost); Python links `cause` as the context.
            raise cast(BaseException, future.exception())

    def source(self, index: int) -> Path | BinaryIO:
        """Layer `index`'s verified file when its download is over, else a reader following the download
        (once per blob: a blob listed again is read from the file its first download made)."""
        future, following = self._futures[index], self._following[index]
        if future.done() or following.claimed:
            return future.result()
        following.claimed = True
        return cast(BinaryIO, following)

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        for following in self._following:
            following.close()  # a reader that left early (an error) leaves its duplicate descriptor here
        if exc_type is None:
            self._pool.shutdown(wait=True)
            return
        self._pool.shutdown(wait=False, cancel_futures=True)
        # A download that is about to end is let end, so an ordinary failure leaves no thread behind;
        # a hung one is not waited for beyond the grace.
        wait_futures([f for f in self._futures if not f.done()], timeout=ABORT_GRACE_SECONDS)


def _pull_daemon(
    image: DaemonImage, tree: Tree, *, spool_dir: Path, limits: Limits, progress: Progress
) -> PulledImage:
    """Read `docker save` output from the engine (the docker SDK), then verify and apply it like a registry image."""
    import docker
    import docker.errors

    name = str(image.image_id if image.image_id is not None else image.reference)
    try:
        client = docker.from_env()
        archive = spool_dir / "docker-save.tar"
        spool_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        # 0600: the image's bytes are the tenant's, and nothing else on the worker needs to read them.
        with open(os.open(archive, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as out:
            for chunk in client.images.get(name).save(named=False):
                out.write(chunk)
    except docker.errors.ImageNotFound as exc:
        raise RegistryError(f"no image {name!r} in the local Docker engine", code="manifest_unknown") from exc
    except docker.errors.DockerException as exc:
        raise RegistryError(f"cannot read {name!r} from the local Docker engine: {exc}",
                            code="docker_unavailable") from exc
    state = ApplyState()
    try:
        with tarfile.open(archive, "r:") as tar:
            manifest = json.loads(_member_bytes(tar, "manifest.json"))
            if not isinstance(manifest, list) or len(manifest) != 1:
                raise InvalidManifest("docker save returned an unexpected manifest.json")
            config_bytes = _member_bytes(tar, manifest[0]["Config"])
            config = parse_image_config(config_bytes)
            layer_paths = manifest[0]["Layers"]
            if len(layer_paths) != len(config.diff_ids):
                raise InvalidManifest("docker save: layer count differs from the config's diff_ids")
            for i, (path, diff_id) in enumerate(zip(layer_paths, config.diff_ids, strict=True)):
                raw = tar.extractfile(_member(tar, path))
                assert raw is not None
                reader = HashingReader(raw)
                # The applier reads each layer to its end, so the digest covers every byte the engine sent.
                apply_layer(tree, cast(BinaryIO, reader), spool_dir=spool_dir, limits=limits, state=state)
                if reader.digest() != diff_id:
                    raise DigestMismatch(f"layer {i} from the engine does not match diff_id {diff_id}")
                progress((i + 1) / len(layer_paths))
        size = archive.stat().st_size
    finally:
        archive.unlink(missing_ok=True)
    config_doc = load_json_object(config_bytes, what="image config")
    return PulledImage(
        name=image.reference.repository if image.reference is not None else str(image.image_id),
        config=config_doc,
        config_digest=str(Digest.of(config_bytes)),
        input_digest=None,
        size=size,
        layers=len(config.diff_ids),
    )


def _member(tar: tarfile.TarFile, name: str) -> tarfile.TarInfo:
    clean = str(PurePosixPath(name))
    try:
        return tar.getmember(clean)
    except KeyError as exc:
        raise InvalidManifest(f"docker save archive lacks {clean!r}") from exc


def _member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(_member(tar, name))
    if f is None:
        raise InvalidManifest(f"docker save archive member {name!r} is not a file")
    return f.read(16 << 20)
