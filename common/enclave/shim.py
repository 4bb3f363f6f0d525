"""The exec shim's place in the rootfs and its command line (the contract of worker/runtime/shim.c)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

from common.enclave.launch import LaunchSpec
from common.errors import InvalidOptions

# The converter owns this directory of the app rootfs; an image's own `/.nitroconv` is replaced.
SHIM_DIR = ".nitroconv"
SHIM_NAME = "shim"
SHIM_PATH = f"/{SHIM_DIR}/{SHIM_NAME}"
# The converter's in-enclave daemons: files of these names in the runtime dir, shipped beside the shim (so
# measured in PCR2) and started by the exec shim before the program (worker/runtime/netup.h).
# attestd serves attestation documents on 127.0.0.1:1300 (worker/runtime/attestd.c).
DAEMONS: tuple[str, ...] = ("attestd",)


@dataclass(frozen=True)
class ShimOptions:
    """What the shim applies before it execs the program; all of it is measured in PCR2."""

    workdir: str = "/"
    user: str = ""
    # NAME=DEFAULT items: the allow-list of run-time environment names, each with its default.
    mutable_env: tuple[str, ...] = ()
    allow_args: bool = False


def _item(kind: str, value: str) -> str:
    # /cmd holds one item per line (EIF.md §5.3): a newline or NUL would split or cut the shim's options.
    if "\n" in value or "\0" in value:
        raise InvalidOptions(f"{kind} contains a newline or NUL: {value!r}", details={"field": kind})
    return value


def shim_argv(options: ShimOptions, argv: Sequence[str]) -> tuple[str, ...]:
    """`/.nitroconv/shim <options> -- <argv>`: every option a separate item, so no value is ever parsed as an option."""
    items = [SHIM_PATH, "--workdir", _item("WorkingDir", options.workdir or "/")]
    if options.user:
        items += ["--user", _item("User", options.user)]
    for entry in options.mutable_env:
        name, sep, _ = entry.partition("=")
        if not sep or not name:
            raise InvalidOptions(f"mutable_env_vars: expected NAME=VALUE, got {entry!r}",
                                 details={"field": "mutable_env_vars"})
        items += ["--mutable", _item("mutable_env_vars", entry)]
    if options.allow_args:
        items.append("--allow-args")
    return (*items, "--", *argv)


def through_shim(spec: LaunchSpec, *, mutable_env: Sequence[str] = (), allow_args: bool = False) -> LaunchSpec:
    """The launch spec whose argv starts the shim, which applies WORKDIR, USER and run-time values, then execs `spec`."""
    options = ShimOptions(workdir=spec.workdir, user=spec.user, mutable_env=tuple(mutable_env),
                          allow_args=allow_args)
    return replace(spec, argv=shim_argv(options, spec.argv))
