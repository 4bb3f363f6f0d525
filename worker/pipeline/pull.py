"""Pull step: resolve the input image (a registry, or a local Docker engine), verify every byte, apply its layers."""
from __future__ import annotations

import json
import os
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO, cast

from common.blobstore import BlobStore, open_layer
from common.digest import Digest, HashingReader
from common.errors import DigestMismatch, InvalidManifest, RegistryError
from common.filetree import Tree
from common.hostpolicy import HostPolicy
from common.layers import ApplyState, Limits, apply_layer
from common.oci import load_json_object, parse_image_config
from common.reference import DaemonImage, Reference, parse_image_source
from common.registry import Credentials, RegistryClient

Progress = Callable[[float], None]


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
) -> PulledImage:
    """Apply the image named by `source` into `tree`; `docker-daemon:NAME` reads from the local engine."""
    parsed = parse_image_source(source)
    if isinstance(parsed, DaemonImage):
        return _pull_daemon(parsed, tree, spool_dir=spool_dir, limits=limits, progress=progress)
    return _pull_registry(parsed, tree, credentials=credentials, insecure_registries=insecure_registries,
                          cache=cache, spool_dir=spool_dir, limits=limits, progress=progress)


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
) -> PulledImage:
    # The whole list, not just "is this host insecure": a token realm on another listed host must be reachable too.
    policy = HostPolicy.allowing(insecure_registries)
    state = ApplyState()
    with RegistryClient.for_reference(ref, credentials=credentials, policy=policy) as client:
        image = client.resolve(ref)
        total = max(image.compressed_size, 1)
        done = 0
        for descriptor, diff_id in zip(image.layers, image.diff_ids, strict=True):
            # The cache holds only verified blobs; the registry has just authorised this caller for the
            # manifest that names them, so a hit never lends one tenant's private layer to another.
            path = cache.get(descriptor) or client.fetch_blob(image.repository, descriptor,
                                                              cache.path(descriptor.digest))
            with open_layer(path, descriptor.media_type, diff_id, max_bytes=limits.max_total_bytes) as layer:
                apply_layer(tree, cast(BinaryIO, layer), spool_dir=spool_dir, limits=limits, state=state)
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
