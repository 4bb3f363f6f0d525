"""What one conversion is asked for, where it writes, how it reports, and what it returns."""
from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.enclave.measure import Measurements
from common.errors import Cancelled
from common.registry.auth import Credentials
from common.registry.client import FetchedManifest
from worker.pipeline.outputimage import Blob


class Stage(enum.StrEnum):
    PULLING = "PULLING"
    BUILDING = "BUILDING"
    MEASURING = "MEASURING"
    PUSHING = "PUSHING"


# Share of the whole conversion at which each stage starts and ends, for one progress figure across stages.
_STAGE_START = {Stage.PULLING: 0.0, Stage.BUILDING: 0.5, Stage.MEASURING: 0.8, Stage.PUSHING: 0.85}
_STAGE_END = {Stage.PULLING: 0.5, Stage.BUILDING: 0.8, Stage.MEASURING: 0.85, Stage.PUSHING: 1.0}


def _ignore(stage: Stage, progress: float) -> None:
    pass


def _never() -> bool:
    return False


@dataclass(frozen=True)
class Progress:
    """Where a conversion is (`on_stage(stage, share of the whole)`), and whether it should stop
    (`should_cancel`, asked before each stage and while the output layer streams to the registry)."""

    on_stage: Callable[[Stage, float], None] = _ignore
    should_cancel: Callable[[], bool] = _never

    def enter(self, stage: Stage) -> None:
        if self.should_cancel():
            raise Cancelled(f"conversion cancelled before {stage.value.lower()}")
        self.on_stage(stage, _STAGE_START[stage])

    def within(self, stage: Stage, done: float) -> None:
        self.on_stage(stage, _STAGE_START[stage] + (_STAGE_END[stage] - _STAGE_START[stage]) * done)

    def finished(self) -> None:
        self.on_stage(Stage.PUSHING, 1.0)


@dataclass(frozen=True)
class ConverterOptions:
    """The request's converter_options (DESIGN.md §5 step 2)."""

    entrypoint: tuple[str, ...] = ()
    entrypoint_args: tuple[str, ...] = ()
    env_vars: tuple[str, ...] = ()
    mutable_env_vars: tuple[str, ...] = ()
    allow_cmdline_args: bool = False
    debug: bool = False
    java_mode: str | None = None
    add_ccm_ca_certificates: bool = False
    enable_overlay_filesystem_persistence: bool = True
    # converter_options.network as the request gave it (common.enclave.network.parse_request's form, or None).
    network: Mapping[str, Any] | None = None


@dataclass(frozen=True)
class ConvertSpec:
    """One conversion request: what to convert, where to push it, with whose credentials and which options."""

    input_ref: str
    output_ref: str
    input_credentials: Credentials | None
    output_credentials: Credentials | None
    options: ConverterOptions
    cpu_count: int
    # None: the smallest valid size for the EIF built, rounded up to 256 MiB (worker.pipeline.memory).
    mem_size_mib: int | None
    # Whose conversion this is (an account id; "" for the CLI): a reused layer is only mounted from its own pushes.
    owner: str = ""
    build_id: str | None = None
    # False converts afresh even when an identical conversion is cached (the result is still recorded).
    reuse: bool = True
    # The input registry's answer for `input_ref`, when the caller already asked: that manifest is converted.
    input_manifest: FetchedManifest | None = None


@dataclass(frozen=True)
class Workspace:
    """Where one conversion writes: `scratch` (removed at the end), and what the caller keeps of it."""

    scratch: Path
    eif_out: Path | None = None  # a copy of the EIF
    keep_layer: Path | None = None  # on success, the compressed output layer is moved here


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
    # The network policy measured into the EIF and written to launch.json (common.enclave.network.resolve).
    network: dict[str, object] | None = None
