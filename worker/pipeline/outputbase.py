"""The output image's optional base (the host's `output_base`): resolving it and copying its layers to the output."""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import IO

from common.errors import InvalidManifest, UnsupportedMediaType
from common.registry.blobcache import BlobStore
from common.registry.client import Credentials, RegistryClient
from common.registry.hostpolicy import HostPolicy
from common.registry.manifests import Descriptor
from common.registry.reference import Reference, parse_reference

# Docker's layer types hold the same bytes as the OCI ones; an OCI manifest must name OCI types.
_LAYER_TYPES = {
    "application/vnd.oci.image.layer.v1.tar": "application/vnd.oci.image.layer.v1.tar",
    "application/vnd.oci.image.layer.v1.tar+gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.oci.image.layer.v1.tar+zstd": "application/vnd.oci.image.layer.v1.tar+zstd",
    "application/vnd.docker.image.rootfs.diff.tar.gzip": "application/vnd.oci.image.layer.v1.tar+gzip",
    "application/vnd.docker.image.rootfs.diff.tar": "application/vnd.oci.image.layer.v1.tar",
}


@dataclass(frozen=True)
class BaseLayer:
    digest: str
    size: int
    media_type: str  # as the output manifest names it (OCI)
    descriptor: Descriptor  # as the base's manifest has it, for fetching


@dataclass(frozen=True)
class BaseImage:
    """A resolved base: its layers in order and its config document (a JSON object), as its registry serves them."""

    reference: Reference
    digest: str  # the platform manifest's digest, recorded in the output's labels
    layers: tuple[BaseLayer, ...]
    diff_ids: tuple[str, ...]
    config_json: str  # canonical JSON text, so the dataclass stays immutable and hashable

    @property
    def config(self) -> dict[str, object]:
        doc = json.loads(self.config_json)
        assert isinstance(doc, dict)
        return doc


def base_reference(text: str) -> Reference | None:
    """The configured base, parsed; None when none is configured (the output then has only our layer)."""
    text = text.strip()
    return parse_reference(text) if text else None


def resolve_base(ref: Reference, *, credentials: Credentials | None, insecure_registries: frozenset[str]) -> BaseImage:
    """Resolve the base for linux/amd64 (indexes walked) and check that its layers can be reused as they are."""
    policy = HostPolicy.allowing(insecure_registries)
    with RegistryClient.for_reference(ref, credentials=credentials, policy=policy) as client:
        resolved = client.resolve(ref)
    layers = []
    for descriptor in resolved.layers:
        media_type = _LAYER_TYPES.get(descriptor.media_type)
        if media_type is None:
            # Foreign/non-distributable layers cannot be copied into another repository.
            raise UnsupportedMediaType(f"base image {ref} has a layer of type {descriptor.media_type}",
                                       details={"media_type": descriptor.media_type})
        layers.append(BaseLayer(str(descriptor.digest), descriptor.size, media_type, descriptor))
    if len(layers) != len(resolved.diff_ids):
        raise InvalidManifest(f"base image {ref} has {len(layers)} layers but {len(resolved.diff_ids)} diff_ids")
    config = json.loads(resolved.config_bytes)
    if not isinstance(config, dict):
        raise InvalidManifest(f"base image {ref} has a config that is not a JSON object")
    return BaseImage(
        reference=ref,
        digest=str(resolved.manifest_digest),
        layers=tuple(layers),
        diff_ids=tuple(str(d) for d in resolved.diff_ids),
        config_json=json.dumps(config, sort_keys=True, separators=(",", ":")),
    )


def copy_base_layers(
    dest: RegistryClient,
    dest_ref: Reference,
    base: BaseImage,
    *,
    cache: BlobStore,
    base_credentials: Credentials | None,
    policy: HostPolicy,
) -> None:
    """Make every base layer present in the output repository.

    On the same registry a cross-repository mount moves no bytes; where the registry declines the
    mount, or on another registry, the blob is fetched (once, into the verified blob cache) and
    uploaded. A layer the repository already has is not touched.
    """
    same_registry = base.reference.api_host == dest_ref.api_host
    source = dest if same_registry else RegistryClient.for_reference(
        base.reference, credentials=base_credentials, policy=policy)
    try:
        for layer in base.layers:
            def opener(layer: BaseLayer = layer) -> IO[bytes]:
                path = cache.get(layer.descriptor) or source.fetch_blob(
                    base.reference.repository, layer.descriptor, cache.path(layer.descriptor.digest))
                return path.open("rb")

            dest.upload_blob(dest_ref.repository, layer.descriptor.digest, layer.size, opener,
                             mount_from=base.reference.repository if same_registry else None)
    finally:
        if source is not dest:
            source.close()
