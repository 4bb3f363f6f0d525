"""The conversion pipeline end to end: pull → build → measure → push, with stage reports and cancel points."""
from __future__ import annotations

import enum
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.blobstore import BlobStore
from common.eif import Measurements, read_eif
from common.errors import Cancelled, InvalidBlobs, InvalidEif, InvalidOptions, MemoryTooSmall
from common.filetree import NodeKind, Tree
from common.launch import LaunchSpec, launch_spec, parse_env
from common.layers import Limits
from common.registry import Credentials
from worker.pipeline.build import MIB, EifIdentity, build_eif, docker_info
from worker.pipeline.outputimage import config_json, labels, write_layer
from worker.pipeline.pull import PulledImage, pull
from worker.pipeline.push import output_reference, push

BLOB_FILES = ("bzImage", "cmdline", "init", "nsm.ko")
# The kernel's initramfs unpacker drops names of PATH_MAX (4096 with the NUL) or more, and the app
# ramdisk prefixes every image path with "rootfs/".
DEFAULT_LIMITS = Limits(max_path_bytes=4096 - 1 - len("rootfs/"))
# The enclave needs room for the EIF it boots from plus the unpacked ramdisks and the program (DESIGN.md §5).
MEMORY_FACTOR = 4


class Stage(enum.StrEnum):
    PULLING = "PULLING"
    BUILDING = "BUILDING"
    MEASURING = "MEASURING"
    PUSHING = "PUSHING"


# Share of the whole conversion at which each stage starts, for one progress figure across stages.
_STAGE_START = {Stage.PULLING: 0.0, Stage.BUILDING: 0.5, Stage.MEASURING: 0.8, Stage.PUSHING: 0.85}
_STAGE_END = {Stage.PULLING: 0.5, Stage.BUILDING: 0.8, Stage.MEASURING: 0.85, Stage.PUSHING: 1.0}


@dataclass(frozen=True)
class ConverterOptions:
    """The seed's converter_options (DESIGN.md §5 step 2)."""

    entrypoint: tuple[str, ...] = ()
    entrypoint_args: tuple[str, ...] = ()
    env_vars: tuple[str, ...] = ()
    mutable_env_vars: tuple[str, ...] = ()
    allow_cmdline_args: bool = False
    debug: bool = False
    java_mode: str | None = None
    add_ccm_ca_certificates: bool = False
    enable_overlay_filesystem_persistence: bool = True


@dataclass(frozen=True)
class ConvertSpec:
    input_ref: str
    output_ref: str
    input_credentials: Credentials | None
    output_credentials: Credentials | None
    options: ConverterOptions
    cpu_count: int
    mem_size_mib: int
    insecure_registries: frozenset[str] = frozenset()


@dataclass(frozen=True)
class ConvertResult:
    input_digest: str
    output_digest: str
    output_reference: str
    output_size: int
    eif_size: int
    eif_sha256: str
    measurements: Measurements
    exposed_ports: tuple[tuple[int, str], ...]
    warnings: tuple[str, ...]
    docker_version: str | None


def _check_blobs(blobs_dir: Path) -> None:
    missing = [name for name in BLOB_FILES if not (blobs_dir / name).is_file()]
    if missing:
        raise InvalidBlobs(f"blobs dir {blobs_dir} lacks {', '.join(missing)} (run `make blobs`)",
                           details={"missing": missing})


def _exposed_ports(config: dict[str, object]) -> tuple[tuple[int, str], ...]:
    inner = config.get("config")
    ports = inner.get("ExposedPorts") if isinstance(inner, dict) else None
    found = []
    for key in ports or {}:
        number, _, proto = str(key).partition("/")
        if number.isdigit():
            found.append((int(number), proto or "tcp"))
    return tuple(sorted(found))


def resolve_command(tree: Tree, spec: LaunchSpec) -> tuple[LaunchSpec, tuple[str, ...]]:
    """Resolve a bare argv[0] against the image's PATH, inside the image, as Docker does.

    The AWS-compatible init searches only its own fixed PATH, so `python3` in /usr/local/bin would
    not be found in the enclave although `docker run` finds it.
    """
    argv0 = spec.argv[0]
    if "/" in argv0:
        return spec, ()
    path_value = next((e.partition("=")[2] for e in spec.env if e.startswith("PATH=")), "")
    for directory in path_value.split(":"):
        if not directory.startswith("/"):
            continue
        candidate = f"{directory.rstrip('/')}/{argv0}"
        node = tree.lookup(candidate.encode())
        if node is not None and node.kind is NodeKind.FILE and node.mode & 0o111:
            return LaunchSpec((candidate, *spec.argv[1:]), spec.env, spec.workdir, spec.user), ()
    return spec, (f"{argv0!r} was not found on the image's PATH; the enclave will fail to start it",)


