"""The conversion pipeline end to end: pull → build → measure → push, with stage reports and cancel points."""
from __future__ import annotations

import enum
import errno
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from common.enclave.launch import LaunchSpec, launch_spec, parse_env
from common.enclave.measure import Measurements
from common.enclave.reader import check_written
from common.enclave.shim import DAEMONS, SHIM_DIR, through_shim
from common.enclave.signing import EifSigner, load_signer
from common.errors import (
    Cancelled,
    InvalidBlobs,
    InvalidOptions,
    InvalidSigningMaterial,
    MemoryTooSmall,
)
from common.image.compress import Compression, parse_compression
from common.image.filetree import NodeKind, Tree
from common.image.layers import Limits
from common.options import check_java_mode
from common.registry.blobcache import BlobStore
from common.registry.client import Credentials, FetchedManifest
from worker.pipeline.build import EifIdentity, build_eif, docker_info
from worker.pipeline.cabundle import append_ca_bundle, load_ca_bundle
from worker.pipeline.emulatorboot import BootCheckPlan
from worker.pipeline.memory import MEMORY_FACTOR, minimum_mem_mib
from worker.pipeline.outputbase import BaseImage, base_reference, resolve_base
from worker.pipeline.outputimage import ENTRYPOINT, Blob, config_json, labels, write_layer
from worker.pipeline.pull import PulledImage, pull
from worker.pipeline.push import output_reference, push
from worker.pipeline.streamupload import LayerStream, open_layer_stream

BLOB_FILES = ("bzImage", "cmdline", "init", "nsm.ko")
# The kernel's initramfs unpacker drops names of PATH_MAX (4096 with the NUL) or more, and the app
# ramdisk prefixes every image path with "rootfs/".
DEFAULT_LIMITS = Limits(max_path_bytes=4096 - 1 - len("rootfs/"))


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
    # None: the smallest valid size for the EIF built, rounded up to 256 MiB (worker.pipeline.memory).
    mem_size_mib: int | None
    insecure_registries: frozenset[str] = frozenset()
    # The deployment's signing key and certificate (PEM paths, both or neither): signature section and PCR8.
    signing_key: Path | None = None
    signing_cert: Path | None = None
    # The service's CA bundle (PEM), appended to the image's trust store for add_ccm_ca_certificates.
    ca_bundle: Path | None = None


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
    # The enclave memory used: in the EIF header and launch.json; the requested size or the computed default.
    mem_size_mib: int = 0
    # `BootResult.to_json()` when the boot check ran.
    boot_check: dict[str, object] | None = None
    # The output layer pushed (its descriptor and uncompressed digest), for the reuse cache.
    layer_blob: Blob | None = None
    layer_diff_id: str = ""
    # The earlier build whose EIF and layer this one reused, when it did.
    reused_from: str | None = None


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


def command_warnings(tree: Tree, spec: LaunchSpec) -> tuple[str, ...]:
    """A warning when argv[0] is not an executable file of the image, found as the shim will look for it.

    The shim resolves a bare name on the image's PATH at start (Docker's rule); this only says early
    that it would fail. A relative name with a slash depends on WORKDIR and is not checked.
    """
    argv0 = spec.argv[0]
    if "/" in argv0:
        candidates = [argv0] if argv0.startswith("/") else []
    else:
        path_value = next((e.partition("=")[2] for e in spec.env if e.startswith("PATH=")), "")
        candidates = [f"{d.rstrip('/')}/{argv0}" for d in path_value.split(":") if d.startswith("/")]
    if "/" in argv0 and not candidates:
        return ()
    for candidate in candidates:
        node = tree.lookup(candidate.encode())
        if node is not None and node.kind is NodeKind.FILE and node.mode & 0o111:
            return ()
    where = "in the image" if "/" in argv0 else "on the image's PATH"
    return (f"{argv0!r} was not found {where}; the enclave will fail to start it",)


def default_runtime_dir() -> Path:
    """Where `make runtime` puts the shim: $NITROCONV_RUNTIME_DIR, else <state dir>/runtime."""
    env = os.environ.get("NITROCONV_RUNTIME_DIR")
    if env:
        return Path(env)
    return Path(os.environ.get("NITROCONV_STATE_DIR") or ".state") / "runtime"


