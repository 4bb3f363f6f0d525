"""The conversion's stages: pull → build → package → push, each a function of the request, the host, the progress
reporter and what the stage before it returned. `prepare` checks everything that needs no network first."""
from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from common.enclave.egress import EGRESS_SERVICE_NAME, EGRESSD_NAME, proxy_env, ships_egressd
from common.enclave.launch import LaunchSpec, launch_spec, parse_env
from common.enclave.measure import Measurements
from common.enclave.network import (
    NETD_NAME,
    canonical_json,
    netd_conf,
    parse_request,
    published_ports,
    resolve,
)
from common.enclave.reader import check_written
from common.enclave.shim import DAEMONS, SHIM_DIR, through_shim
from common.enclave.signing import EifSigner
from common.enclave.writer import KnownSpan
from common.errors import InvalidOptions, MemoryTooSmall
from common.image.filetree import NodeKind, Tree
from common.options import check_java_mode
from common.registry.auth import Credentials
from common.registry.reference import Reference
from worker.pipeline.build import BuiltEif, EifIdentity, build_eif, docker_info
from worker.pipeline.cabundle import append_ca_bundle, load_ca_bundle
from worker.pipeline.etcfiles import write_etc_files
from worker.pipeline.host import ConversionHost
from worker.pipeline.memory import MEMORY_FACTOR, minimum_mem_mib
from worker.pipeline.outputbase import BaseImage, base_reference, resolve_base
from worker.pipeline.outputimage import ENTRYPOINT, LayerWriter, OutputLayer, config_json, labels, write_layer
from worker.pipeline.pull import PulledImage
from worker.pipeline.pull import pull as pull_image
from worker.pipeline.push import Pushed, output_reference
from worker.pipeline.push import push as push_image
from worker.pipeline.spec import ConverterOptions, ConvertResult, ConvertSpec, Progress, Stage, Workspace
from worker.pipeline.streamupload import LayerStream, open_layer_stream

# Debug enclaves attest zeros in every PCR (EIF.md §3.4), so attestation-based key release policies fail.
DEBUG_WARNING = ("debug enclaves attest all-zero PCRs: a KMS key policy or verifier pinned to this image's "
                 "PCR values will refuse the enclave while it runs in debug mode")


@dataclass(frozen=True)
class Plan:
    """One conversion's request and host rules, checked before any network I/O."""

    work: Workspace
    output: Reference
    base: Reference | None
    # The output registry's credentials serve a base on that registry (the operator's); elsewhere it is anonymous.
    base_credentials: Credentials | None
    shim: Path
    launcher: bytes
    # The daemons the shim starts, by file name in /.nitroconv (worker/runtime/netup.h); the build takes those its
    # policy needs. And the parent's egress service, beside the launcher.
    daemons: dict[str, Path]
    egress_service: bytes
    signer: EifSigner | None
    ca_bundle: bytes | None


@dataclass(frozen=True)
class Pulled:
    image: PulledImage
    tree: Tree
    base: BaseImage | None


@dataclass(frozen=True)
class Built:
    eif: BuiltEif
    image: PulledImage
    base: BaseImage | None
    warnings: tuple[str, ...]
    # The network policy measured into the EIF and written to launch.json (common.enclave.network.resolve).
    network: dict[str, object]
    # The output layer, fed the EIF's bytes as they were written (an unsigned EIF); `package` finishes it.
    layer: LayerWriter | None = None
    stream: LayerStream | None = None


@dataclass(frozen=True)
class Packaged:
    """The output layer, made from the checked EIF; `stream` when it is being uploaded already."""

    layer: OutputLayer
    measurements: Measurements
    input_digest: str
    base: BaseImage | None
    network: dict[str, object]
    stream: LayerStream | None = None
    boot_check: dict[str, object] | None = None