def convert(
    spec: ConvertSpec,
    *,
    scratch: Path,
    blobs_dir: Path,
    cache_dir: Path,
    on_stage: Callable[[Stage, float], None],
    should_cancel: Callable[[], bool] = lambda: False,
    eif_out: Path | None = None,
    limits: Limits | None = None,
) -> ConvertResult:
    """Convert one image. Everything written goes under `scratch` (emptied at the end) or the blob cache."""
    _check_blobs(blobs_dir)
    # Malformed options fail before any network I/O.
    parse_env(spec.options.env_vars, field="env_vars")
    parse_env(spec.options.mutable_env_vars, field="mutable_env_vars")
    out_ref = output_reference(spec.output_ref)
    if spec.cpu_count < 1 or spec.mem_size_mib < 1:
        raise InvalidOptions("cpu_count and mem_size must be positive", details={"field": "cpu_count/mem_size"})

    def stage(s: Stage, within: float = 0.0) -> None:
        if should_cancel():
            raise Cancelled(f"conversion cancelled before {s.value.lower()}")
        on_stage(s, _STAGE_START[s] + (_STAGE_END[s] - _STAGE_START[s]) * within)

    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        stage(Stage.PULLING)
        tree = Tree()
        image: PulledImage = pull(
            spec.input_ref, tree,
            credentials=spec.input_credentials,
            insecure_registries=spec.insecure_registries,
            cache=BlobStore(cache_dir / "blobs"),
            spool_dir=scratch / "spool",
            limits=limits or DEFAULT_LIMITS,
            progress=lambda f: on_stage(Stage.PULLING, _STAGE_END[Stage.PULLING] * f),
        )

        stage(Stage.BUILDING)
        inner = image.config.get("config")
        launch = launch_spec(
            inner if isinstance(inner, dict) else {},
            entrypoint=spec.options.entrypoint,
            entrypoint_args=spec.options.entrypoint_args,
            env_vars=spec.options.env_vars,
        )
        launch, warnings = resolve_command(tree, launch)
        eif_path = scratch / "app.eif"
        identity = EifIdentity(
            image_name=image.name,
            image_version=image.config_digest.partition(":")[2],
            docker_info=docker_info(image.config, image.config_digest,
                                    f"{image.name}@{image.input_digest}" if image.input_digest else None),
            custom={"nitroconv": {"debug": spec.options.debug}},
        )
        built = build_eif(tree, launch, identity, blobs_dir=blobs_dir, out_path=eif_path,
                          cpu_count=spec.cpu_count, mem_size_mib=spec.mem_size_mib)
        del tree  # the spool files stay until scratch is removed; the index can go

        stage(Stage.MEASURING)
        # Re-read with the strict reader: a torn write or a writer bug must not be pushed and trusted.
        checked = read_eif(eif_path)
        if checked.measurements != built.measurements:
            raise InvalidEif("the EIF read back does not measure what was written")
        if spec.mem_size_mib * MIB < MEMORY_FACTOR * built.size:
            need = -(-MEMORY_FACTOR * built.size // MIB)
            raise MemoryTooSmall(
                f"mem_size {spec.mem_size_mib} MiB is below {MEMORY_FACTOR}x the EIF size; use at least {need} MiB",
                details={"mem_size": spec.mem_size_mib, "minimum": need, "eif_size": built.size},
            )

        stage(Stage.PUSHING)
        files = _enclave_files(spec, built.measurements)
        layer = write_layer(eif_path, files, scratch / "layer.tar.gz")
        on_stage(Stage.PUSHING, 0.9)
        input_digest = image.input_digest or image.config_digest
        image_labels = labels(built.measurements, input_digest)
        pushed = push(out_ref, layer, config_json(layer, image_labels, None), {},
                      credentials=spec.output_credentials, insecure_registries=spec.insecure_registries)
        if eif_out is not None:
            shutil.copyfile(eif_path, eif_out)
        on_stage(Stage.PUSHING, 1.0)
        return ConvertResult(
            input_digest=input_digest,
            output_digest=pushed.digest,
            output_reference=pushed.reference,
            output_size=pushed.size,
            eif_size=built.size,
            eif_sha256=layer.eif_sha256,
            measurements=built.measurements,
            exposed_ports=_exposed_ports(image.config),
            warnings=warnings,
            docker_version=_str_or_none(image.config.get("docker_version")),
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _enclave_files(spec: ConvertSpec, measurements: Measurements) -> dict[str, bytes]:
    """`measurements.json` (nitro-cli's shape) and `launch.json` (what the launcher needs) of the output image."""
    mutable = dict(parse_env(spec.options.mutable_env_vars, field="mutable_env_vars"))
    launch = {
        "eif": "/enclave/app.eif",
        "cpu_count": spec.cpu_count,
        "memory_mib": spec.mem_size_mib,
        "debug": spec.options.debug,
        "allow_cmdline_args": spec.options.allow_cmdline_args,
        "mutable_env_vars": mutable,
        "java_mode": spec.options.java_mode,
        "enable_overlay_filesystem_persistence": spec.options.enable_overlay_filesystem_persistence,
    }
    return {
        "measurements.json": (json.dumps(measurements.to_nitro_cli(), indent=2) + "\n").encode(),
        "launch.json": (json.dumps(launch, indent=2, sort_keys=True) + "\n").encode(),
    }
