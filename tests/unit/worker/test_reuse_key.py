"""The conversion cache key: equal for equal conversions, different for anything that changes the output."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from common.registry.reference import parse_reference
from worker.pipeline.convert import ConverterOptions, ConvertSpec
from worker.pipeline.reuse import KEY_BLOB_FILES, RUNTIME_FILES, _precheck, conversion_key

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


def key(dirs: tuple[Path, Path], spec: ConvertSpec = SPEC, *, digest: str = DIGEST,
        ref: str = "reg.example:5000/team/app:1", **kw: object) -> str | None:
    args: dict[str, object] = {"output_base": "", "boot_check": False, "limits": None, "extra": {}}
    args.update(kw)
    return conversion_key(spec, parse_reference(ref), digest, blobs_dir=dirs[0], runtime_dir=dirs[1],
                          **args)  # type: ignore[arg-type]


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
    lambda d: key(d, boot_check=True),
])
def test_anything_that_changes_the_output_changes_the_key(dirs, change) -> None:  # noqa: ANN001
    assert change(dirs) != key(dirs)


@pytest.mark.parametrize("name", [*KEY_BLOB_FILES, *RUNTIME_FILES])
def test_every_blob_and_runtime_file_counts(dirs, name: str) -> None:  # noqa: ANN001
    before = key(dirs)
    path = (dirs[0] if name in KEY_BLOB_FILES else dirs[1]) / name
    path.write_bytes(path.read_bytes() + b"!")
    assert key(dirs) != before


def test_a_missing_file_or_a_bad_option_skips_reuse_and_leaves_the_error_to_convert(dirs) -> None:  # noqa: ANN001
    blobs, runtime = dirs
    assert _precheck(SPEC, blobs, runtime, "")
    assert not _precheck(replace(SPEC, options=ConverterOptions(env_vars=("no-equals",))), blobs, runtime, "")
    assert not _precheck(replace(SPEC, output_ref="reg.example:5000/team/out@" + DIGEST), blobs, runtime, "")
    (runtime / "shim").unlink()
    assert not _precheck(SPEC, blobs, runtime, "")
    assert key(dirs) is None
