"""Small distinct images for the scale figure: deploy/sample_image.py's busybox base plus one layer per image.

Each image's second layer holds a file naming the run and the image, so every manifest digest differs
from every other (in this run and any earlier one) and no conversion cache can serve one from another;
the busybox layer is shared, as a real fleet's base layers are. All go to one repository, one tag each,
so the base layer is uploaded once.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable
from typing import BinaryIO

from common.registry.client import RegistryClient
from common.registry.digest import Digest
from common.registry.reference import parse_reference
from deploy.sample_image import HELLO, base_layer

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
FIXED_MTIME = 1_700_000_000


def _app_layer(marker: bytes) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("app", None), ("app/hello.sh", HELLO), ("app/id", marker)):
            info = tarfile.TarInfo(name)
            info.mtime = FIXED_MTIME
            if data is None:
                info.type, info.mode = tarfile.DIRTYPE, 0o755
                tar.addfile(info)
            else:
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _opener(blob: bytes) -> Callable[[], BinaryIO]:
    return lambda: io.BytesIO(blob)


def push_small_images(registry: str, repository: str, tags: list[str], salt: str) -> list[str]:
    """Push one image per tag to `registry`/`repository` (plain HTTP); returns their references."""
    base = base_layer()
    base_blob = gzip.compress(base, mtime=0)
    ref = parse_reference(f"{registry}/{repository}:{tags[0]}")
    refs: list[str] = []
    with RegistryClient.for_reference(ref, insecure=True) as client:
        client.upload_blob(ref.repository, Digest.of(base_blob), len(base_blob), lambda: io.BytesIO(base_blob))
        for tag in tags:
            app = _app_layer(f"{salt} {tag}\n".encode())
            app_blob = gzip.compress(app, mtime=0)
            config = json.dumps({
                "architecture": "amd64", "os": "linux",
                "config": {"Entrypoint": ["/bin/sh", "/app/hello.sh"], "Cmd": [tag],
                           "Env": ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"], "WorkingDir": "/app"},
                "rootfs": {"type": "layers", "diff_ids": [f"sha256:{hashlib.sha256(t).hexdigest()}"
                                                          for t in (base, app)]},
            }, sort_keys=True).encode()
            manifest = {
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": str(Digest.of(config)), "size": len(config)},
                "layers": [{"mediaType": OCI_LAYER_GZIP, "digest": str(Digest.of(b)), "size": len(b)}
                           for b in (base_blob, app_blob)],
            }
            for blob in (app_blob, config):
                client.upload_blob(ref.repository, Digest.of(blob), len(blob), _opener(blob))
            client.put_manifest(ref.repository, tag, OCI_MANIFEST, json.dumps(manifest).encode())
            refs.append(f"{registry}/{repository}:{tag}")
    return refs