def prepare(spec: ConvertSpec, host: ConversionHost, work: Workspace) -> Plan:
    """Every check that needs no network, so a malformed request or a broken host fails before a registry is asked."""
    host.check_blobs()
    shim, launcher = host.shim(), host.launcher()
    base = base_reference(host.output_base)
    parse_env(spec.options.env_vars, field="env_vars")
    parse_env(spec.options.mutable_env_vars, field="mutable_env_vars")
    output = output_reference(spec.output_ref)
    if spec.cpu_count < 1 or (spec.mem_size_mib is not None and spec.mem_size_mib < 1):
        raise InvalidOptions("cpu_count and mem_size must be positive", details={"field": "cpu_count/mem_size"})
    check_java_mode(spec.options.java_mode)
    parse_request(spec.options.network)
    for credentials in (spec.input_credentials, spec.output_credentials):
        if credentials is not None:
            credentials.check()
    return Plan(
        work=work, output=output, base=base,
        base_credentials=spec.output_credentials if base is not None and base.api_host == output.api_host else None,
        shim=shim, launcher=launcher,
        daemons={name: host.runtime_file(name) for name in (*DAEMONS, NETD_NAME, EGRESSD_NAME)},
        egress_service=host.runtime_file(EGRESS_SERVICE_NAME).read_bytes(),
        signer=host.signer(),
        ca_bundle=load_ca_bundle(host.ca_bundle) if spec.options.add_ccm_ca_certificates else None,
    )


def resolve_output_base(host: ConversionHost, plan: Plan) -> BaseImage | None:
    return resolve_base(plan.base, credentials=plan.base_credentials,
                        insecure_registries=host.insecure_registries) if plan.base is not None else None


def pull(spec: ConvertSpec, host: ConversionHost, progress: Progress, plan: Plan) -> Pulled:
    """The input image, applied into a file tree (its file bodies spooled under scratch)."""
    progress.enter(Stage.PULLING)
    # Before the long part: a base that cannot be resolved would fail every conversion at the end.
    base = resolve_output_base(host, plan)
    tree = Tree()
    image = pull_image(
        spec.input_ref, tree,
        credentials=spec.input_credentials,
        insecure_registries=host.insecure_registries,
        cache=host.blob_store(),
        spool_dir=plan.work.scratch / "spool",
        limits=host.limits,
        progress=lambda done: progress.within(Stage.PULLING, done),
        manifest=spec.input_manifest,
    )
    return Pulled(image, tree, base)


def build(spec: ConvertSpec, host: ConversionHost, progress: Progress, plan: Plan, pulled: Pulled) -> Built:
    """The EIF, written to scratch and measured as it is written."""
    progress.enter(Stage.BUILDING)
    tree, image = pulled.tree, pulled.image
    if plan.ca_bundle is not None:
        append_ca_bundle(tree, plan.ca_bundle)
    inner = image.config.get("config")
    network = resolve(spec.options.network, exposed_ports=_exposed_ports(image.config), image_name=image.name)
    launch = launch_spec(
        inner if isinstance(inner, dict) else {},
        entrypoint=spec.options.entrypoint,
        entrypoint_args=spec.options.entrypoint_args,
        # In proxy mode the proxy variables come first, so the request's own env_vars still win.
        env_vars=(*proxy_env(network), *spec.options.env_vars),
    )
    warnings = command_warnings(tree, launch) + option_warnings(spec.options)
    if tree.lookup(SHIM_DIR.encode(), follow=False) is not None:
        warnings += (f"the image's /{SHIM_DIR} is replaced by the converter's exec shim",)
    write_etc_files(tree, network)
    extras: dict[str, bytes | Path] = {"network.json": canonical_json(network)}
    extras.update({name: plan.daemons[name] for name in DAEMONS})
    if network["ingress"]:
        extras["netd.conf"] = netd_conf(network)
        extras[NETD_NAME] = plan.daemons[NETD_NAME]
    if ships_egressd(network):
        extras[EGRESSD_NAME] = plan.daemons[EGRESSD_NAME]
    # WORKDIR, USER and the run-time allow-list are the shim's options: in /cmd, so measured in PCR2.
    launch = through_shim(launch, mutable_env=spec.options.mutable_env_vars, allow_args=spec.options.allow_cmdline_args)
    identity = EifIdentity(
        image_name=image.name,
        image_version=image.config_digest.partition(":")[2],
        docker_info=docker_info(image.config, image.config_digest,
                                f"{image.name}@{image.input_digest}" if image.input_digest else None),
        custom={"nitroconv": {"debug": spec.options.debug}},
    )
    # The output layer is made in the same pass as the EIF (its compression and digests on the other core
    # while the ramdisk is produced and measured), from the very bytes that are hashed into the PCRs.
    layer: list[LayerWriter] = []
    stream: list[LayerStream] = []

    def consumer(size: int, spans: Sequence[KnownSpan]) -> Callable[[bytes], None]:
        if spec.mem_size_mib is not None:
            _check_memory(spec.mem_size_mib, size)  # before the work, not after it: the size is known now
        sink = _open_stream(spec, host, progress, plan)
        if sink is not None:
            stream.append(sink)
        layer.append(LayerWriter(plan.work.scratch / "layer.blob", size, compression=host.output_compression,
                                 spans=spans, sink=sink.write if sink is not None else None))
        return layer[0].write

    # The EIF's file is written only for what reads it: the boot check, --eif-out, and a signed EIF's layer.
    wants_file = plan.work.eif_out is not None or host.boot_check is not None or plan.signer is not None
    try:
        eif = build_eif(tree, launch, identity, blobs_dir=host.blobs_dir,
                        out_path=plan.work.scratch / "app.eif" if wants_file else None,
                        cpu_count=spec.cpu_count, mem_size_mib=spec.mem_size_mib, shim=plan.shim, extras=extras,
                        signer=plan.signer, consumer=consumer)
    except BaseException:
        _abandon(layer[0] if layer else None, stream[0] if stream else None)
        raise
    return Built(eif, image, pulled.base, warnings, network, layer[0] if layer else None,
                 stream[0] if stream else None)


