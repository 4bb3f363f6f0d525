"""Whole-conversion reuse: the same input digest, options and blobs give the same EIF, so its layer is pushed again.

A conversion is keyed by everything that decides its output bytes (see `conversion_key`); the record of
a finished one lives at `<cache>/conversions/<key>.json`, its output layer in the blob store. A hit
still resolves the input with the caller's own credentials (that proves the caller may read it, so a
hit never lends one tenant's image to another), then builds the config and manifest for the requested
output name as `convert()` does and pushes them, mounting the layer from a repository the same owner
pushed it to when the registry allows (RELIABILITY.md §D73: never from someone else's repository).
"""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import IO, Any

from common.enclave.measure import Measurements
from common.errors import InvalidManifest, NitroconvError
from common.registry.client import FetchedManifest, RegistryClient
from common.registry.digest import Digest
from common.registry.manifests import Descriptor
from common.registry.reference import Reference, parse_image_source
from common.util.atomicfile import atomic_file
from common.util.memo import ProcessMemo, file_identity
from worker.pipeline.convert import convert
from worker.pipeline.host import BLOB_FILES, RUNTIME_FILES, ConversionHost
from worker.pipeline.outputimage import Blob, OutputLayer, extract_eif
from worker.pipeline.push import output_reference
from worker.pipeline.spec import ConvertResult, ConvertSpec, Progress, Workspace
from worker.pipeline.stages import Packaged, Plan, prepare, push, resolve_output_base

log = logging.getLogger(__name__)

RECORD_VERSION = 1
# bzImage.config is not in the EIF, but nitro-cli's kernel config names the kernel build: a new one is a new blob set.
KEY_BLOB_FILES = (*BLOB_FILES, "bzImage.config")
# Pushes remembered per record, for mounts; the oldest are forgotten first.
_MAX_PUSHES = 32


@dataclass(frozen=True)
class Push:
    """One output the layer was pushed as, and whose push it was (an account id; "" for the CLI)."""

    owner: str
    registry: str  # api host
    repository: str
    reference: str
    build_id: str | None


# Blobs, runtime binaries, signing and CA files of this host: a few, read once per process each.
_FILE_DIGESTS: ProcessMemo[str] = ProcessMemo(capacity=64)


def _file_sha256(path: Path) -> str | None:
    """sha256 of a file, or None if absent; remembered under the file's identity for the process's life."""
    try:
        key = (str(path), file_identity(path))
    except FileNotFoundError:
        return None
    found = _FILE_DIGESTS.get(key)
    if found is None:
        h = hashlib.sha256()
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
        found = h.hexdigest()
        _FILE_DIGESTS.put(key, found)
    return found


def resolve_input(spec: ConvertSpec, host: ConversionHost) -> tuple[Reference, FetchedManifest] | None:
    """The input's manifest as its registry serves it to this caller; None for a local engine image.

    Asked every time with the caller's credentials: a caller who cannot read the input fails here
    exactly as the pull would have. The pull then converts this very manifest (a tag that moves meanwhile
    does not change what is converted, so the key stays true to the result).
    """
    ref = parse_image_source(spec.input_ref)
    if not isinstance(ref, Reference):
        return None
    with RegistryClient.for_reference(ref, credentials=spec.input_credentials, policy=host.policy) as client:
        return ref, client.fetch_manifest(ref.repository, ref.digest or ref.manifest_reference)


def conversion_key(spec: ConvertSpec, host: ConversionHost, input_ref: Reference, input_digest: str) -> str | None:
    """sha256 over a canonical JSON of everything the output bytes depend on; None when a file is missing
    (then `convert()` runs and names what is missing)."""
    blobs = {name: _file_sha256(host.blobs_dir / name) for name in KEY_BLOB_FILES}
    runtime = {name: _file_sha256(host.runtime_dir / name) for name in RUNTIME_FILES}
    if any(blobs[name] is None for name in BLOB_FILES) or any(v is None for v in runtime.values()):
        return None
    signing = None
    if host.signing_key is not None or host.signing_cert is not None:
        cert = _file_sha256(host.signing_cert) if host.signing_cert else None
        key = _file_sha256(host.signing_key) if host.signing_key else None
        if cert is None or key is None:
            return None
        signing = hashlib.sha256(f"{cert}:{key}".encode()).hexdigest()
    ca_bundle = None
    if host.ca_bundle is not None:
        ca_bundle = _file_sha256(host.ca_bundle)
        if ca_bundle is None:
            return None
    doc = {
        "record_version": RECORD_VERSION,
        "nitroconv": _version(),
        # The EIF's metadata names the input repository, so the same digest elsewhere is another EIF.
        "input": {"registry": input_ref.api_host, "repository": input_ref.repository, "digest": input_digest},
        "options": asdict(spec.options),
        "cpu_count": spec.cpu_count,
        "mem_size": spec.mem_size_mib,
        "blobs": blobs,
        "runtime": runtime,
        "signing": signing,
        "ca_bundle": ca_bundle,
        "output_base": host.output_base.strip(),
        "output_compression": host.output_compression.value,
        # A check recorded in one mode must not stand in for one asked in another (the emulator checks more).
        "boot_check": host.boot_check.mode if host.boot_check is not None else False,
        "limits": repr(host.limits),
    }
    canonical = json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def _version() -> str:
    try:
        return metadata.version("nitroconv")
    except metadata.PackageNotFoundError:
        return "unknown"


