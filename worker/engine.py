"""Adapter from a build record to the pipeline's `convert()` and from its result to the record's Outcome."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from common.settings import Settings
from common.store.builds import Outcome
from common.store.models import Build
from common.store.sealing import Credentials


def _registry_credentials(creds: Credentials | None) -> object | None:
    if creds is None:
        return None
    from common.registry.client import Credentials as RegistryCredentials

    return RegistryCredentials(creds.username, creds.password)


def _hex(value: object) -> str | None:
    if value is None:
        return None
    return value.hex() if isinstance(value, bytes) else str(value)


class PipelineEngine:
    """Runs `worker.pipeline.convert.convert` for one build (the runner's Engine)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def __call__(self, build: Build, creds_in: Credentials | None, creds_out: Credentials | None, *,
                 scratch: Path, on_stage: Callable[[str, float], None],
                 should_cancel: Callable[[], bool]) -> Outcome:
        from worker.pipeline.convert import DEFAULT_LIMITS, ConverterOptions, ConvertSpec
        from worker.pipeline.emulatorboot import BootCheckPlan
        from worker.pipeline.reuse import convert_reusing

        o = build.converter_options

        def strings(key: str) -> tuple[str, ...]:
            value = o.get(key) or []
            return tuple(str(v) for v in value) if isinstance(value, list) else ()

        spec = ConvertSpec(
            input_ref=build.input_image_name,
            output_ref=build.output_image_name,
            input_credentials=_registry_credentials(creds_in),  # type: ignore[arg-type]
            output_credentials=_registry_credentials(creds_out),  # type: ignore[arg-type]
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
            ),
            cpu_count=build.cpu_count,
            mem_size_mib=build.mem_size,
            insecure_registries=self.settings.insecure_registries,
            signing_key=self.settings.signing_key,
            signing_cert=self.settings.signing_cert,
            ca_bundle=self.settings.ca_bundle,
        )
        cache = self.settings.state_dir / "cache"
        cache.mkdir(parents=True, exist_ok=True)
        boot_check = BootCheckPlan.from_settings(self.settings) if self.settings.boot_check else False
        # The account owns the cached conversion: a reused layer is only ever mounted from its own pushes.
        result = convert_reusing(
            spec, scratch=scratch, blobs_dir=self.settings.blobs_dir, cache_dir=cache,
            on_stage=lambda stage, progress: on_stage(getattr(stage, "name", str(stage)), progress),
            should_cancel=should_cancel, boot_check=boot_check, runtime_dir=self.settings.runtime_dir,
            output_base=self.settings.output_base_image,
            output_compression=self.settings.output_compression,
            limits=replace(DEFAULT_LIMITS, max_total_bytes=self.settings.max_image_bytes),
            owner=str(build.account_id), build_id=str(build.id), cache_max_bytes=self.settings.cache_max_bytes)
        m = result.measurements
        return Outcome(
            input_digest=str(result.input_digest), output_digest=str(result.output_digest),
            output_size=int(result.output_size), eif_size=int(result.eif_size), eif_sha256=str(result.eif_sha256),
            pcr0=_hex(m.pcr0) or "", pcr1=_hex(m.pcr1) or "", pcr2=_hex(m.pcr2) or "", pcr8=_hex(m.pcr8),
            exposed_ports=tuple((int(p), str(proto)) for p, proto in result.exposed_ports),
            warnings=tuple(str(w) for w in result.warnings), docker_version=result.docker_version,
            mem_size=int(result.mem_size_mib), boot_check=result.boot_check, reused_from=result.reused_from,
        )
