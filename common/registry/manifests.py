"""OCI and Docker image documents: media types, strict parsing from the hashed bytes, platform selection."""
from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from common.errors import InvalidDigest, InvalidManifest, NoMatchingPlatform, UnsupportedMediaType
from common.registry.digest import Digest
from common.util.compression import Compression

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
OCI_LAYER_NONDISTRIBUTABLE = "application/vnd.oci.image.layer.nondistributable.v1.tar"
OCI_LAYER_NONDISTRIBUTABLE_GZIP = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
OCI_LAYER_NONDISTRIBUTABLE_ZSTD = "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
DOCKER_LAYER_FOREIGN = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
DOCKER_SCHEMA1 = "application/vnd.docker.distribution.manifest.v1+json"
DOCKER_SCHEMA1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"

MANIFEST_TYPES = frozenset({OCI_MANIFEST, DOCKER_MANIFEST})
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_MANIFEST_LIST})
CONFIG_TYPES = frozenset({OCI_CONFIG, DOCKER_CONFIG})
SCHEMA1_TYPES = frozenset({DOCKER_SCHEMA1, DOCKER_SCHEMA1_SIGNED})
FOREIGN_LAYER_TYPES = frozenset({
    DOCKER_LAYER_FOREIGN, OCI_LAYER_NONDISTRIBUTABLE, OCI_LAYER_NONDISTRIBUTABLE_GZIP,
    OCI_LAYER_NONDISTRIBUTABLE_ZSTD,
})
# What we ask registries for, most preferred first; schema1 is deliberately absent.
MANIFEST_ACCEPT: tuple[str, ...] = (OCI_INDEX, DOCKER_MANIFEST_LIST, OCI_MANIFEST, DOCKER_MANIFEST)
# Content-Types that say nothing about which document this is (static servers, old registries).
_GENERIC_CONTENT_TYPES = frozenset({"", "application/json", "application/octet-stream", "text/plain"})
# Beyond this an index of indexes is treated as hostile rather than as a deep but honest tree.
MAX_INDEX_DEPTH = 4
_MEDIA_TYPE = re.compile(r"[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}/[A-Za-z0-9][A-Za-z0-9!#$&^_.+-]{0,126}")
_ATTESTATION_ANNOTATION = "vnd.docker.reference.type"
_SCHEMA1_MESSAGE = (
    "Docker image manifest v2 schema 1 is deprecated and not supported; re-push the image with a "
    "current Docker or Buildx (schema 2) or as an OCI image"
)


LAYER_COMPRESSION: Mapping[str, Compression] = {
    OCI_LAYER: Compression.NONE,
    OCI_LAYER_GZIP: Compression.GZIP,
    OCI_LAYER_ZSTD: Compression.ZSTD,
    DOCKER_LAYER_GZIP: Compression.GZIP,
    DOCKER_LAYER: Compression.NONE,
}


@dataclass(frozen=True)
class Platform:
    os: str
    architecture: str
    variant: str = ""
    os_version: str = ""
    os_features: tuple[str, ...] = ()

    def __str__(self) -> str:
        return "/".join(p for p in (self.os, self.architecture, self.variant) if p)


LINUX_AMD64 = Platform("linux", "amd64")


@dataclass(frozen=True)
class Descriptor:
    """A content descriptor, validated: digest grammar, non-negative size, known media-type shape."""

    media_type: str
    digest: Digest
    size: int
    urls: tuple[str, ...] = ()
    platform: Platform | None = None
    artifact_type: str = ""
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Manifest:
    """An image manifest (OCI or Docker schema 2) whose layers all have a supported media type."""

    media_type: str
    config: Descriptor
    layers: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class Index:
    """An OCI image index or a Docker manifest list."""

    media_type: str
    manifests: tuple[Descriptor, ...]
    annotations: Mapping[str, str] = field(default_factory=dict, compare=False)


@dataclass(frozen=True)
class ImageConfig:
    """The parts of an image config the converter uses; `diff_ids` are the uncompressed layer digests."""

    os: str
    architecture: str
    variant: str
    diff_ids: tuple[Digest, ...]
    entrypoint: tuple[str, ...] | None = None
    cmd: tuple[str, ...] | None = None
    env: tuple[str, ...] = ()
    working_dir: str = ""
    user: str = ""
    exposed_ports: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict, compare=False)
    stop_signal: str = ""