class ConversionCache:
    """Records of finished conversions (`<cache>/conversions/<key>.json`) over the shared blob store."""

    def __init__(self, host: ConversionHost) -> None:
        self.dir = host.cache_dir / "conversions"
        self.blobs = host.blob_store()

    def load(self, key: str) -> dict[str, Any] | None:
        try:
            doc = json.loads((self.dir / f"{key}.json").read_text())
        except (FileNotFoundError, ValueError):
            return None
        if not isinstance(doc, dict) or doc.get("record_version") != RECORD_VERSION or doc.get("key") != key:
            return None
        # A record damaged on disk is a miss, never a half-reused conversion.
        try:
            self.layer_descriptor(doc)
            Digest.parse(doc["layer"]["diff_id"])
            measurements = doc["measurements"]
            well_formed = (all(isinstance(measurements[k], str) for k in ("pcr0", "pcr1", "pcr2"))
                           and isinstance(doc["eif_sha256"], str) and isinstance(doc["input_digest"], str)
                           and isinstance(doc["eif_size"], int) and isinstance(doc["mem_size_mib"], int))
        except (KeyError, TypeError, ValueError, NitroconvError):
            return None
        return doc if well_formed else None

    def save(self, key: str, record: Mapping[str, object]) -> None:
        with atomic_file(self.dir / f"{key}.json") as f:
            f.write(json.dumps({**record, "key": key, "record_version": RECORD_VERSION}, sort_keys=True).encode())

    def layer_descriptor(self, record: Mapping[str, Any]) -> Descriptor:
        layer = record["layer"]
        return Descriptor(str(layer["media_type"]), Digest.parse(layer["digest"]), int(layer["size"]))


def convert_reusing(spec: ConvertSpec, host: ConversionHost, progress: Progress, work: Workspace) -> ConvertResult:
    """`convert()`, or the reuse of an identical earlier conversion (then `reused_from` is set).

    `spec.reuse=False` converts afresh (and still records the result for later hits).
    """
    cache = ConversionCache(host)
    # A malformed request or a broken host fails here exactly as in convert(), before any registry is asked.
    plan = prepare(spec, host, work)
    resolved = resolve_input(spec, host)
    key = conversion_key(spec, host, resolved[0], str(resolved[1].digest)) if resolved is not None else None
    try:
        if key is not None and spec.reuse:
            record = cache.load(key)
            if record is not None:
                held = cache.blobs.open(cache.layer_descriptor(record))
                if held is not None:
                    with held:
                        return _reuse(spec, host, progress, plan, record, held, cache, key)
                log.info("conversion cache: layer of %s was evicted, converting again", key[:16])
        staged = _staging(cache) if key is not None else None
        try:
            # The pull converts the very manifest the key names, so the result is the key's.
            pinned = replace(spec, input_manifest=resolved[1]) if resolved is not None else spec
            result = convert(pinned, host, progress, replace(work, keep_layer=staged))
            if key is not None and result.layer_blob is not None and staged is not None and staged.exists():
                try:
                    _store(cache, key, result, staged, owner=spec.owner, build_id=spec.build_id)
                except (OSError, NitroconvError) as exc:
                    # The conversion was pushed: a cache that cannot keep it (a full disk) costs a later hit only.
                    log.warning("conversion cache: could not record %s: %s", key[:16], exc)
        finally:
            if staged is not None:
                staged.unlink(missing_ok=True)
        return result
    finally:
        # The pull trims as it adds, but never a blob used in the last minutes; those may have aged since.
        try:
            cache.blobs.trim()
        except OSError as exc:
            log.warning("blob cache: eviction pass failed: %s", exc)


def _staging(cache: ConversionCache) -> Path | None:
    try:
        return cache.blobs.staging_path()
    except OSError as exc:
        log.warning("conversion cache: no staging dir, converting without recording: %s", exc)
        return None


