"""Push step: upload the output image's blobs (skipping those the registry has) and tag its manifest."""
from __future__ import annotations

import io
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING

from common.errors import InvalidReference
from common.registry.blobcache import BlobStore
from common.registry.client import Credentials, RegistryClient
from common.registry.digest import Digest
from common.registry.hostpolicy import HostPolicy
from common.registry.reference import Reference, parse_image_source
from worker.pipeline.outputbase import BaseImage, copy_base_layers
from worker.pipeline.outputimage import (
    CONFIG_MEDIA_TYPE,
    MANIFEST_MEDIA_TYPE,
    Blob,
    OutputLayer,
    blob_of,
    manifest_json,
)

if TYPE_CHECKING:
    from worker.pipeline.streamupload import LayerStream


@dataclass(frozen=True)
class Pushed:
    reference: str  # name:tag@digest of what was pushed
    digest: str
    size: int  # layers (the base's too) + config + manifest bytes


def output_reference(text: str) -> Reference:
    """The output must name a registry repository (not the local engine) with a tag, not a digest."""
    ref = parse_image_source(text)
    if not isinstance(ref, Reference):
        raise InvalidReference("the output image must be a registry reference, not docker-daemon:")
    if ref.digest is not None:
        raise InvalidReference("the output image is pushed under a tag; a digest cannot be chosen")
    return ref


def push(
    ref: Reference,
    layer: OutputLayer,
    config: bytes,
    annotations: Mapping[str, str],
    *,
    credentials: Credentials | None,
    insecure_registries: frozenset[str],
    base: BaseImage | None = None,
    cache: BlobStore | None = None,
    base_credentials: Credentials | None = None,
    layer_opener: Callable[[], IO[bytes]] | None = None,
    mount_from: str | None = None,
    streamed: LayerStream | None = None,
) -> Pushed:
    """Upload the base's layers (if any), ours, the config and the manifest. Re-running after a crash
    re-uploads nothing that landed. `cache` keeps base layers fetched from another registry.

    `layer_opener` reads our layer from elsewhere than `layer.path` (a held cache file); `mount_from`
    (a repository on the same registry that already holds our layer) is tried as a cross-repository
    mount first, and a registry that declines gets a normal upload.

    `streamed`: our layer, already sent into an open upload session while it was compressed; the session
    is closed here (PUT ?digest=) unless the registry has the blob already (then it is deleted). A stream
    that failed, or does not commit, leaves the normal upload to run as without it."""
    # The whole list, not just "is this host insecure": a token realm on another listed host must be reachable too.
    policy = HostPolicy.allowing(insecure_registries)
    config_blob = blob_of(config, CONFIG_MEDIA_TYPE)
    base_blobs = [Blob(b.digest, b.size, b.media_type) for b in base.layers] if base is not None else []
    manifest = manifest_json(config_blob, layer.blob, annotations, base_blobs)
    with RegistryClient.for_reference(ref, credentials=credentials, policy=policy) as client:
        if base is not None:
            if cache is None:
                raise ValueError("pushing onto a base image needs a blob cache")
            copy_base_layers(client, ref, base, cache=cache, base_credentials=base_credentials, policy=policy)
        layer_digest = Digest.parse(layer.blob.digest)
        committed = False
        if streamed is not None:
            if client.blob_exists(ref.repository, layer_digest, push=True):
                streamed.abandon()
            else:
                committed = streamed.commit(layer.blob.digest, layer.blob.size)
        if not committed:
            client.upload_blob(ref.repository, layer_digest, layer.blob.size,
                               layer_opener or (lambda: layer.path.open("rb")), mount_from=mount_from)
        client.upload_blob(ref.repository, Digest.parse(config_blob.digest), config_blob.size,
                           lambda: io.BytesIO(config))
        digest = client.put_manifest(ref.repository, ref.tag or "latest", MANIFEST_MEDIA_TYPE, manifest)
    name = f"{ref.name}:{ref.tag or 'latest'}@{digest}"
    size = layer.blob.size + config_blob.size + len(manifest) + sum(b.size for b in base_blobs)
    return Pushed(name, str(digest), size)

