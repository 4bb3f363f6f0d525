"""Adapter from a build record to the pipeline (`convert_reusing`) and from its result to the record's Outcome."""
from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from common.registry.auth import Credentials
from common.settings import Settings
from common.store.builds import Outcome
from common.store.models import Build

if TYPE_CHECKING:
    from worker.pipeline.host import ConversionHost


@functools.lru_cache(maxsize=2)
def _host(settings: Settings) -> ConversionHost:
    """One per process and settings; imported on first use, so processes that never convert never load the pipeline."""
    from worker.pipeline.host import ConversionHost

    return ConversionHost.from_settings(settings)


def _hex(value: object) -> str | None:
    if value is None:
        return None
    return value.hex() if isinstance(value, bytes) else str(value)


class PipelineEngine:
    """Runs one build's conversion on this host (the runner's Engine)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    @property
    def host(self) -> ConversionHost:
        return _host(self.settings)

    def __call__(self, build: Build, creds_in: Credentials | None, creds_out: Credentials | None, *,
                 scratch: Path, on_stage: Callable[[str, float], None],
                 should_cancel: Callable[[], bool]) -> Outcome:
        from worker.pipeline.reuse import convert_reusing
        from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Stage, Workspace

        o = build.converter_options

        def strings(key: str) -> tuple[str, ...]:
            value = o.get(key) or []
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        spec = ConvertSpec(
            input_ref=build.input_image_name,
            output_ref=build.output_image_name,
            input_credentials=creds_in,
            output_credentials=creds_out,
            options=ConverterOptions(
                entrypoint=strings("entrypoint"),
                entrypoint_args=strings("entrypoint_args"),
                env_vars=strings("env_vars"),
                mutable_env_vars=strings("mutable_env_vars"),
                allow_cmdline_args=bool(o.get("allow_cmdline_args")),
                debug=bool(o.get("debug")),
                java_mode=str(o["java_mode"]) if o.get("java_mode") else None,
                add_ccm_ca_certificates=bool(o.get("add_ccm_ca_certificates")),
                enable_overlay_filesystem_persistence=build.enable_overlay_filesystem_persistence,
                network=_network(o.get("network")),
            ),
            cpu_count=build.cpu_count,
            mem_size_mib=build.mem_size,
            # The account owns the cached conversion: a reused layer is only ever mounted from its own pushes.
            owner=str(build.account_id),
            build_id=str(build.id),
        )

        def report(stage: Stage, progress: float) -> None:
            on_stage(stage.name, progress)

        result = convert_reusing(spec, self.host, Progress(report, should_cancel), Workspace(scratch))
        m = result.measurements
        return Outcome(
            input_digest=str(result.input_digest), output_digest=str(result.output_digest),
            output_size=int(result.output_size), eif_size=int(result.eif_size), eif_sha256=str(result.eif_sha256),
            pcr0=_hex(m.pcr0) or "", pcr1=_hex(m.pcr1) or "", pcr2=_hex(m.pcr2) or "", pcr8=_hex(m.pcr8),
            exposed_ports=tuple((int(p), str(proto)) for p, proto in result.exposed_ports),
            warnings=tuple(str(w) for w in result.warnings), docker_version=result.docker_version,
            mem_size=int(result.mem_size_mib), boot_check=result.boot_check, reused_from=result.reused_from,
            network=result.network,
        )


def _network(value: object) -> dict[str, object] | None:
    # The API stored parse_request's form; convert() checks it again, so a hand-edited row fails by name.
    return dict(value) if isinstance(value, dict) else None