def _shim(runtime_dir: Path) -> Path:
    shim = runtime_dir / "shim"
    if not shim.is_file():
        raise InvalidBlobs(f"runtime dir {runtime_dir} lacks the exec shim `shim` (run `make runtime`)",
                           details={"missing": ["shim"], "runtime_dir": str(runtime_dir)})
    return shim


def _daemons(runtime_dir: Path) -> list[Path]:
    """The converter's in-enclave daemons (common.enclave.shim.DAEMONS), built by `make runtime` beside the shim."""
    missing = [name for name in DAEMONS if not (runtime_dir / name).is_file()]
    if missing:
        raise InvalidBlobs(f"runtime dir {runtime_dir} lacks {', '.join(missing)} (run `make runtime`)",
                           details={"missing": missing, "runtime_dir": str(runtime_dir)})
    return [runtime_dir / name for name in DAEMONS]


def _launcher(runtime_dir: Path) -> bytes:
    """The output image's /enclave/run (worker/runtime/launcher.c), built by `make runtime`."""
    try:
        return (runtime_dir / "run").read_bytes()
    except FileNotFoundError:
        raise InvalidBlobs(f"runtime dir {runtime_dir} lacks the launcher `run` (run `make runtime`)",
                           details={"missing": ["run"], "runtime_dir": str(runtime_dir)}) from None


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
    runtime_dir: Path | None = None,
    boot_check: bool | float | BootCheckPlan = False,
    output_base: str = "",
    keep_layer: Path | None = None,
    output_compression: Compression | str = Compression.GZIP,
    stream_push: bool = True,
    cache_max_bytes: int = 0,
    input_manifest: FetchedManifest | None = None,
) -> ConvertResult:
    """Convert one image. Everything written goes under `scratch` (emptied at the end) or the blob cache.

    `boot_check` (True, or a timeout in seconds) boots the EIF under QEMU after it is measured and
    before anything is pushed; a boot that does not reach the entrypoint raises `BootCheckFailed`
    carrying the result in `details["boot_check"]`.

    `output_base` (NITROCONV_OUTPUT_BASE_IMAGE, a registry reference; empty for none) is the image
    the output is layered on, e.g. one with nitro-cli for the launcher to run.

    `keep_layer`: on success the compressed output layer is moved there (a reuse cache) before
    scratch is removed.

    `output_compression` (NITROCONV_OUTPUT_COMPRESSION): the output layer's `gzip` (any client) or `zstd`
    (smaller and faster, for registries and clients that accept it; Docker 20.10 cannot pull it).

    `stream_push`: without a boot check, the output layer is uploaded while it is compressed and the session
    is closed only at push, after every check passed (worker.pipeline.streamupload); False uploads it at push.

    `cache_max_bytes` bounds the blob cache (0: unbounded): each layer the pull adds evicts the least recently
    used blobs beyond it, so the host's disk holds at most the bound or the image being converted.

    `input_manifest`: the input registry's answer for `spec.input_ref`, fetched by the caller (the reuse cache's
    key): that manifest is the one converted, without asking the registry again.
    """
    _check_blobs(blobs_dir)
    runtime = runtime_dir or default_runtime_dir()
    shim, daemons, launcher = _shim(runtime), _daemons(runtime), _launcher(runtime)
    base_ref = base_reference(output_base)
    base_credentials = _base_credentials(spec, base_ref.api_host) if base_ref is not None else None
    cache = BlobStore(cache_dir / "blobs", max_bytes=cache_max_bytes)
    # Malformed options fail before any network I/O.
    parse_env(spec.options.env_vars, field="env_vars")
    parse_env(spec.options.mutable_env_vars, field="mutable_env_vars")
    out_ref = output_reference(spec.output_ref)
    if spec.cpu_count < 1 or (spec.mem_size_mib is not None and spec.mem_size_mib < 1):
        raise InvalidOptions("cpu_count and mem_size must be positive", details={"field": "cpu_count/mem_size"})
    check_java_mode(spec.options.java_mode)
    output_compression = parse_compression(output_compression)
    # The signing identity is checked per build: a certificate can expire while the service runs.
    signer = _signer(spec)
    ca_bundle = load_ca_bundle(spec.ca_bundle) if spec.options.add_ccm_ca_certificates else None

    def stage(s: Stage, within: float = 0.0) -> None:
        if should_cancel():
            raise Cancelled(f"conversion cancelled before {s.value.lower()}")
        on_stage(s, _STAGE_START[s] + (_STAGE_END[s] - _STAGE_START[s]) * within)

    scratch.mkdir(mode=0o700, parents=True, exist_ok=True)
    stream: LayerStream | None = None
    try:
        stage(Stage.PULLING)
        base: BaseImage | None = None
        if base_ref is not None:
            # Before the long part: a base that cannot be resolved would fail every conversion at the end.
            base = resolve_base(base_ref, credentials=base_credentials,
                                insecure_registries=spec.insecure_registries)
        tree = Tree()
        image: PulledImage = pull(
            spec.input_ref, tree,
            credentials=spec.input_credentials,
            insecure_registries=spec.insecure_registries,
            cache=cache,
            spool_dir=scratch / "spool",
            limits=limits or DEFAULT_LIMITS,
            progress=lambda f: on_stage(Stage.PULLING, _STAGE_END[Stage.PULLING] * f),
            manifest=input_manifest,
        )

        stage(Stage.BUILDING)
        if ca_bundle is not None:
            append_ca_bundle(tree, ca_bundle)
        inner = image.config.get("config")
        launch = launch_spec(
            inner if isinstance(inner, dict) else {},
            entrypoint=spec.options.entrypoint,
            entrypoint_args=spec.options.entrypoint_args,
            env_vars=spec.options.env_vars,
        )
        warnings = command_warnings(tree, launch) + option_warnings(spec.options)
        if tree.lookup(SHIM_DIR.encode(), follow=False) is not None:
            warnings += (f"the image's /{SHIM_DIR} is replaced by the converter's exec shim",)
        # WORKDIR, USER and the run-time allow-list are the shim's options: in /cmd, so measured in PCR2.
        launch = through_shim(launch, mutable_env=spec.options.mutable_env_vars,
                              allow_args=spec.options.allow_cmdline_args)
        eif_path = scratch / "app.eif"
        identity = EifIdentity(
            image_name=image.name,
            image_version=image.config_digest.partition(":")[2],
            docker_info=docker_info(image.config, image.config_digest,
                                    f"{image.name}@{image.input_digest}" if image.input_digest else None),
            custom={"nitroconv": {"debug": spec.options.debug}},
        )
        built = build_eif(tree, launch, identity, blobs_dir=blobs_dir, out_path=eif_path,
                          cpu_count=spec.cpu_count, mem_size_mib=spec.mem_size_mib, shim=shim, daemons=daemons,
                          signer=signer)
        del tree  # the spool files stay until scratch is removed; the index can go

        stage(Stage.MEASURING)
        mem_size_mib = built.mem_size_mib
        need = minimum_mem_mib(built.size)
        if mem_size_mib < need:
            raise MemoryTooSmall(
                f"mem_size {mem_size_mib} MiB is below {MEMORY_FACTOR}x the EIF size; use at least {need} MiB",
                details={"mem_size": mem_size_mib, "minimum": need, "eif_size": built.size},
            )
        # A torn write or a writer bug must not be pushed and trusted. The strict reader would measure the
        # whole file again (two SHA-384s of it, a second of CPU per 350 MB); instead the file is held to what
        # the writer reports having written, whose PCRs were hashed from the very chunks it wrote:
        #  - check_written: the size, the 548 header bytes (table, memory, CPUs, CRC) exactly as written,
        #    every section header, the section order, the metadata and the signature (verified on PCR0);
        #  - write_layer, which reads every byte anyway to make the output layer: their CRC-32 equals the
        #    CRC the writer computed over the chunks it hashed. A short, torn or since-changed file breaks
        #    the size or the CRC; a writer that wrote other bytes than it hashed breaks the CRC; and the
        #    layer holds exactly the bytes that passed, so what is pushed is what was checked.
        # The layer is made from this read rather than teed from the writer: the EIF's header (its CRC, and
        # a signature section) is final only after the last section, and the layer's digests need the bytes
        # in file order, header first. The strict reader stays the conformance oracle (tests, `verify`).
        assert built.written is not None
        check_written(eif_path, built.written)
        files = {**_enclave_files(spec, built.measurements, mem_size_mib), "run": launcher}
        if stream_push and boot_check is False:
            # With a boot check nothing may reach the registry before the boot passed.
            stream = open_layer_stream(out_ref, credentials=spec.output_credentials,
                                       insecure_registries=spec.insecure_registries, should_cancel=should_cancel)
        layer = write_layer(eif_path, files, scratch / "layer.blob", compression=output_compression,
                            written=built.written, sink=stream.write if stream is not None else None)
        boot = _boot_check(eif_path, boot_check, scratch, built.measurements) if boot_check is not False else None

        stage(Stage.PUSHING)
        input_digest = image.input_digest or image.config_digest
        image_labels = labels(built.measurements, input_digest)
        pushed = push(out_ref, layer, config_json(layer, image_labels, ENTRYPOINT, base), {},
                      credentials=spec.output_credentials, insecure_registries=spec.insecure_registries,
                      base=base, cache=cache, base_credentials=base_credentials, streamed=stream)
        if eif_out is not None:
            shutil.copyfile(eif_path, eif_out)
        if keep_layer is not None:
            _move(layer.path, keep_layer)
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
            mem_size_mib=mem_size_mib,
            boot_check=boot,
            layer_blob=layer.blob,
            layer_diff_id=layer.diff_id,
        )
    finally:
        if stream is not None:
            stream.close()  # deletes an uncommitted session: a failed or cancelled conversion leaves nothing
        shutil.rmtree(scratch, ignore_errors=True)