def _store(cache: ConversionCache, key: str, result: ConvertResult, staged: Path, *, owner: str,
           build_id: str | None) -> None:
    blob = result.layer_blob
    assert blob is not None
    # write_layer hashed these bytes as it wrote them; the registry checks whatever a later hit pushes.
    cache.blobs.add_file(staged, Descriptor(blob.media_type, Digest.parse(blob.digest), blob.size), hashed=True)
    ref = output_reference(result.output_reference.rpartition("@")[0] or result.output_reference)
    m = result.measurements
    cache.save(key, {
        "created_at": time.time(),
        "layer": {"digest": blob.digest, "size": blob.size, "media_type": blob.media_type,
                  "diff_id": result.layer_diff_id},
        "input_digest": result.input_digest,
        "eif_size": result.eif_size,
        "eif_sha256": result.eif_sha256,
        "measurements": {"pcr0": m.pcr0, "pcr1": m.pcr1, "pcr2": m.pcr2, "pcr8": m.pcr8},
        "mem_size_mib": result.mem_size_mib,
        "exposed_ports": [list(p) for p in result.exposed_ports],
        "warnings": list(result.warnings),
        "docker_version": result.docker_version,
        "boot_check": result.boot_check,
        "network": result.network,
        "origin": {"owner": owner, "build_id": build_id, "reference": result.output_reference},
        "pushes": [asdict(Push(owner, ref.api_host, ref.repository, result.output_reference, build_id))],
    })


def _reuse(spec: ConvertSpec, host: ConversionHost, progress: Progress, plan: Plan, record: dict[str, Any],
           held: IO[bytes], cache: ConversionCache, key: str) -> ConvertResult:
    """convert()'s push stage, for the recorded layer (read through `held`, even if evicted meanwhile)."""
    layer_doc = record["layer"]
    # /proc/self/fd: fresh readers of the held file, even after an eviction unlinked its name.
    layer = OutputLayer(Path(f"/proc/self/fd/{held.fileno()}"),
                        Blob(str(layer_doc["digest"]), int(layer_doc["size"]), str(layer_doc["media_type"])),
                        str(layer_doc["diff_id"]), str(record["eif_sha256"]))
    m = record["measurements"]
    measurements = Measurements(str(m["pcr0"]), str(m["pcr1"]), str(m["pcr2"]), m.get("pcr8"))
    network = record.get("network")
    packaged = Packaged(layer, measurements, str(record["input_digest"]), resolve_output_base(host, plan),
                        network if isinstance(network, dict) else {})
    out_ref = plan.output
    pushes = [Push(**p) for p in record.get("pushes", []) if isinstance(p, dict)]
    mount_from = next((p.repository for p in reversed(pushes)
                       if p.owner == spec.owner and p.registry == out_ref.api_host
                       and p.repository != out_ref.repository), None)
    pushed = push(spec, host, progress, plan, packaged, mount_from=mount_from)
    if plan.work.eif_out is not None:
        _extract_eif(layer, plan.work.eif_out)
    progress.finished()
    origin = record.get("origin") or {}
    # Another owner's build id or output name is theirs to know: a cross-account hit names only the cache entry.
    if origin.get("owner") == spec.owner:
        reused_from = str(origin.get("build_id") or origin.get("reference"))
    else:
        reused_from = f"cache:{key[:32]}"
    record["pushes"] = [asdict(p) for p in pushes][-(_MAX_PUSHES - 1):] + [
        asdict(Push(spec.owner, out_ref.api_host, out_ref.repository, pushed.reference, spec.build_id))]
    try:
        cache.save(key, record)
    except OSError as exc:
        log.warning("conversion cache: could not record the push to %s: %s", pushed.reference, exc)
    log.info("conversion cache hit key=%s output=%s mount_from=%s", key[:16], pushed.reference, mount_from)
    return ConvertResult(
        input_digest=packaged.input_digest,
        output_digest=pushed.digest,
        output_reference=pushed.reference,
        output_size=pushed.size,
        eif_size=int(record["eif_size"]),
        eif_sha256=str(record["eif_sha256"]),
        measurements=measurements,
        exposed_ports=tuple((int(p), str(proto)) for p, proto in record.get("exposed_ports", [])),
        warnings=tuple(str(w) for w in record.get("warnings", [])),
        docker_version=record.get("docker_version"),
        mem_size_mib=int(record["mem_size_mib"]),
        boot_check=record.get("boot_check"),
        layer_blob=layer.blob,
        layer_diff_id=layer.diff_id,
        reused_from=reused_from,
        network=packaged.network or None,
    )


def _extract_eif(layer: OutputLayer, out: Path) -> None:
    """Write the cached layer's /enclave/app.eif to `out`, checking it against the recorded sha256."""
    found = extract_eif(layer.path, layer.blob.media_type, Digest.parse(layer.diff_id), out)
    if found is None:
        raise InvalidManifest("the cached layer has no /enclave/app.eif")
    if found != layer.eif_sha256:
        out.unlink(missing_ok=True)
        raise InvalidManifest("the cached layer's app.eif does not hash to the recorded EIF")