# --- strict JSON -----------------------------------------------------------------------------------
def load_json_object(raw: bytes, *, what: str) -> dict[str, object]:
    """Decode exactly these bytes as one JSON object; duplicate keys, NaN and non-UTF-8 are refused.

    Duplicate keys are how a document hashes as one thing and parses as another (CVE-2014-8179),
    so they are an error rather than "last one wins".
    """

    def no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
        obj: dict[str, object] = {}
        for key, value in pairs:
            if key in obj:
                raise InvalidManifest(f"{what} has a duplicate JSON key {key[:100]!r}")
            obj[key] = value
        return obj

    def no_constants(name: str) -> object:
        raise InvalidManifest(f"{what} contains the non-JSON constant {name}")

    try:
        text = raw.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError as exc:
        raise InvalidManifest(f"{what} is not UTF-8") from exc
    except RecursionError as exc:
        raise InvalidManifest(f"{what} is nested too deeply") from exc
    except ValueError as exc:  # JSONDecodeError
        raise InvalidManifest(f"{what} is not valid JSON: {exc}") from exc
    if not isinstance(doc, dict):
        raise InvalidManifest(f"{what} is not a JSON object")
    return doc


# --- manifests and indexes ------------------------------------------------------------------------
def parse_manifest_document(
    raw: bytes, content_type: str | None = None, *, expected_media_type: str | None = None
) -> Manifest | Index:
    """Parse the exact bytes that were hashed into a manifest or an index.

    `content_type` is the HTTP Content-Type it came with; `expected_media_type` the media type of
    the descriptor that pointed at it, if any. They must agree with the body: a document that can be
    read as two different things is refused (CVE-2021-41190).
    """
    header_type = normalize_media_type(content_type)
    if header_type in SCHEMA1_TYPES or expected_media_type in SCHEMA1_TYPES:
        raise UnsupportedMediaType(_SCHEMA1_MESSAGE, details={"media_type": header_type or expected_media_type})
    doc = load_json_object(raw, what="manifest")
    schema_version = doc.get("schemaVersion")
    body_type = doc.get("mediaType")
    if (type(schema_version) is int and schema_version == 1) or body_type in SCHEMA1_TYPES:
        raise UnsupportedMediaType(_SCHEMA1_MESSAGE, details={"media_type": body_type or DOCKER_SCHEMA1})
    if type(schema_version) is not int or schema_version != 2:
        raise InvalidManifest(f"manifest schemaVersion must be 2, got {schema_version!r:.40}")
    if body_type is not None and (not isinstance(body_type, str) or not _MEDIA_TYPE.fullmatch(body_type)):
        raise InvalidManifest("manifest mediaType is not a media type")

    has_index_keys = "manifests" in doc
    has_manifest_keys = "config" in doc or "layers" in doc
    if has_index_keys and has_manifest_keys:
        raise InvalidManifest("document has both 'manifests' and 'config'/'layers': refusing an ambiguous document")

    if body_type is not None and header_type not in _GENERIC_CONTENT_TYPES and header_type != body_type:
        raise InvalidManifest(
            f"Content-Type {header_type!r} does not match the document's mediaType {body_type!r}",
            details={"content_type": header_type, "media_type": body_type},
        )
    if body_type is not None:
        media_type = body_type
    elif header_type not in _GENERIC_CONTENT_TYPES:
        media_type = header_type
    else:
        media_type = OCI_INDEX if has_index_keys else OCI_MANIFEST
    if expected_media_type is not None and media_type != expected_media_type:
        raise InvalidManifest(
            f"descriptor says {expected_media_type!r} but the document is {media_type!r}",
            details={"expected": expected_media_type, "actual": media_type},
        )

    annotations = _string_map(doc.get("annotations"), "manifest annotations")
    if media_type in INDEX_TYPES:
        if has_manifest_keys or not has_index_keys:
            raise InvalidManifest(f"{media_type} document must have 'manifests' and no 'config'/'layers'")
        entries = _list(doc["manifests"], "index manifests")
        return Index(media_type, tuple(parse_descriptor(e, f"manifests[{i}]") for i, e in enumerate(entries)),
                     annotations)
    if media_type in MANIFEST_TYPES:
        if has_index_keys or "config" not in doc or "layers" not in doc:
            raise InvalidManifest(f"{media_type} document must have 'config' and 'layers' and no 'manifests'")
        config = parse_descriptor(doc["config"], "config")
        if config.media_type not in CONFIG_TYPES:
            raise UnsupportedMediaType(
                f"not a container image: config media type {config.media_type!r}",
                details={"media_type": config.media_type},
            )
        layers = tuple(parse_descriptor(e, f"layers[{i}]") for i, e in enumerate(_list(doc["layers"], "layers")))
        for layer in layers:
            layer_compression(layer)
        return Manifest(media_type, config, layers, annotations)
    raise UnsupportedMediaType(f"unsupported manifest media type {media_type!r}", details={"media_type": media_type})