def _move(src: Path, dest: Path) -> None:
    """Rename when on one filesystem; else copy to a temporary name beside `dest` and rename it into place."""
    try:
        os.replace(src, dest)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(src, tmp)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)


def _boot_check(eif_path: Path, boot_check: bool | float | BootCheckPlan, scratch: Path,
                measurements: Measurements) -> dict[str, object]:
    """Boot the EIF (in the emulator when the plan allows, worker/pipeline/emulatorboot.py); raise
    `BootCheckFailed` (with the result) unless the entrypoint was exec'd and, in the emulator, the PCRs
    it measured are the Build's and the heartbeat came."""
    from worker.pipeline.emulatorboot import expected_registers, run_boot_check

    if isinstance(boot_check, BootCheckPlan):
        plan = boot_check
    else:
        plan = BootCheckPlan() if boot_check is True else BootCheckPlan(timeout=float(boot_check))
    result = run_boot_check(eif_path, plan=plan, expected=expected_registers(measurements.registers()),
                            scratch=scratch)
    result.raise_if_failed()
    return dict(result.to_json())


def _signer(spec: ConvertSpec) -> EifSigner | None:
    if spec.signing_key is None and spec.signing_cert is None:
        return None
    if spec.signing_key is None or spec.signing_cert is None:
        raise InvalidSigningMaterial("a signing key and a signing certificate must be given together")
    return load_signer(spec.signing_key, spec.signing_cert)


# Debug enclaves attest zeros in every PCR (EIF.md §3.4), so attestation-based key release policies fail.
DEBUG_WARNING = ("debug enclaves attest all-zero PCRs: a KMS key policy or verifier pinned to this image's "
                 "PCR values will refuse the enclave while it runs in debug mode")


def option_warnings(options: ConverterOptions) -> tuple[str, ...]:
    """Warnings the Build carries because of the options chosen, whatever the image."""
    return (DEBUG_WARNING,) if options.debug else ()


def _base_credentials(spec: ConvertSpec, host: str) -> Credentials | None:
    """The output registry's credentials serve a base on that registry (the operator's); elsewhere it is pulled anonymously."""
    return spec.output_credentials if host == output_reference(spec.output_ref).api_host else None


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _enclave_files(spec: ConvertSpec, measurements: Measurements, mem_size_mib: int) -> dict[str, bytes]:
    """`measurements.json` (nitro-cli's shape) and `launch.json` (what the launcher needs) of the output image."""
    mutable = dict(parse_env(spec.options.mutable_env_vars, field="mutable_env_vars"))
    launch = {
        "eif": "/enclave/app.eif",
        "cpu_count": spec.cpu_count,
        "memory_mib": mem_size_mib,
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
