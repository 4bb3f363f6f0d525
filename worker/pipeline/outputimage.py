"""The converted image of DESIGN.md §5 step 4: one deterministic layer with the EIF and its JSON, plus config and manifest."""
from __future__ import annotations

import hashlib
import json
import tarfile
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from common.enclave.measure import Measurements
from common.enclave.reader import CrcOfStream
from common.enclave.writer import KnownSpan, WrittenEif
from common.errors import InvalidEif, InvalidManifest
from common.image.compress import (
    GZIP_BLOCK,
    MEDIA_TYPES,
    KnownRange,
    StreamCompressor,
    open_compressor,
)
from common.registry.blobcache import open_layer
from common.registry.client import Credentials, RegistryClient
from common.registry.digest import Digest
from common.registry.hostpolicy import HostPolicy
from common.registry.reference import parse_reference
from common.util.atomicfile import atomic_file
from common.util.compression import Compression
from common.util.hashpipe import HashPipe, Writes
from worker.pipeline.outputbase import BaseImage

LAYER_MEDIA_TYPE = MEDIA_TYPES[Compression.GZIP]
CONFIG_MEDIA_TYPE = "application/vnd.oci.image.config.v1+json"
MANIFEST_MEDIA_TYPE = "application/vnd.oci.image.manifest.v1+json"
LABEL_PREFIX = "dev.nitroconv."
# Every timestamp the output carries: equal inputs must give equal digests.
FIXED_CREATED = "1970-01-01T00:00:00Z"
HISTORY_CREATED_BY = "nitroconv: /enclave (app.eif, launch.json, measurements.json, run)"
# The launcher, the output image's entrypoint (worker/runtime/launcher.c).
ENTRYPOINT = ["/enclave/run"]
# The launcher and the egress service it spawns.
EXECUTABLES = frozenset({"run", "egress"})


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


# The EIF is read in these pieces: one compressor block each.
_CHUNK = GZIP_BLOCK


def _tar_header(name: str, size: int, mode: int, kind: bytes = tarfile.REGTYPE) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.type = size, mode, kind
    info.mtime, info.uid, info.gid, info.uname, info.gname = 0, 0, 0, "", ""
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")


def _pad(n: int, unit: int = tarfile.BLOCKSIZE) -> bytes:
    return b"\0" * (-n % unit)


class _PlainTar:
    """The uncompressed layer as it is produced: hashed (the diff_id) in a thread and handed to the compressor.

    The bytes are those tarfile's "w|" mode writes for the same members (USTAR, then two zero blocks and
    padding to a 10 KiB record), so a layer's diff_id does not depend on which of the two wrote it.
    """

    def __init__(self, compressor: StreamCompressor) -> None:
        self._compressor = compressor
        self._sha = HashPipe(hashlib.sha256(), name="nitroconv-diffid")
        self.offset = 0

    def write(self, data: bytes) -> None:
        self._sha.update(data)
        self._compressor.write(data)
        self.offset += len(data)

    def member(self, name: str, data: bytes, mode: int) -> None:
        self.write(_tar_header(name, len(data), mode) + data + _pad(len(data)))

    def finish(self) -> str:
        self.write(b"\0" * (2 * tarfile.BLOCKSIZE))
        self.write(_pad(self.offset, tarfile.RECORDSIZE))
        return f"sha256:{self._sha.finish().hexdigest()}"

    def abort(self) -> None:
        self._sha.abort()


class _PipeWriter:
    """A file object whose writes are queued to a `HashPipe` over `Writes`."""

    def __init__(self, pipe: HashPipe) -> None:
        self._pipe = pipe

    def write(self, data: bytes) -> int:
        self._pipe.update(data)
        return len(data)


class _Tee:
    """The layer file, whose every compressed byte is also handed to a sink (a streamed upload) in file order."""

    def __init__(self, out: BinaryIO, sink: Callable[[bytes], None]) -> None:
        self._out, self._sink = out, sink

    def write(self, data: bytes) -> int:
        written = self._out.write(data)
        self._sink(data)
        return written


