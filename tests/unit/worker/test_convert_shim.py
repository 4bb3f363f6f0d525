"""The converter's side of the exec shim (worker/pipeline/convert.py): argv[0] warnings and finding the shim."""
from __future__ import annotations

from pathlib import Path

import pytest

from common.enclave.launch import LaunchSpec
from common.errors import InvalidBlobs
from common.image.filetree import BytesContent, Tree
from worker.pipeline.convert import _shim, command_warnings, default_runtime_dir


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


def test_convert_runtime_dir_from_env_then_state_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("NITROCONV_RUNTIME_DIR", str(tmp_path / "rt"))
    assert default_runtime_dir() == tmp_path / "rt"
    monkeypatch.delenv("NITROCONV_RUNTIME_DIR")
    monkeypatch.setenv("NITROCONV_STATE_DIR", str(tmp_path / "state"))
    assert default_runtime_dir() == tmp_path / "state" / "runtime"


def test_convert_missing_shim_is_invalid_blobs_naming_make_runtime(tmp_path: Path) -> None:
    with pytest.raises(InvalidBlobs) as err:
        _shim(tmp_path)
    assert "make runtime" in err.value.message and err.value.details["missing"] == ["shim"]
    (tmp_path / "shim").write_bytes(b"\x7fELF")
    assert _shim(tmp_path) == tmp_path / "shim"
