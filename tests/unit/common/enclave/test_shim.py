"""The exec shim's command line (common/enclave/shim.py) and its entries in the app ramdisk (common/enclave/ramdisk.py)."""
from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from common.enclave.cpio import CpioHeader, iter_cpio
from common.enclave.launch import LaunchSpec, cmd_file
from common.enclave.ramdisk import GENERATED_MTIME, app_archive
from common.enclave.shim import SHIM_PATH, ShimOptions, shim_argv, through_shim
from common.errors import InvalidOptions
from common.image.filetree import BytesContent, Tree

SPEC = LaunchSpec(argv=("python3", "-m", "app"), env=("PATH=/usr/local/bin:/usr/bin:/bin",), workdir="/srv",
                  user="app:staff")


def members(archive) -> dict[str, tuple[CpioHeader, bytes]]:  # noqa: ANN001
    buf = io.BytesIO()
    archive.write_to(buf)
    buf.seek(0)
    return {h.name.decode(): (h, d) for h, d in iter_cpio(buf)}


def test_shim_argv_puts_options_before_the_separator_and_argv_after() -> None:
    argv = shim_argv(ShimOptions(workdir="/srv", user="1000:1000", mutable_env=("LOG=info", "MODE="),
                                 allow_args=True), ["app", "--flag"])
    assert argv == (SHIM_PATH, "--workdir", "/srv", "--user", "1000:1000", "--mutable", "LOG=info",
                    "--mutable", "MODE=", "--allow-args", "--", "app", "--flag")


def test_shim_argv_defaults_are_root_dir_no_user_no_allow_list() -> None:
    assert shim_argv(ShimOptions(), ["/bin/true"]) == (SHIM_PATH, "--workdir", "/", "--", "/bin/true")
    # An empty WorkingDir is Docker's "/".
    assert shim_argv(ShimOptions(workdir=""), ["x"])[:3] == (SHIM_PATH, "--workdir", "/")


def test_shim_argv_keeps_metacharacters_and_option_lookalikes_as_data() -> None:
    hostile = ["--allow-args", "--user", "0", "$(reboot)", "a b;c", "'\"", "--", ""]
    argv = shim_argv(ShimOptions(workdir="/dir with space/$HOME", user="--allow-args",
                                 mutable_env=("X=--; rm -rf /",)), hostile)
    sep = argv.index("--")
    assert argv[sep + 1:] == tuple(hostile)
    # Each option value is the item right after its option: never split, never taken as an option.
    assert argv[:sep] == (SHIM_PATH, "--workdir", "/dir with space/$HOME", "--user", "--allow-args",
                          "--mutable", "X=--; rm -rf /")


@pytest.mark.parametrize("options", [
    ShimOptions(workdir="/a\nb"),
    ShimOptions(user="app\n--allow-args"),
    ShimOptions(mutable_env=("X=1\nY",)),
    ShimOptions(mutable_env=("X=a\0b",)),
])
def test_shim_argv_refuses_newline_or_nul_in_an_option(options: ShimOptions) -> None:
    with pytest.raises(InvalidOptions):
        shim_argv(options, ["x"])


@pytest.mark.parametrize("entry", ["NOEQUALS", "=value"])
def test_shim_argv_refuses_malformed_mutable_entry(entry: str) -> None:
    with pytest.raises(InvalidOptions) as err:
        shim_argv(ShimOptions(mutable_env=(entry,)), ["x"])
    assert err.value.details["field"] == "mutable_env_vars"


def test_shim_through_shim_takes_workdir_and_user_from_the_spec() -> None:
    launched = through_shim(SPEC, mutable_env=["LOG=info"], allow_args=False)
    assert launched.argv == (SHIM_PATH, "--workdir", "/srv", "--user", "app:staff", "--mutable", "LOG=info",
                             "--", "python3", "-m", "app")
    assert launched.env == SPEC.env  # the defaults travel as options; the shim applies them
    assert cmd_file(launched).decode().splitlines() == list(launched.argv)


def _tree() -> Tree:
    tree = Tree()
    tree.add_dir(b"bin")
    tree.add_file(b"bin/app", BytesContent(b"app"), mode=0o755)
    return tree


def test_shim_ramdisk_adds_dot_nitroconv_shim_root_owned_0755(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.write_bytes(b"\x7fELF shim")
    got = members(app_archive(_tree(), through_shim(SPEC), shim=shim))
    d, _ = got["rootfs/.nitroconv"]
    f, data = got["rootfs/.nitroconv/shim"]
    assert d.mode == stat.S_IFDIR | 0o755 and f.mode == stat.S_IFREG | 0o755
    assert (d.uid, d.gid, f.uid, f.gid, f.mtime) == (0, 0, 0, 0, GENERATED_MTIME)
    assert data == b"\x7fELF shim"
    assert got["cmd"][1].decode().splitlines()[0] == SHIM_PATH
    assert "rootfs/.nitroconv" not in members(app_archive(_tree(), SPEC))


def test_shim_ramdisk_replaces_the_images_own_dot_nitroconv(tmp_path: Path) -> None:
    shim = tmp_path / "shim"
    shim.write_bytes(b"ours")
    tree = _tree()
    tree.add_symlink(b".nitroconv", b"/bin")  # a planted link would put the shim's path onto the image's files
    got = members(app_archive(tree, through_shim(SPEC), shim=shim))
    assert stat.S_ISDIR(got["rootfs/.nitroconv"][0].mode)
    assert got["rootfs/.nitroconv/shim"][1] == b"ours"
    assert [n for n in got if n.startswith("rootfs/.nitroconv")] == ["rootfs/.nitroconv", "rootfs/.nitroconv/shim"]

    nested = _tree()
    nested.add_dir(b".nitroconv/sub")
    nested.add_file(b".nitroconv/shim", BytesContent(b"theirs"), mode=0o4755)
    got = members(app_archive(nested, through_shim(SPEC), shim=shim))
    assert got["rootfs/.nitroconv/shim"] == (got["rootfs/.nitroconv/shim"][0], b"ours")
    assert got["rootfs/.nitroconv/shim"][0].mode == stat.S_IFREG | 0o755
    assert "rootfs/.nitroconv/sub" not in got


def test_shim_ramdisk_puts_the_converters_extras_beside_it(tmp_path: Path) -> None:
    shim, netd = tmp_path / "shim", tmp_path / "netd"
    shim.write_bytes(b"shim")
    netd.write_bytes(b"netd")
    tree = _tree()
    tree.add_file(b".nitroconv/network.json", BytesContent(b"theirs"))
    got = members(app_archive(tree, through_shim(SPEC), shim=shim,
                              extras={"network.json": b'{"x":1}\n', "netd": netd, "netd.conf": b"80 0\n"}))
    names = [n for n in got if n.startswith("rootfs/.nitroconv")]
    assert names == ["rootfs/.nitroconv", "rootfs/.nitroconv/netd", "rootfs/.nitroconv/netd.conf",
                     "rootfs/.nitroconv/network.json", "rootfs/.nitroconv/shim"]
    assert got["rootfs/.nitroconv/network.json"] == (got["rootfs/.nitroconv/network.json"][0], b'{"x":1}\n')
    assert got["rootfs/.nitroconv/network.json"][0].mode == stat.S_IFREG | 0o644
    assert got["rootfs/.nitroconv/netd"][0].mode == stat.S_IFREG | 0o755
    with pytest.raises(ValueError):
        app_archive(_tree(), SPEC, extras={"network.json": b"{}"})