class LayerWriter:
    """The output layer made from an EIF's bytes as they come, in file order: `write()` each piece, then `finish()`.

    Each piece feeds the EIF's sha256, the tar's (the diff_id), the parallel compressor and its output's
    sha256 (each hash in a thread of its own), and the CRC that `finish()` holds to the writer's. The bytes
    come from a read of the written file (`write_layer`) or straight from the EIF writer (`tee`, when it wrote
    its header first): either way the layer holds exactly the bytes whose CRC passed.

    `sink` receives the compressed bytes as they are written to `out_path`, in order (a streamed upload, which
    commits nothing: the caller decides after every check whether what it received is pushed).
    """

    def __init__(self, out_path: Path, size: int, *, compression: Compression = Compression.GZIP,
                 spans: Sequence[KnownSpan] = (), threads: int | None = None,
                 sink: Callable[[bytes], None] | None = None) -> None:
        self.path, self.size, self._compression = out_path, size, compression
        self._crc = CrcOfStream()
        heads = _tar_header("enclave", 0, 0o755, tarfile.DIRTYPE) + _tar_header("enclave/app.eif", size, 0o644)
        # The EIF's keyed sections (its kernel above all) sit at the same stream offsets in every layer: their
        # deflated blocks are reused (common.image.compress.KnownRange); the CRC check covers the bytes.
        known = [KnownRange(len(heads) + span.offset, span.size, span.key) for span in spans]
        self._raw = out_path.open("wb")
        # The layer file's writes run in a thread of their own, off the thread that produces the EIF.
        self._file = HashPipe(Writes(self._raw), name="nitroconv-layerfile")
        self._eif_sha: HashPipe | None = None
        self._plain: _PlainTar | None = None
        self._compressor: StreamCompressor | None = None
        try:
            piped = cast(BinaryIO, _PipeWriter(self._file))
            target = piped if sink is None else cast(BinaryIO, _Tee(piped, sink))
            self._compressor = open_compressor(compression, target, threads=threads, known=known)
            self._plain = _PlainTar(self._compressor)
            self._eif_sha = HashPipe(hashlib.sha256(), name="nitroconv-eifsha")
            self._plain.write(heads)
        except BaseException:
            self.abort()
            raise

    def write(self, chunk: bytes) -> None:
        assert self._plain is not None and self._eif_sha is not None
        self._eif_sha.update(chunk)
        self._crc.update(chunk)
        self._plain.write(chunk)

    @property
    def offset(self) -> int:
        """Bytes of the uncompressed layer so far (the tar headers included)."""
        return self._plain.offset if self._plain is not None else 0

    def finish(self, files: Mapping[str, bytes], written: WrittenEif | None = None) -> OutputLayer:
        """The small files after the EIF, then the digests; with `written`, the EIF received must be the size and
        CRC its writer reported, else `InvalidEif` (a short, torn or since-changed file)."""
        plain, compressor, eif_sha = self._plain, self._compressor, self._eif_sha
        assert plain is not None and compressor is not None and eif_sha is not None
        try:
            received = self._crc.offset
            if received != self.size:
                raise InvalidEif(f"the layer received {received} bytes of an EIF of {self.size}",
                                 details={"reason": "truncated" if received < self.size else "trailing_bytes",
                                          "offset": received})
            plain.write(_pad(self.size))
            for name in sorted(files):
                plain.member(f"enclave/{name}", files[name], 0o755 if name in EXECUTABLES else 0o644)
            diff_id = plain.finish()
            blob = compressor.close()
            self._file.finish()  # raises what a write raised (ENOSPC)
            self._raw.close()
            eif_sha256 = eif_sha.finish().hexdigest()
        except BaseException:
            self.abort()
            raise
        if written is not None and self._crc.value != written.crc:
            raise InvalidEif("the EIF read back does not have the CRC its writer computed: the file changed or was "
                             "torn after it was written", details={"reason": "crc_mismatch"})
        return OutputLayer(self.path, Blob(f"sha256:{blob.sha256}", blob.size, MEDIA_TYPES[self._compression]),
                           diff_id, eif_sha256)

    def abort(self) -> None:
        """Stop the threads and close the file (on an error path; the caller removes the file)."""
        for part in (self._plain, self._compressor, self._eif_sha):
            if part is not None:
                part.abort()
        self._file.abort()
        self._raw.close()


def write_layer(eif: Path, files: Mapping[str, bytes], out_path: Path, *,
                compression: Compression = Compression.GZIP, written: WrittenEif | None = None,
                threads: int | None = None, sink: Callable[[bytes], None] | None = None) -> OutputLayer:
    """Write `enclave/` with the EIF and the small files, compressed (gzip with no name or time, or zstd) so that
    equal inputs give equal digests whatever the thread count.

    One sequential read of the EIF feeds a `LayerWriter`. The EIF is read back rather than teed from its writer
    when its header (CRC, and with a signer the signature section) was final only after the last section, while
    every digest here needs the bytes in file order; the read comes from the page cache, and it is what makes
    the pushed layer exactly the file that was checked.

    With `written` (what `write_eif` reported), the file's size must be the writer's and its CRC,
    recomputed from the bytes read here, the writer's: a torn, short or since-changed file fails with
    `InvalidEif` before anything is pushed (see `common.enclave.reader.check_written` for the rest of that check).
    """
    size = eif.stat().st_size
    if written is not None and size != written.size:
        raise InvalidEif(f"the EIF is {size} bytes, its writer wrote {written.size}",
                         details={"reason": "truncated" if size < written.size else "trailing_bytes"})
    layer = LayerWriter(out_path, size, compression=compression, spans=written.spans if written else (),
                        threads=threads, sink=sink)
    try:
        with eif.open("rb") as src:
            remaining = size
            while remaining:
                # Pieces end on the compressor's block boundaries (the tar headers come first), so
                # whole blocks reach it without being copied through its buffer.
                chunk = src.read(min(_CHUNK - layer.offset % _CHUNK, remaining))
                if not chunk:
                    raise InvalidEif("the EIF ended while it was read into the layer",
                                     details={"reason": "truncated", "offset": size - remaining})
                remaining -= len(chunk)
                layer.write(chunk)
    except BaseException:
        layer.abort()
        raise
    return layer.finish(files, written)


