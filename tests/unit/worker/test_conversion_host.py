"""One ConversionHost from Settings for the engine and the CLI; the CLI's flags override it; stage reports."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import Cancelled
from common.settings import Settings
from common.util.compression import Compression
from worker.cli import build_parser
from worker.cli.local import _host
from worker.engine import PipelineEngine
from worker.pipeline.host import DEFAULT_LIMITS, ConversionHost
from worker.pipeline.spec import Progress, Stage

ENV = {"NITROCONV_MAX_IMAGE_BYTES": "4096", "NITROCONV_OUTPUT_COMPRESSION": "zstd", "NITROCONV_CACHE_MAX_BYTES": "7",
       "NITROCONV_OUTPUT_BASE_IMAGE": "reg.example/base:1", "NITROCONV_INSECURE_REGISTRIES": "reg.example",
       "NITROCONV_BOOT_CHECK_MODE": "plain"}


def _cli_host(tmp_path: Path, *argv: str) -> ConversionHost:
    settings = Settings.from_env({**ENV, "NITROCONV_STATE_DIR": str(tmp_path)})
    args = build_parser().parse_args(["convert-local", "--input", "a/b:1", "--output", "r.example/c:1", *argv])
    return _host(args, settings)


def test_the_engine_and_the_cli_build_the_same_host_from_the_same_settings(tmp_path: Path) -> None:
    settings = Settings.from_env({**ENV, "NITROCONV_STATE_DIR": str(tmp_path)})
    engine = PipelineEngine(settings).host
    assert PipelineEngine(settings).host is engine  # built once per process and settings
    cli = _cli_host(tmp_path, "--insecure-registry", "reg.example")
    assert cli == engine
    assert cli.limits.max_total_bytes == 4096 and cli.limits.max_path_bytes == DEFAULT_LIMITS.max_path_bytes
    assert (cli.output_compression, cli.cache_max_bytes, cli.output_base) == (Compression.ZSTD, 7, "reg.example/base:1")
    assert cli.cache_dir == tmp_path / "cache" and cli.blobs_dir == tmp_path / "blobs"


def test_the_cli_flags_override_the_settings(tmp_path: Path) -> None:
    host = _cli_host(tmp_path, "--blobs", "/b", "--runtime", "/r", "--output-base", "", "--boot-check",
                     "--boot-check-timeout", "30", "--signing-key", "/k.pem", "--signing-cert", "/c.pem")
    assert (host.blobs_dir, host.runtime_dir, host.output_base) == (Path("/b"), Path("/r"), "")
    assert host.insecure_registries == frozenset()  # only what --insecure-registry names
    assert host.boot_check is not None and (host.boot_check.mode, host.boot_check.timeout) == ("plain", 30.0)
    assert (host.signing_key, host.signing_cert) == (Path("/k.pem"), Path("/c.pem"))
    assert _cli_host(tmp_path, "--boot-check", "--boot-check-mode", "emulator").boot_check.mode == "emulator"  # type: ignore[union-attr]
    assert _cli_host(tmp_path).boot_check is None


def test_progress_reports_one_figure_across_stages_and_cancels_before_a_stage() -> None:
    seen: list[tuple[Stage, float]] = []
    cancel = [False]
    progress = Progress(lambda stage, done: seen.append((stage, done)), lambda: cancel[0])
    progress.enter(Stage.PULLING)
    progress.within(Stage.PULLING, 0.5)
    progress.enter(Stage.BUILDING)
    progress.within(Stage.BUILDING, 1.0)
    progress.finished()
    assert seen == [(Stage.PULLING, 0.0), (Stage.PULLING, 0.25), (Stage.BUILDING, 0.5), (Stage.BUILDING, 0.8),
                    (Stage.PUSHING, 1.0)]
    cancel[0] = True
    with pytest.raises(Cancelled, match="before measuring"):
        progress.enter(Stage.MEASURING)
    assert seen[-1] == (Stage.PUSHING, 1.0)
