"""`nitroconv attestation verify`: check an enclave's attestation document here, against PCRs given on the command
line or read from a Build of the service (with the CLI's session)."""
from __future__ import annotations

import argparse
import base64
import binascii
import json
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509

from common.enclave.attestation import (
    DEFAULT_MAX_AGE,
    PCR_COUNT,
    PCR_SIZES,
    Expectations,
    build_pcrs,
    check,
    pinned_root,
)
from common.errors import BuildNotMeasured
from worker.cli.client import EXIT_OK, UsageError, as_object

_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/=\s]+")


def read_document(path: str) -> bytes:
    """The document's bytes from a file (`-`: stdin), raw CBOR or base64 text (a COSE_Sign1's first byte, 0x84 or
    0xd2, is never base64 text, so the two cannot be confused)."""
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if data and _BASE64_TEXT.fullmatch(data):
        try:
            return base64.b64decode(b"".join(data.split()), validate=True)
        except (binascii.Error, ValueError):
            raise UsageError(f"{path} looks like base64 text but does not decode") from None
    return data


def expected_pcr(value: str) -> tuple[int, bytes]:
    index, sep, digest = value.partition("=")
    try:
        number, raw = int(index), bytes.fromhex(digest)
    except ValueError:
        number, raw = -1, b""
    if not sep or not 0 <= number < PCR_COUNT or len(raw) not in PCR_SIZES:
        raise argparse.ArgumentTypeError(f"expected N=HEX with N in 0..{PCR_COUNT - 1} and 32, 48 or 64 bytes of hex")
    return number, raw


def _hex(value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected hexadecimal") from None


def _seconds(value: str) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < 1e9:
        raise argparse.ArgumentTypeError("expected a number of seconds >= 0")
    return seconds


def _root(args: argparse.Namespace) -> x509.Certificate | None:
    if args.root is None and args.root_sha256 is None:
        return None  # the pinned AWS Nitro Enclaves Root G1
    if args.root is None or args.root_sha256 is None:
        raise UsageError("--root and --root-sha256 go together: a root is trusted by its fingerprint")
    try:
        return pinned_root(Path(args.root).read_bytes(), args.root_sha256)
    except OSError as exc:
        raise UsageError(f"cannot read {args.root}: {exc.strerror}") from None
    except ValueError as exc:
        raise UsageError(f"--root: {exc}") from None


def _build_pcrs(args: argparse.Namespace) -> dict[int, bytes]:
    from worker.cli.service import _client  # the service client only when a Build is named

    build = _client(args).build(args.build)
    nitro = as_object(as_object(as_object(build.get("attributes")).get("eif")).get("nitro_enclave"))
    pcrs = build_pcrs({i: str(nitro[f"pcr{i}"]) if nitro.get(f"pcr{i}") else None for i in (0, 1, 2, 8)})
    if not pcrs:
        raise BuildNotMeasured(f"build {args.build} has no PCRs yet: its conversion has not succeeded")
    return pcrs


def summary(report: dict[str, object]) -> list[str]:
    """The lines printed without --json: the verdict, each step, each PCR, the warnings."""
    error = as_object(report.get("error"))
    lines = [f"verified:  {'yes' if report['verified'] else 'NO'}"
             + (f" ({error.get('code')}: {error.get('message')})" if error else ""),
             f"mode:      {report['mode']}"]
    for step, state in as_object(report.get("checks")).items():
        lines.append(f"  {step + ':':<18} {state}")
    for pcr in report.get("pcrs") or []:  # type: ignore[attr-defined]
        mark = "ok" if pcr["matched"] else "MISMATCH"
        lines.append(f"PCR{pcr['index']}: {mark:<8} expected {pcr['expected']}"
                     + ("" if pcr["matched"] else f", got {pcr['actual'] or 'nothing'}"))
    document = as_object(report.get("document"))
    if document:
        lines.append(f"module_id: {document.get('module_id')}  issued {document.get('timestamp')}")
    lines += [f"WARNING: {w}" for w in report.get("warnings") or []]  # type: ignore[attr-defined]
    return lines


def cmd_verify(args: argparse.Namespace) -> int:
    document = read_document(args.document)
    root = _root(args)
    pcrs = _build_pcrs(args) if args.build else dict(args.expect_pcr or ())
    expect = Expectations(pcrs=pcrs, nonce=args.nonce,
                          max_age=timedelta(seconds=args.max_age) if args.max_age else None,
                          allow_debug=args.allow_debug, emulator=args.emulator)
    report = check(document, expect, now=datetime.now(UTC), root=root)
    out = report.as_dict()
    print(json.dumps(out, indent=2, sort_keys=True) if args.json else "\n".join(summary(out)))
    if report.error is not None:
        raise report.error  # one line on stderr with its code, exit status 1
    return EXIT_OK


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Mount `nitroconv attestation …` on the `nitroconv` command's subparsers."""
    group = sub.add_parser("attestation", help="check Nitro Enclaves attestation documents").add_subparsers(
        dest="attestation_command", required=True)
    verify = group.add_parser(
        "verify", help="verify an attestation document: signature, chain to the AWS root, PCRs, nonce, age",
        description="Exit 0 when every check passed; 1 with `nitroconv: <code>: <message>` on stderr otherwise.")
    verify.add_argument("document", metavar="DOC", help="the document: a file of raw CBOR or base64 text, - for stdin")
    pcrs = verify.add_mutually_exclusive_group()
    pcrs.add_argument("--build", metavar="ID", help="expect this Build's PCR0/1/2 (and PCR8), read from the service")
    pcrs.add_argument("--expect-pcr", type=expected_pcr, action="append", metavar="N=HEX",
                      help="expect PCR N to be HEX (repeatable)")
    verify.add_argument("--nonce", type=_hex, metavar="HEX", help="the nonce the document must carry")
    verify.add_argument("--max-age", type=_seconds, default=DEFAULT_MAX_AGE.total_seconds(), metavar="S",
                        help="refuse a document older than S seconds (default %(default)g; 0: do not check)")
    verify.add_argument("--allow-debug", action="store_true",
                        help="accept a debug-mode enclave (all-zero PCRs, which are then not compared)")
    verify.add_argument("--emulator", action="store_true",
                        help="EMULATOR MODE: accept an emulated NSM's unsigned document, skipping ONLY the "
                             "signature and certificate chain checks")
    verify.add_argument("--root", metavar="PEM", help="trust this root instead of the pinned AWS Nitro Enclaves "
                                                      "Root G1 (e.g. another partition's); needs --root-sha256")
    verify.add_argument("--root-sha256", metavar="HEX", help="the SHA-256 of --root's DER: the pin it must match")
    verify.add_argument("--url", help="service URL for --build (default: saved by login, else $NITROCONV_URL)")
    verify.add_argument("--json", action="store_true", help="print the verification report as JSON")
    verify.set_defaults(func=cmd_verify)
