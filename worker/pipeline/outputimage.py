"""The converted image of DESIGN.md §5 step 4: one deterministic layer with the EIF and its JSON, plus config and manifest."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from common.blobstore import open_layer
from common.eif import Measurements
from common.errors import InvalidManifest
from common.hostpolicy import HostPolicy
from common.reference import parse_reference
from common.registry import Credentials, RegistryClient
from worker.pipeline.outputbase import BaseImage

LAYER_MEDIA_TYPE = "application/vnd.oci.image.layer.v1.tar+gzip"
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
LABEL_PREFIX = "dev.nitroconv."
# Level 1: the EIF is mostly an uncompressed cpio; higher levels cost seconds per 100 MB for a few percent.
GZIP_LEVEL = 1
# Every timestamp the output carries: equal inputs must give equal digests.
FIXED_CREATED = "1970-01-01T00:00:00Z"
HISTORY_CREATED_BY = "nitroconv: /enclave (app.eif, launch.json, measurements.json, run)"
# The launcher, the output image's entrypoint (worker/runtime/launcher.c).
ENTRYPOINT = ["/enclave/run"]


@dataclass(frozen=True)
class Blob:
    digest: str
    size: int
    media_type: str


@dataclass(frozen=True)
class OutputLayer:
    path: Path
    blob: Blob
    diff_id: str
    eif_sha256: str


class _HashingWriter(io.RawIOBase):
    """Counts and hashes what passes through, so digests need no second read of the layer."""

    def __init__(self, sink: BinaryIO) -> None:
        self._sink, self.sha, self.size = sink, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b: bytes) -> int:  # type: ignore[override]
        self.sha.update(b)
        self.size += len(b)
        self._sink.write(b)
        return len(b)


class _HashingReader:
    """Hashes the EIF while tar copies it, giving `eif_sha256` without reading the file twice."""

    def __init__(self, source: BinaryIO) -> None:
        self._source, self.sha = source, hashlib.sha256()

    def read(self, n: int = -1, /) -> bytes:
        data = self._source.read(n)
        self.sha.update(data)
        return data


def _tarinfo(name: str, size: int, mode: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, mode, kind
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info


def write_layer(eif: Path, files: Mapping[str, bytes], out_path: Path) -> OutputLayer:
    """Write `enclave/` with the EIF and the small files, gzip'd with no name or time, so equal inputs give equal digests."""
    with out_path.open("wb") as raw:
        compressed = _HashingWriter(raw)
        with gzip.GzipFile(filename="", mode="wb", fileobj=compressed, compresslevel=GZIP_LEVEL, mtime=0) as gz:
            plain = _HashingWriter(gz)  # type: ignore[arg-type]
            with tarfile.open(fileobj=plain, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
                tar.addfile(_tarinfo("enclave", 0, 0o755, tarfile.DIRTYPE))
                with eif.open("rb") as src:
                    reader = _HashingReader(src)
                    tar.addfile(_tarinfo("enclave/app.eif", eif.stat().st_size, 0o644), cast(BinaryIO, reader))
                for name in sorted(files):
                    data = files[name]
                    mode = 0o755 if name == "run" else 0o644
                    tar.addfile(_tarinfo(f"enclave/{name}", len(data), mode), io.BytesIO(data))
    blob = Blob(f"sha256:{compressed.sha.hexdigest()}", compressed.size, LAYER_MEDIA_TYPE)
    return OutputLayer(out_path, blob, f"sha256:{plain.sha.hexdigest()}", reader.sha.hexdigest())


def labels(measurements: Measurements, input_digest: str) -> dict[str, str]:
    found = {"pcr0": measurements.pcr0, "pcr1": measurements.pcr1, "pcr2": measurements.pcr2,
             "pcr8": measurements.pcr8, "hash-algorithm": "sha384", "input-digest": input_digest}
    return {LABEL_PREFIX + k: v for k, v in found.items() if v}


def config_json(layer: OutputLayer, image_labels: Mapping[str, str], entrypoint: list[str] | None,
                base: BaseImage | None = None) -> bytes:
    """The image config: fixed `created`, fixed history timestamp, sorted keys, so it is byte-stable.

    With a base, it is the base's config with our layer's diff_id appended, our Entrypoint, our
    labels merged over the base's, and one history entry for our layer.
    """
    doc: dict[str, object] = base.config if base is not None else {"architecture": "amd64", "os": "linux"}
    inner = doc.get("config")
    config: dict[str, object] = dict(inner) if isinstance(inner, dict) else {}
    # The base's CMD would reach the launcher as extra arguments for the enclave's program.
    config.pop("Cmd", None)
    config.pop("Entrypoint", None)
    if entrypoint:
        config["Entrypoint"] = list(entrypoint)
    base_labels = config.get("Labels")
    merged = {k: v for k, v in (base_labels.items() if isinstance(base_labels, dict) else ())
              if not str(k).startswith(LABEL_PREFIX)}  # a converted base's measurements are not ours
    merged.update(image_labels)
    if base is not None:
        merged[LABEL_PREFIX + "base"] = f"{base.reference.name}@{base.digest}"
    config["Labels"] = dict(sorted(merged.items()))
    doc["config"] = config
    doc["created"] = FIXED_CREATED
    doc["rootfs"] = {"type": "layers", "diff_ids": [*(base.diff_ids if base else ()), layer.diff_id]}
    history = doc.get("history")
    if isinstance(history, list):
        doc["history"] = [*history, {"created": FIXED_CREATED, "created_by": HISTORY_CREATED_BY}]
    return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def blob_of(data: bytes, media_type: str) -> Blob:
    return Blob(f"sha256:{hashlib.sha256(data).hexdigest()}", len(data), media_type)


def manifest_json(config: Blob, layer: Blob, annotations: Mapping[str, str], base_layers: Sequence[Blob] = ()
                  ) -> bytes:
    def desc(b: Blob) -> dict[str, object]:
        return {"mediaType": b.media_type, "digest": b.digest, "size": b.size}

    doc: dict[str, object] = {
        "schemaVersion": 2,
        "mediaType": MANIFEST_MEDIA_TYPE,
        "config": desc(config),
        "layers": [desc(b) for b in (*base_layers, layer)],
    }
    if annotations:
        doc["annotations"] = dict(sorted(annotations.items()))
    return json.dumps(doc, separators=(",", ":")).encode()


def fetch_eif(image: str, out: Path, *, credentials: Credentials | None, insecure_registries: frozenset[str]) -> str:
    """Download a converted image and write its `/enclave/app.eif` to `out`; returns the EIF's sha256 hex."""
    ref = parse_reference(image)
    # The whole list, not just "is this host insecure": a token realm on another listed host must be reachable too.
    policy = HostPolicy.allowing(insecure_registries)
    with tempfile.TemporaryDirectory(prefix="nitroconv-fetch-") as tmp, \
            RegistryClient.for_reference(ref, credentials=credentials, policy=policy) as client:
        resolved = client.resolve(ref)
        if not resolved.layers:
            raise InvalidManifest(f"{ref} is not a nitroconv output image (it has no layers)")
        # Ours is the last layer; any before it are the output base's (NITROCONV_OUTPUT_BASE_IMAGE).
        descriptor, diff_id = resolved.layers[-1], resolved.diff_ids[-1]
        blob = client.fetch_blob(resolved.repository, descriptor, Path(tmp) / "layer")
        with open_layer(blob, descriptor.media_type, diff_id) as layer, \
                tarfile.open(fileobj=cast(BinaryIO, layer), mode="r|") as tar:
            for member in tar:
                if member.name == "enclave/app.eif" and member.isfile():
                    source = tar.extractfile(member)
                    assert source is not None
                    sha = hashlib.sha256()
                    with out.open("wb") as sink:
                        while chunk := source.read(1 << 20):
                            sha.update(chunk)
                            sink.write(chunk)
                    return sha.hexdigest()
    raise InvalidManifest(f"{ref} has no /enclave/app.eif")
