"""The conversion cache key: equal for equal conversions, different for anything that changes the output."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from common.errors import InvalidBlobs, InvalidOptions, InvalidReference
from common.registry.reference import parse_reference
from common.util.compression import Compression
from worker.pipeline.emulatorboot import BootCheckPlan
from worker.pipeline.host import RUNTIME_FILES, ConversionHost
from worker.pipeline.reuse import KEY_BLOB_FILES, conversion_key
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Workspace
from worker.pipeline.stages import prepare

DIGEST = "sha256:" + "ab" * 32


@pytest.fixture
def dirs(tmp_path: Path) -> tuple[Path, Path]:
    blobs, runtime = tmp_path / "blobs", tmp_path / "runtime"
    blobs.mkdir()
    runtime.mkdir()
    for name in KEY_BLOB_FILES:
        (blobs / name).write_bytes(f"blob {name}".encode())
    for name in RUNTIME_FILES:
        (runtime / name).write_bytes(f"runtime {name}".encode())
    return blobs, runtime


SPEC = ConvertSpec(input_ref="reg.example:5000/team/app:1", output_ref="reg.example:5000/team/out:1",
                   input_credentials=None, output_credentials=None,
                   options=ConverterOptions(env_vars=("A=1",)), cpu_count=2, mem_size_mib=None)


def host(dirs: tuple[Path, Path], **kw: object) -> ConversionHost:
    return ConversionHost(blobs_dir=dirs[0], runtime_dir=dirs[1], cache_dir=dirs[0].parent / "cache",
                          **kw)  # type: ignore[arg-type]


def key(dirs: tuple[Path, Path], spec: ConvertSpec = SPEC, *, digest: str = DIGEST,
        ref: str = "reg.example:5000/team/app:1", **kw: object) -> str | None:
    return conversion_key(spec, host(dirs, **kw), parse_reference(ref), digest)


def test_equal_conversions_have_equal_keys_and_the_output_name_does_not_count(dirs) -> None:  # noqa: ANN001
    base = key(dirs)
    assert base is not None and len(base) == 64
    assert key(dirs) == base
    assert key(dirs, replace(SPEC, output_ref="other.example/x/y:9")) == base
    assert key(dirs, ref="reg.example:5000/team/app:other-tag") == base  # the digest decides, not the tag


@pytest.mark.parametrize("change", [
    lambda d: key(d, digest="sha256:" + "cd" * 32),
    lambda d: key(d, ref="reg.example:5000/team/elsewhere:1"),  # the EIF's metadata names the repository
    lambda d: key(d, replace(SPEC, options=ConverterOptions(env_vars=("A=2",)))),
    lambda d: key(d, replace(SPEC, options=ConverterOptions(env_vars=("A=1",), debug=True))),
    lambda d: key(d, replace(SPEC, cpu_count=4)),
    lambda d: key(d, replace(SPEC, mem_size_mib=1024)),
    lambda d: key(d, output_base="reg.example:5000/base:1"),
    lambda d: key(d, boot_check=BootCheckPlan()),
    lambda d: key(d, boot_check=BootCheckPlan(mode="plain")) != key(d, boot_check=BootCheckPlan(mode="emulator")),
    lambda d: key(d, output_compression=Compression.ZSTD),
    lambda d: key(d, limits=replace(host(d).limits, max_total_bytes=1 << 20)),
])
def test_anything_that_changes_the_output_changes_the_key(dirs, change) -> None:  # noqa: ANN001
    assert change(dirs) not in (key(dirs), False)


def test_what_does_not_change_the_output_does_not_change_the_key(dirs) -> None:  # noqa: ANN001
    assert key(dirs, stream_push=False) == key(dirs, cache_max_bytes=1) == key(dirs)
    assert key(dirs, insecure_registries=frozenset({"reg.example:5000"})) == key(dirs)
    assert key(dirs, replace(SPEC, owner="account", build_id="b", reuse=False)) == key(dirs)


@pytest.mark.parametrize("name", [*KEY_BLOB_FILES, *RUNTIME_FILES])
def test_every_blob_and_runtime_file_counts(dirs, name: str) -> None:  # noqa: ANN001
    before = key(dirs)
    path = (dirs[0] if name in KEY_BLOB_FILES else dirs[1]) / name
    path.write_bytes(path.read_bytes() + b"!")
    assert key(dirs) != before


def test_a_missing_file_or_a_bad_option_fails_before_any_registry_is_asked(dirs, tmp_path: Path) -> None:  # noqa: ANN001
    """reuse and convert() share these checks (stages.prepare): the same errors, before any network I/O."""
    work = Workspace(tmp_path / "scratch")
    assert prepare(SPEC, host(dirs), work).output.repository == "team/out"
    with pytest.raises(InvalidOptions):
        prepare(replace(SPEC, options=ConverterOptions(env_vars=("no-equals",))), host(dirs), work)
    with pytest.raises(InvalidReference):
        prepare(replace(SPEC, output_ref="reg.example:5000/team/out@" + DIGEST), host(dirs), work)
    (dirs[1] / "shim").unlink()
    with pytest.raises(InvalidBlobs):
        prepare(SPEC, host(dirs), work)
    assert key(dirs) is None
    assert not work.scratch.exists()