def _open_stream(spec: ConvertSpec, host: ConversionHost, progress: Progress, plan: Plan) -> LayerStream | None:
    """The streamed upload of the output layer, when the host pushes while it compresses. With a boot check
    nothing may reach the registry before the boot passed."""
    if not host.stream_push or host.boot_check is not None:
        return None
    return open_layer_stream(plan.output, credentials=spec.output_credentials,
                             insecure_registries=host.insecure_registries, should_cancel=progress.should_cancel)


def _check_memory(mem_size_mib: int, eif_size: int) -> None:
    need = minimum_mem_mib(eif_size)
    if mem_size_mib < need:
        raise MemoryTooSmall(
            f"mem_size {mem_size_mib} MiB is below {MEMORY_FACTOR}x the EIF size; use at least {need} MiB",
            details={"mem_size": mem_size_mib, "minimum": need, "eif_size": eif_size},
        )


def _abandon(layer: LayerWriter | None, stream: LayerStream | None) -> None:
    try:
        if layer is not None:
            layer.abort()
    finally:
        if stream is not None:
            stream.close()


def package(spec: ConvertSpec, host: ConversionHost, progress: Progress, plan: Plan, built: Built) -> Packaged:
    """The output layer (the EIF, measurements.json, launch.json and the launcher), after the EIF is checked
    against what its writer hashed, and the boot check when the host runs one."""
    progress.enter(Stage.MEASURING)
    eif = built.eif
    # A torn write or a writer bug must not be pushed and trusted. The strict reader would measure the whole
    # file again (two SHA-384s of it); instead the file is held to what the writer reports having written, whose
    # PCRs were hashed from the very chunks it wrote:
    #  - check_written: the size, the 548 header bytes (table, memory, CPUs, CRC) exactly as written,
    #    every section header, the section order, the metadata and the signature (verified on PCR0);
    #  - the layer's own CRC-32 of the EIF bytes it took in equals the CRC the writer computed over the chunks
    #    it hashed. An unsigned EIF's layer took them from the writer itself, as they were hashed (its header,
    #    CRC included, is written first: `build_eif(consumer=)`); a signed EIF's header is final only after its
    #    signature section, so its layer reads the file back (`write_layer`), and a short, torn or since-changed
    #    file breaks the size or the CRC. Either way the layer holds exactly the bytes that passed, so what is
    #    pushed is what was checked. The strict reader stays the conformance oracle (tests, `verify`).
    stream = built.stream
    try:
        _check_memory(eif.mem_size_mib, eif.size)
        assert eif.written is not None
        if eif.path is not None:
            check_written(eif.path, eif.written)
        files = {**enclave_files(spec, eif.measurements, eif.mem_size_mib, built.network), "run": plan.launcher,
                 EGRESS_SERVICE_NAME: plan.egress_service}
        if built.layer is not None:
            layer = built.layer.finish(files, eif.written)
        else:
            assert eif.path is not None  # build_eif writes the file of an EIF it did not stream
            stream = _open_stream(spec, host, progress, plan)
            layer = write_layer(eif.path, files, plan.work.scratch / "layer.blob",
                                compression=host.output_compression, written=eif.written,
                                sink=stream.write if stream is not None else None)
        if stream is not None:
            stream.end()
        boot = None
        if host.boot_check is not None:
            assert eif.path is not None  # build writes the file for the boot check
            boot = _boot_check(eif.path, host, plan.work.scratch, eif.measurements)
    except BaseException:
        _abandon(built.layer, stream)
        raise
    input_digest = built.image.input_digest or built.image.config_digest
    return Packaged(layer, eif.measurements, input_digest, built.base, built.network, stream, boot)


