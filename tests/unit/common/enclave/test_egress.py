"""What the egress mode adds to a build (common/enclave/egress.py): the proxy variables, the daemon in the ramdisk."""
from __future__ import annotations

import io
import stat
from pathlib import Path

import pytest

from common.enclave.cpio import iter_cpio
from common.enclave.egress import EGRESSD_PATH, PROXY_URL, egress_mode, proxy_env, ships_egressd
from common.enclave.launch import LaunchSpec, launch_spec
from common.enclave.ramdisk import app_archive
from common.image.filetree import BytesContent, Tree


def policy(mode: str) -> dict[str, object]:
    return {"egress": {"mode": mode, "allow": [{"cidr": "0.0.0.0/0"}], "deny": []}, "hostname": "app",
            "ingress": []}


def test_egress_mode_defaults_to_transparent_when_the_request_says_nothing() -> None:
    assert egress_mode(None) == "transparent"
    assert egress_mode({"hostname": "app"}) == "transparent"
    assert [egress_mode(policy(m)) for m in ("none", "proxy", "transparent")] == ["none", "proxy", "transparent"]
    assert ships_egressd(None) and ships_egressd(policy("proxy")) and not ships_egressd(policy("none"))


@pytest.mark.parametrize("mode", ["none", "transparent"])
def test_egress_proxy_env_only_in_proxy_mode(mode: str) -> None:
    assert proxy_env(policy(mode)) == ()


def test_egress_proxy_env_in_proxy_mode_and_the_request_still_wins() -> None:
    items = proxy_env(policy("proxy"))
    env = dict(item.split("=", 1) for item in items)
    assert env == {"HTTP_PROXY": PROXY_URL, "HTTPS_PROXY": PROXY_URL, "http_proxy": PROXY_URL,
                   "https_proxy": PROXY_URL, "NO_PROXY": "localhost,127.0.0.1", "no_proxy": "localhost,127.0.0.1"}
    # As convert() passes them: before the request's env_vars, after the image's Env.
    spec = launch_spec({"Cmd": ["app"], "Env": ["HTTP_PROXY=http://image-proxy:1", "A=1"]},
                       env_vars=(*items, "https_proxy=http://mine:8"))
    got = dict(item.split("=", 1) for item in spec.env)
    assert got["HTTP_PROXY"] == PROXY_URL and got["https_proxy"] == "http://mine:8" and got["A"] == "1"


def test_egress_daemon_goes_beside_the_shim(tmp_path: Path) -> None:
    shim, egressd = tmp_path / "shim", tmp_path / "egressd"
    shim.write_bytes(b"\x7fELF shim")
    egressd.write_bytes(b"\x7fELF egressd")
    tree = Tree()
    tree.add_file(b"bin/app", BytesContent(b"app"), mode=0o755)
    spec = LaunchSpec(argv=("/bin/app",), env=(), workdir="/", user="")

    def members(**kwargs: dict[str, Path]) -> dict[str, tuple[int, bytes]]:
        buf = io.BytesIO()
        app_archive(tree, spec, shim=shim, **kwargs).write_to(buf)
        return {h.name.decode(): (h.mode, d) for h, d in iter_cpio(io.BytesIO(buf.getvalue()))}

    got = members(extras={"egressd": egressd})
    assert got[f"rootfs{EGRESSD_PATH}"] == (stat.S_IFREG | 0o755, b"\x7fELF egressd")
    assert f"rootfs{EGRESSD_PATH}" not in members()