def parse_descriptor(obj: object, where: str = "descriptor") -> Descriptor:
    """Validate one descriptor object (mediaType, digest, size, urls, platform, annotations)."""
    if not isinstance(obj, dict):
        raise InvalidManifest(f"{where} is not an object")
    media_type = obj.get("mediaType")
    if not isinstance(media_type, str) or not _MEDIA_TYPE.fullmatch(media_type):
        raise InvalidManifest(f"{where}.mediaType is missing or malformed")
    try:
        digest = Digest.parse(obj.get("digest"))
    except InvalidDigest as exc:
        raise InvalidManifest(f"{where}.digest: {exc.message}", details=exc.details) from exc
    size = obj.get("size")
    if type(size) is not int or size < 0:
        raise InvalidManifest(f"{where}.size must be a non-negative integer", details={"size": repr(size)[:40]})
    urls = tuple(_string(u, f"{where}.urls[]") for u in _list(obj.get("urls", []), f"{where}.urls"))
    artifact_type = obj.get("artifactType", "")
    if not isinstance(artifact_type, str):
        raise InvalidManifest(f"{where}.artifactType must be a string")
    platform = _platform(obj["platform"], f"{where}.platform") if "platform" in obj else None
    return Descriptor(media_type, digest, size, urls, platform, artifact_type,
                      _string_map(obj.get("annotations"), f"{where}.annotations"))


def layer_compression(layer: Descriptor) -> Compression:
    """How a layer blob is compressed; foreign, non-distributable and unknown layers are refused."""
    if layer.urls or layer.media_type in FOREIGN_LAYER_TYPES:
        # Fetching from a manifest-supplied URL is an SSRF and credential-leak vector (CVE-2020-15157).
        raise UnsupportedMediaType(
            f"foreign/non-distributable layer {layer.digest} ({layer.media_type}) is not supported",
            details={"media_type": layer.media_type, "digest": str(layer.digest)},
        )
    compression = LAYER_COMPRESSION.get(layer.media_type)
    if compression is None:
        raise UnsupportedMediaType(
            f"unsupported layer media type {layer.media_type!r}",
            details={"media_type": layer.media_type, "digest": str(layer.digest)},
        )
    return compression


def normalize_media_type(content_type: str | None) -> str:
    """`application/X; charset=utf-8` → `application/x` (parameters dropped, case folded)."""
    return (content_type or "").split(";", 1)[0].strip().lower()


# --- platforms ------------------------------------------------------------------------------------
def is_attestation(descriptor: Descriptor) -> bool:
    """Buildx attaches provenance/SBOM manifests to indexes as `unknown/unknown` entries."""
    if descriptor.annotations.get(_ATTESTATION_ANNOTATION) == "attestation-manifest":
        return True
    p = descriptor.platform
    return p is not None and p.os == "unknown" and p.architecture == "unknown"


def select_manifest(index: Index, want: Platform = LINUX_AMD64) -> Descriptor | None:
    """The index entry to pull for `want`: the first exact match, else the lowest acceptable variant.

    For amd64 an entry without a variant (or `v1`) runs anywhere and wins; `v2`..`v4` entries are
    taken only when no baseline entry exists, lowest level first, because they need newer CPUs.
    """
    best: tuple[int, int] | None = None
    chosen: Descriptor | None = None
    for position, entry in enumerate(index.manifests):
        if entry.media_type not in MANIFEST_TYPES or entry.platform is None or is_attestation(entry):
            continue
        rank = _variant_rank(want, entry.platform)
        if rank is not None and (best is None or (rank, position) < best):
            best, chosen = (rank, position), entry
    return chosen


def nested_indexes(index: Index, want: Platform = LINUX_AMD64) -> tuple[Descriptor, ...]:
    """Child indexes that may hold `want`, in order (entries without a platform might hold anything)."""
    return tuple(
        e for e in index.manifests
        if e.media_type in INDEX_TYPES and not is_attestation(e)
        and (e.platform is None or _variant_rank(want, e.platform) is not None)
    )


def unplatformed_manifests(index: Index) -> tuple[Descriptor, ...]:
    """Manifest entries that carry no platform: only their config can tell what they are."""
    return tuple(e for e in index.manifests
                 if e.media_type in MANIFEST_TYPES and e.platform is None and not is_attestation(e))


