"""How the enclave starts the image's program: Docker's ENTRYPOINT/CMD/ENV rules plus the converter's overrides."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from common.errors import InvalidOptions, NoCommand

# Docker adds this PATH when the image's config has none (daemon/oci defaults); the enclave must see the same.
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


@dataclass(frozen=True)
class LaunchSpec:
    """What the init execs: argv and environment in order, and the image's WORKDIR and USER."""

    argv: tuple[str, ...]
    env: tuple[str, ...]
    workdir: str
    user: str


def _check_line(kind: str, value: str) -> str:
    # /cmd and /env hold one item per line (EIF.md §5.3); a newline or NUL would silently split or cut an item.
    if "\n" in value or "\0" in value:
        raise InvalidOptions(f"{kind} item contains a newline or NUL: {value!r}", details={"field": kind})
    return value


def parse_env(entries: Sequence[str], *, field: str) -> list[tuple[str, str]]:
    """Split `K=V` items; a missing `=` or an empty name is an error naming the field."""
    pairs = []
    for item in entries:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidOptions(f"{field}: expected NAME=VALUE, got {item!r}", details={"field": field})
        pairs.append((_check_line(field, name), _check_line(field, value)))
    return pairs


def merge_env(*layers: Sequence[tuple[str, str]]) -> tuple[str, ...]:
    """Later layers win; a name keeps the position of its first appearance, as Docker's env merge does."""
    merged: dict[str, str] = {}
    for layer in layers:
        for name, value in layer:
            merged[name] = value
    return tuple(f"{k}={v}" for k, v in merged.items())


def launch_spec(
    config: Mapping[str, object],
    *,
    entrypoint: Sequence[str] = (),
    entrypoint_args: Sequence[str] = (),
    env_vars: Sequence[str] = (),
) -> LaunchSpec:
    """Docker's rules: an overridden ENTRYPOINT drops the image's CMD; argv is ENTRYPOINT + CMD.

    `config` is the `config` object of an OCI/Docker image configuration (Entrypoint, Cmd, Env, WorkingDir, User).
    """
    image_entrypoint = _str_list(config.get("Entrypoint"), "Entrypoint")
    image_cmd = _str_list(config.get("Cmd"), "Cmd")
    if entrypoint:
        argv = [*entrypoint, *entrypoint_args]
    else:
        argv = [*image_entrypoint, *(entrypoint_args or image_cmd)]
    if not argv:
        raise NoCommand("the image has no ENTRYPOINT or CMD and the request gives no entrypoint")
    for arg in argv:
        _check_line("argv", arg)
    image_env = parse_env(_str_list(config.get("Env"), "Env"), field="Env")
    if not any(name == "PATH" for name, _ in image_env):
        image_env.insert(0, ("PATH", DEFAULT_PATH.partition("=")[2]))
    env = merge_env(image_env, parse_env(env_vars, field="env_vars"))
    workdir = config.get("WorkingDir") or "/"
    user = config.get("User") or ""
    if not isinstance(workdir, str) or not isinstance(user, str):
        raise InvalidOptions("image config WorkingDir/User must be strings")
    return LaunchSpec(tuple(argv), env, workdir, user)


def _str_list(value: object, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidOptions(f"image config {field} must be a list of strings", details={"field": field})
    return list(value)


def cmd_file(spec: LaunchSpec) -> bytes:
    """The `/cmd` file of the app ramdisk: one argv item per line."""
    return "".join(f"{a}\n" for a in spec.argv).encode()


def env_file(spec: LaunchSpec) -> bytes:
    """The `/env` file of the app ramdisk: one NAME=VALUE per line."""
    return "".join(f"{e}\n" for e in spec.env).encode()
