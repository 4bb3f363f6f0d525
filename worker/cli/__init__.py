"""The `nitroconv` command: local conversion, EIF inspection and boot checks (service client commands mount here too)."""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

from common.errors import NitroconvError
from worker.cli import local


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitroconv", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    local.register(sub)
    for register in _extra_commands():
        register(sub)
    return parser


def _extra_commands() -> list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]]:
    try:
        from worker.cli.service import register
    except ImportError:  # the service client is optional in a minimal install
        return []
    from worker.cli import attestation

    return [register, attestation.register]


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except NitroconvError as exc:
        print(f"nitroconv: {exc.code}: {exc.message}", file=sys.stderr)
        return _exit_status(exc)
    return code


def _exit_status(exc: NitroconvError) -> int:
    """The exit statuses documented in `worker.cli.client` (1 unless the client knows better)."""
    try:
        from worker.cli.client import exit_status
    except ImportError:
        return 1
    return exit_status(exc)