def no_matching_platform(index: Index, want: Platform = LINUX_AMD64) -> NoMatchingPlatform:
    """The user-facing error, listing what the index does offer."""
    offered = sorted({str(e.platform) for e in index.manifests if e.platform is not None and not is_attestation(e)})
    return NoMatchingPlatform(
        f"image has no {want} manifest (it offers: {', '.join(offered) or 'no platforms'})",
        details={"wanted": str(want), "offered": offered},
    )


def _variant_rank(want: Platform, have: Platform) -> int | None:
    if have.os != want.os or have.architecture != want.architecture:
        return None
    if want.architecture == "amd64" and not want.variant:
        return {"": 0, "v1": 0, "v2": 2, "v3": 3, "v4": 4}.get(have.variant)
    return 0 if have.variant in ("", want.variant) else None


# --- image config ---------------------------------------------------------------------------------
def parse_image_config(raw: bytes) -> ImageConfig:
    """Parse an image config (OCI or Docker), typed strictly; `rootfs.diff_ids` must be valid digests."""
    doc = load_json_object(raw, what="image config")
    rootfs = doc.get("rootfs")
    if not isinstance(rootfs, dict) or rootfs.get("type") != "layers":
        raise InvalidManifest("image config rootfs must be an object with type 'layers'")
    diff_ids: list[Digest] = []
    for i, value in enumerate(_list(rootfs.get("diff_ids"), "rootfs.diff_ids")):
        try:
            diff_ids.append(Digest.parse(value))
        except InvalidDigest as exc:
            raise InvalidManifest(f"rootfs.diff_ids[{i}]: {exc.message}", details=exc.details) from exc
    run = doc.get("config")
    if run is None:
        run = {}
    if not isinstance(run, dict):
        raise InvalidManifest("image config 'config' must be an object")
    exposed = run.get("ExposedPorts")
    if exposed is None:
        exposed = {}
    if not isinstance(exposed, dict):
        raise InvalidManifest("config.ExposedPorts must be an object")
    return ImageConfig(
        os=_opt_string(doc.get("os"), "os"),
        architecture=_opt_string(doc.get("architecture"), "architecture"),
        variant=_opt_string(doc.get("variant"), "variant"),
        diff_ids=tuple(diff_ids),
        entrypoint=_opt_strings(run.get("Entrypoint"), "config.Entrypoint"),
        cmd=_opt_strings(run.get("Cmd"), "config.Cmd"),
        env=_opt_strings(run.get("Env"), "config.Env") or (),
        working_dir=_opt_string(run.get("WorkingDir"), "config.WorkingDir"),
        user=_opt_string(run.get("User"), "config.User"),
        exposed_ports=tuple(sorted(_string(p, "config.ExposedPorts key") for p in exposed)),
        labels=_string_map(run.get("Labels"), "config.Labels"),
        stop_signal=_opt_string(run.get("StopSignal"), "config.StopSignal"),
    )


def check_config_platform(config: ImageConfig, want: Platform = LINUX_AMD64) -> None:
    """A single-platform image built for another OS/architecture would not boot in an enclave."""
    if (config.os and config.os != want.os) or (config.architecture and config.architecture != want.architecture):
        have = Platform(config.os, config.architecture, config.variant)
        raise NoMatchingPlatform(f"image is built for {have}, not {want}",
                                 details={"wanted": str(want), "offered": [str(have)]})


# --- small typed readers --------------------------------------------------------------------------
def _platform(obj: object, where: str) -> Platform:
    if not isinstance(obj, dict):
        raise InvalidManifest(f"{where} is not an object")
    features = tuple(_string(f, f"{where}.os.features[]") for f in _list(obj.get("os.features", []), where))
    return Platform(
        os=_string(obj.get("os"), f"{where}.os"),
        architecture=_string(obj.get("architecture"), f"{where}.architecture"),
        variant=_opt_string(obj.get("variant"), f"{where}.variant"),
        os_version=_opt_string(obj.get("os.version"), f"{where}.os.version"),
        os_features=features,
    )


def _list(value: object, where: str) -> Sequence[object]:
    if not isinstance(value, list):
        raise InvalidManifest(f"{where} must be a list")
    return value


def _string(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise InvalidManifest(f"{where} must be a string")
    return value


def _opt_string(value: object, where: str) -> str:
    return "" if value is None else _string(value, where)


def _opt_strings(value: object, where: str) -> tuple[str, ...] | None:
    if value is None:
        return None
    return tuple(_string(v, f"{where}[]") for v in _list(value, where))


def _string_map(value: object, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
        raise InvalidManifest(f"{where} must map strings to strings")
    return dict(value)
