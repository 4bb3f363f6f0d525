"""Build step: an applied image tree plus converter options become a reproducible EIF and its measurements."""
from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, cast

from common.enclave.launch import LaunchSpec
from common.enclave.measure import Measurements
from common.enclave.metadata import build_metadata, kernel_info_from_config
from common.enclave.ramdisk import app_archive, bootstrap_archive
from common.enclave.signing import EifSigner
from common.enclave.writer import KnownSpan, Section, WrittenEif, eif_size, eif_spans, write_eif
from common.image.filetree import Tree
from common.util.memo import file_identity
from worker.pipeline.memory import default_mem_mib

# A fixed build time keeps the metadata section, and so the whole file, byte-identical across builds (EIF.md §7).
BUILD_TIME = "1970-01-01T00:00:00+00:00"
BUILD_TOOL = "nitroconv"
MIB = 1024 * 1024


@dataclass(frozen=True)
class EifIdentity:
    """What the metadata section says about the image: all derived from the image, never from the clock or host."""

    image_name: str
    image_version: str
    docker_info: Mapping[str, object] | None
    custom: Mapping[str, object] | None = None


@dataclass(frozen=True)
class BuiltEif:
    path: Path | None  # None: no file was asked for, the bytes went to the consumer only
    size: int
    measurements: Measurements
    # The enclave memory written into the header: the requested size, or the computed default.
    mem_size_mib: int = 0
    # What the writer wrote (header, size, CRC), to check the file without measuring it again.
    written: WrittenEif | None = None
    # Every byte went to the `consumer` too, in order, as it was written.
    streamed: bool = False


# Given the EIF's size and keyed spans before its first byte is written, returns what receives every byte in order.
Consumer = Callable[[int, Sequence[KnownSpan]], Callable[[bytes], None]]


class _Tee:
    """The EIF file, each piece also handed to a consumer; written strictly in order (the header first)."""

    def __init__(self, out: BinaryIO | None, consumer: Callable[[bytes], None]) -> None:
        self._out, self._consumer = out, consumer

    def write(self, data: bytes | memoryview) -> int:
        if self._out is not None:
            self._out.write(data)  # a buffered file: all of it, or it raises
        size = len(data) if isinstance(data, bytes) else data.nbytes
        if isinstance(data, memoryview):
            # The writer passes a view of the whole piece: hand on the piece itself rather than a copy.
            whole = data.obj
            data = whole if isinstance(whole, bytes) and len(whole) == data.nbytes else data.tobytes()
        self._consumer(data)
        return size

    def seekable(self) -> bool:
        return False


def tool_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("nitroconv")
    except PackageNotFoundError:  # running from a source tree without installation
        return "0.0.0"


def build_eif(
    tree: Tree,
    launch: LaunchSpec,
    identity: EifIdentity,
    *,
    blobs_dir: Path,
    out_path: Path | None,
    cpu_count: int,
    mem_size_mib: int | None,
    shim: Path | None = None,
    signer: EifSigner | None = None,
    extras: Mapping[str, bytes | Path] | None = None,
    consumer: Consumer | None = None,
) -> BuiltEif:
    """Write the EIF to `out_path` in one pass; PCRs are computed while the sections stream out.

    `mem_size_mib=None` writes the smallest valid size for this EIF into the header's default_mem:
    the file's length is known from its sections before any byte is written, so the header stays
    a deterministic function of the input.

    `consumer`, for an unsigned EIF: the header is written first (its CRC from the content's CRCs, which the
    pull recorded) and every byte goes to what `consumer` returns as well, in order (`BuiltEif.streamed`); so
    the output layer is made in the same pass. A signed EIF's header is final only after its signature: then
    `consumer` is not called and the caller reads the file back.

    `out_path=None` (with a `consumer`, unsigned): no file is written, the consumer gets the only copy.
    """
    if out_path is None and (consumer is None or signer is not None):
        raise ValueError("an EIF without a file needs a consumer and no signer")
    kernel = blobs_dir / "bzImage"
    config = blobs_dir / "bzImage.config"
    os_name, kernel_version = kernel_info_from_config(config) if config.exists() else ("Linux", "unknown")
    metadata = build_metadata(
        image_name=identity.image_name,
        image_version=identity.image_version,
        build_time=BUILD_TIME,
        build_tool=BUILD_TOOL,
        build_tool_version=tool_version(),
        operating_system=os_name,
        kernel_version=kernel_version,
        docker_info=dict(identity.docker_info) if identity.docker_info is not None else None,
        custom=dict(identity.custom) if identity.custom is not None else None,
    )
    # nitro-cli trims the cmdline file: the section has no trailing newline (EIF.md §5.2).
    cmdline = (blobs_dir / "cmdline").read_bytes().strip()
    boot, app = bootstrap_archive(blobs_dir), app_archive(tree, launch, shim=shim, extras=extras)
    if mem_size_mib is None:
        mem_size_mib = default_mem_mib(eif_size(kernel=kernel.stat().st_size, cmdline=len(cmdline),
                                                metadata=len(metadata), ramdisks=[boot.size, app.size],
                                                signature=signer.max_section_size() if signer else None))
    kernel_section = Section.of_file(kernel)
    ramdisks = [Section(boot.size, boot.chunks, bootstrap_key(blobs_dir), boot.crc32),
                Section(app.size, app.chunks, crc=app.crc32)]
    streamed = consumer is not None and signer is None
    with contextlib.ExitStack() as stack:
        out = stack.enter_context(out_path.open("wb")) if out_path is not None else None
        target: BinaryIO | None = out
        if consumer is not None and streamed:
            size = eif_size(kernel=kernel_section.size, cmdline=len(cmdline), metadata=len(metadata),
                            ramdisks=[boot.size, app.size])
            spans = eif_spans(kernel=kernel_section, cmdline=cmdline, metadata=metadata, ramdisks=ramdisks)
            target = cast(BinaryIO, _Tee(out, consumer(size, spans)))
        assert target is not None
        written = write_eif(target, kernel=kernel_section, cmdline=cmdline, metadata=metadata, ramdisks=ramdisks,
                            default_mem=mem_size_mib * MIB, default_cpus=cpu_count, signer=signer,
                            header_first=streamed)
    return BuiltEif(out_path, written.size, written.measurements, mem_size_mib, written, streamed)


def bootstrap_key(blobs_dir: Path) -> Hashable:
    """What ramdisk 0's bytes depend on: the two blob files it holds (the rest is fixed by common.enclave.ramdisk)."""
    return ("bootstrap", file_identity(blobs_dir / "init"), file_identity(blobs_dir / "nsm.ko"))


def docker_info(config: Mapping[str, object], config_digest: str, repo_digest: str | None) -> dict[str, object]:
    """A `docker image inspect`-like object from the image config alone, so it is the same on every worker."""
    info: dict[str, object] = {
        "Id": config_digest,
        "RepoDigests": [repo_digest] if repo_digest else [],
        "Architecture": config.get("architecture"),
        "Os": config.get("os"),
        "Config": config.get("config") or {},
        "RootFS": config.get("rootfs") or {},
    }
    # Round-trip through JSON so what is measured is exactly what a reader of the metadata will see.
    result: dict[str, object] = json.loads(json.dumps(info, sort_keys=False))
    return result
