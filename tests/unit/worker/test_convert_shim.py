"""The converter's side of the exec shim (worker/pipeline/stages.py, host.py): argv[0] warnings, finding the shim."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.enclave.launch import LaunchSpec
from common.errors import InvalidBlobs
from common.image.filetree import BytesContent, Tree
from common.settings import Settings
from worker.pipeline.host import ConversionHost
from worker.pipeline.stages import command_warnings


def _tree() -> Tree:
    tree = Tree()
    tree.add_dir(b"usr/local/bin")
    tree.add_file(b"usr/local/bin/app", BytesContent(b"#!"), mode=0o755)
    tree.add_file(b"usr/local/bin/data", BytesContent(b"x"), mode=0o644)
    tree.add_symlink(b"usr/local/bin/alias", b"app")
    return tree


def _spec(argv0: str, path: str = "/usr/bin:/usr/local/bin") -> LaunchSpec:
    return LaunchSpec((argv0,), (f"PATH={path}",), "/", "")


@pytest.mark.parametrize("argv0", ["app", "alias", "/usr/local/bin/app", "./relative/app"])
def test_convert_command_warnings_none_when_the_shim_will_find_it(argv0: str) -> None:
    assert command_warnings(_tree(), _spec(argv0)) == ()


@pytest.mark.parametrize(("argv0", "path"), [
    ("app", "/usr/bin"),            # not on the image's PATH
    ("data", "/usr/local/bin"),     # not executable
    ("bin", "/usr/local"),          # a directory
    ("/usr/local/bin/nope", "/usr/local/bin"),
])
def test_convert_command_warnings_when_argv0_cannot_start(argv0: str, path: str) -> None:
    (warning,) = command_warnings(_tree(), _spec(argv0, path))
    assert repr(argv0) in warning and "will fail to start it" in warning


def test_convert_host_dirs_from_the_settings(tmp_path: Path) -> None:
    host = ConversionHost.from_settings(Settings.from_env({"NITROCONV_RUNTIME_DIR": str(tmp_path / "rt")}))
    assert host.runtime_dir == tmp_path / "rt"
    host = ConversionHost.from_settings(Settings.from_env({"NITROCONV_STATE_DIR": str(tmp_path / "state")}))
    assert host.runtime_dir == tmp_path / "state" / "runtime"
    assert (host.blobs_dir, host.cache_dir) == (tmp_path / "state" / "blobs", tmp_path / "state" / "cache")


def test_convert_host_limits_and_format_are_the_settings(tmp_path: Path) -> None:
    host = ConversionHost.from_settings(Settings.from_env({
        "NITROCONV_MAX_IMAGE_BYTES": "12345", "NITROCONV_OUTPUT_COMPRESSION": "zstd", "NITROCONV_BOOT_CHECK": "1",
        "NITROCONV_BOOT_CHECK_MODE": "plain", "NITROCONV_CACHE_MAX_BYTES": "0"}))
    assert host.limits.max_total_bytes == 12345 and host.limits.max_path_bytes == 4096 - 1 - len("rootfs/")
    assert host.output_compression == "zstd" and host.cache_max_bytes == 0
    assert host.boot_check is not None and host.boot_check.mode == "plain"
    assert ConversionHost.from_settings(Settings()).boot_check is None


def test_convert_missing_shim_is_invalid_blobs_naming_make_runtime(tmp_path: Path) -> None:
    host = ConversionHost(blobs_dir=tmp_path, runtime_dir=tmp_path, cache_dir=tmp_path)
    with pytest.raises(InvalidBlobs) as err:
        host.shim()
    assert "make runtime" in err.value.message and err.value.details["missing"] == ["shim"]
    (tmp_path / "shim").write_bytes(b"\x7fELF")
    assert host.shim() == tmp_path / "shim"