def push(spec: ConvertSpec, host: ConversionHost, progress: Progress, plan: Plan, packaged: Packaged, *,
         mount_from: str | None = None) -> Pushed:
    """The output image: the base's layers (if any), ours, the config and the manifest under the output tag.
    `mount_from`: a repository on the output registry that holds our layer already (tried as a mount first)."""
    progress.enter(Stage.PUSHING)
    layer, base = packaged.layer, packaged.base
    config = config_json(layer, labels(packaged.measurements, packaged.input_digest), ENTRYPOINT, base,
                         published_ports(packaged.network))
    return push_image(plan.output, layer, config, {}, credentials=spec.output_credentials,
                      insecure_registries=host.insecure_registries, base=base, cache=host.blob_store(),
                      base_credentials=plan.base_credentials, streamed=packaged.stream, mount_from=mount_from)


def keep(plan: Plan, built: Built, packaged: Packaged) -> None:
    """What the caller asked to keep of scratch: the EIF, the compressed layer."""
    if plan.work.eif_out is not None and built.eif.path is not None:
        shutil.copyfile(built.eif.path, plan.work.eif_out)
    if plan.work.keep_layer is not None:
        _move(packaged.layer.path, plan.work.keep_layer)


def result(built: Built, packaged: Packaged, pushed: Pushed) -> ConvertResult:
    return ConvertResult(
        input_digest=packaged.input_digest,
        output_digest=pushed.digest,
        output_reference=pushed.reference,
        output_size=pushed.size,
        eif_size=built.eif.size,
        eif_sha256=packaged.layer.eif_sha256,
        measurements=packaged.measurements,
        exposed_ports=_exposed_ports(built.image.config),
        warnings=built.warnings,
        docker_version=_str_or_none(built.image.config.get("docker_version")),
        mem_size_mib=built.eif.mem_size_mib,
        boot_check=packaged.boot_check,
        layer_blob=packaged.layer.blob,
        layer_diff_id=packaged.layer.diff_id,
        network=packaged.network,
    )


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


def option_warnings(options: ConverterOptions) -> tuple[str, ...]:
    """Warnings the Build carries because of the options chosen, whatever the image."""
    return (DEBUG_WARNING,) if options.debug else ()


def enclave_files(spec: ConvertSpec, measurements: Measurements, mem_size_mib: int,
                  network: dict[str, object] | None = None) -> dict[str, bytes]:
    """`measurements.json` (nitro-cli's shape) and `launch.json` (what the launcher needs) of the output image.

    `network`: the resolved policy; None resolves the request's without an image (no EXPOSE, name from input_ref).
    """
    if network is None:
        network = resolve(spec.options.network, exposed_ports=(), image_name=spec.input_ref)
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
        "network": network,
    }
    return {
        "measurements.json": (json.dumps(measurements.to_nitro_cli(), indent=2) + "\n").encode(),
        "launch.json": (json.dumps(launch, indent=2, sort_keys=True) + "\n").encode(),
    }


def _boot_check(eif_path: Path, host: ConversionHost, scratch: Path,
                measurements: Measurements) -> dict[str, object] | None:
    """Boot the EIF as the host's plan says (worker/pipeline/emulatorboot.py); raise `BootCheckFailed` (with the
    result in `details["boot_check"]`) unless the entrypoint was exec'd and, in the emulator, the PCRs it measured
    are the Build's and the heartbeat came."""
    if host.boot_check is None:
        return None
    from worker.pipeline.emulatorboot import expected_registers, run_boot_check

    result = run_boot_check(eif_path, plan=host.boot_check, expected=expected_registers(measurements.registers()),
                            scratch=scratch)
    result.raise_if_failed()
    return dict(result.to_json())


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


def _exposed_ports(config: dict[str, object]) -> tuple[tuple[int, str], ...]:
    inner = config.get("config")
    ports = inner.get("ExposedPorts") if isinstance(inner, dict) else None
    found = []
    for key in ports or {}:
        number, _, proto = str(key).partition("/")
        if number.isdigit():
            found.append((int(number), proto or "tcp"))
    return tuple(sorted(found))


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None
