"""What a build's egress mode adds to the enclave (NETDESIGN): the egress daemon in the app ramdisk (the contract
of worker/runtime/egressd.c) and, in proxy mode, the proxy variables in the program's environment."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from common.enclave.network import DEFAULT_EGRESS_MODE
from common.enclave.shim import SHIM_DIR

# Next to the exec shim, in the converter's own directory of the rootfs; the exec shim starts it (worker/runtime/netup.h).
EGRESSD_NAME = "egressd"
EGRESSD_PATH = f"/{SHIM_DIR}/{EGRESSD_NAME}"
# The parent's side, beside the launcher in the output image (/enclave/egress; the launcher spawns it).
EGRESS_SERVICE_NAME = "egress"
PROXY_URL = "http://127.0.0.1:3128"
NO_PROXY = "localhost,127.0.0.1"


def egress_mode(network: Mapping[str, Any] | None) -> str:
    """`none`, `proxy` or `transparent` from the normalised policy (common/enclave/network.py); the default
    when there is none."""
    egress = (network or {}).get("egress")
    mode = egress.get("mode") if isinstance(egress, Mapping) else None
    return mode if isinstance(mode, str) else DEFAULT_EGRESS_MODE


def ships_egressd(network: Mapping[str, Any] | None) -> bool:
    """Mode `none` needs no daemon: without it nothing in the enclave can reach the parent's egress service."""
    return egress_mode(network) != "none"


def proxy_env(network: Mapping[str, Any] | None) -> tuple[str, ...]:
    """`NAME=VALUE` items for the program's environment: in proxy mode the variables programs honour (both
    spellings: curl reads only the lower-case http_proxy, Go and Python either), else none. They go before the
    request's env_vars, so a request that sets one itself keeps its value."""
    if egress_mode(network) != "proxy":
        return ()
    names = ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy")
    return (*(f"{name}={PROXY_URL}" for name in names), f"NO_PROXY={NO_PROXY}", f"no_proxy={NO_PROXY}")