def labels(measurements: Measurements, input_digest: str) -> dict[str, str]:
    found = {"pcr0": measurements.pcr0, "pcr1": measurements.pcr1, "pcr2": measurements.pcr2,
             "pcr8": measurements.pcr8, "hash-algorithm": "sha384", "input-digest": input_digest}
    return {LABEL_PREFIX + k: v for k, v in found.items() if v}


def config_json(layer: OutputLayer, image_labels: Mapping[str, str], entrypoint: list[str] | None,
                base: BaseImage | None = None, exposed_ports: Sequence[int] = ()) -> bytes:
    """The image config: fixed `created`, fixed history timestamp, sorted keys, so it is byte-stable.

    With a base, it is the base's config with our layer's diff_id appended, our Entrypoint, our
    labels merged over the base's, and one history entry for our layer. `exposed_ports`: the enclave's
    published ports, where the launcher listens (`docker run -P` maps them); a base's own are dropped.
    """
    doc: dict[str, object] = base.config if base is not None else {"architecture": "amd64", "os": "linux"}
    inner = doc.get("config")
    config: dict[str, object] = dict(inner) if isinstance(inner, dict) else {}
    # The base's CMD would reach the launcher as extra arguments for the enclave's program.
    config.pop("Cmd", None)
    config.pop("Entrypoint", None)
    config.pop("ExposedPorts", None)
    if exposed_ports:
        config["ExposedPorts"] = {f"{port}/tcp": {} for port in sorted(exposed_ports)}
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


def fetch_eif(image: str, out: Path, *, credentials: Credentials | None, insecure_registries: frozenset[str],
              launch_json: Path | None = None) -> str:
    """Download a converted image and write its `/enclave/app.eif` to `out` (and its `/enclave/launch.json` to
    `launch_json` when given); returns the EIF's sha256 hex."""
    ref = parse_reference(image)
    # The whole list, not just "is this host insecure": a token realm on another listed host must be reachable too.
    policy = HostPolicy.allowing(insecure_registries)
    wanted = {"enclave/app.eif": out}
    if launch_json is not None:
        wanted["enclave/launch.json"] = launch_json
    with tempfile.TemporaryDirectory(prefix="nitroconv-fetch-") as tmp, \
            RegistryClient.for_reference(ref, credentials=credentials, policy=policy) as client:
        resolved = client.resolve(ref)
        if not resolved.layers:
            raise InvalidManifest(f"{ref} is not a nitroconv output image (it has no layers)")
        # Ours is the last layer; any before it are the output base's (ConversionHost.output_base).
        descriptor, diff_id = resolved.layers[-1], resolved.diff_ids[-1]
        blob = client.fetch_blob(resolved.repository, descriptor, Path(tmp) / "layer")
        found = extract_enclave_files(blob, descriptor.media_type, diff_id, wanted)
    for name in wanted:
        if name not in found:
            raise InvalidManifest(f"{ref} has no /{name}")
    return found["enclave/app.eif"]


def extract_eif(layer: Path, media_type: str, diff_id: Digest, out: Path) -> str | None:
    """Write the `/enclave/app.eif` of an output layer blob to `out` (atomically); its sha256 hex, None if absent.

    The whole layer is read, so its DiffID is checked too."""
    return extract_enclave_files(layer, media_type, diff_id, {"enclave/app.eif": out}).get("enclave/app.eif")


def extract_enclave_files(layer: Path, media_type: str, diff_id: Digest, wanted: dict[str, Path]) -> dict[str, str]:
    """Write the layer's regular files named in `wanted` (tar names) to their paths, atomically; their sha256 hex
    by name. The whole layer is read, so its DiffID is checked too."""
    found: dict[str, str] = {}
    with open_layer(layer, media_type, diff_id) as stream, \
            tarfile.open(fileobj=cast(BinaryIO, stream), mode="r|") as tar:
        for member in tar:
            if member.name in wanted and member.isfile() and member.name not in found:
                source = tar.extractfile(member)
                assert source is not None
                sha = hashlib.sha256()
                with atomic_file(wanted[member.name]) as sink:
                    while chunk := source.read(1 << 20):
                        sha.update(chunk)
                        sink.write(chunk)
                found[member.name] = sha.hexdigest()
    return found
