"""The CLI's local commands: convert an image here, inspect and verify EIFs, boot-check, fetch an EIF."""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from common.errors import NitroconvError

if TYPE_CHECKING:
    from common.settings import Settings
    from worker.pipeline.emulatorboot import BootCheckPlan
    from worker.pipeline.host import ConversionHost


def _settings() -> Settings:
    """The host's settings: the CLI runs the service's pipeline with the service's configuration, its flags first."""
    from common.settings import Settings

    return Settings.from_env(os.environ)


class _Progress:
    """A progress bar on a terminal's stderr; silent when stderr is a file or pipe (logs stay clean)."""

    def __init__(self, stream: TextIO) -> None:
        self._bar = None
        if stream.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=1000, file=stream, bar_format="{desc:<10} {bar} {percentage:3.0f}% {elapsed}",
                             leave=True)

    def __call__(self, stage: object, progress: float) -> None:
        if self._bar is None:
            return
        self._bar.set_description_str(str(getattr(stage, "value", stage)).lower())
        self._bar.n = int(min(max(progress, 0.0), 1.0) * 1000)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()


def _network(text: str) -> dict[str, object]:
    from common.enclave.network import parse_request
    from common.errors import InvalidOptions

    try:
        return parse_request(json.loads(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    except InvalidOptions as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def cmd_convert_local(args: argparse.Namespace) -> int:
    from worker.pipeline.reuse import convert_reusing
    from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

    progress = _Progress(sys.stderr)
    try:
        settings = _settings()
        spec = ConvertSpec(
            input_ref=args.input,
            output_ref=args.output,
            input_credentials=settings.input_credentials,
            output_credentials=settings.output_credentials,
            options=ConverterOptions(
                entrypoint=tuple(args.entrypoint or ()),
                entrypoint_args=tuple(args.entrypoint_args or ()),
                env_vars=tuple(args.env or ()),
                debug=args.debug,
                add_ccm_ca_certificates=args.ca_bundle is not None,
                network=args.network,
            ),
            cpu_count=args.cpu_count,
            mem_size_mib=args.mem_size,
            reuse=not args.no_reuse,
        )
        host = _host(args, settings)
        with tempfile.TemporaryDirectory(prefix="nitroconv-", dir=args.scratch) as scratch:
            result = convert_reusing(spec, host, Progress(progress), Workspace(Path(scratch), eif_out=args.eif_out))
    except NitroconvError as exc:
        progress.close()
        print(f"nitroconv: {exc.code}: {exc.message} (input {args.input})", file=sys.stderr)
        boot = exc.details.get("boot_check")
        if isinstance(boot, dict):
            _print_boot_check(boot, sys.stderr)
        return 1
    progress.close()
    # stdout stays nitro-cli's measurements JSON; the boot check asked for is reported on stderr.
    if result.boot_check is not None:
        _print_boot_check(result.boot_check, sys.stderr)
    for warning in result.warnings:
        print(f"nitroconv: warning: {warning}", file=sys.stderr)
    if result.reused_from is not None:
        print(f"nitroconv: note: reused the conversion of {result.reused_from} (--no-reuse converts afresh)",
              file=sys.stderr)
    print(json.dumps(result.measurements.to_nitro_cli(), indent=2))
    return 0


def _host(args: argparse.Namespace, settings: Settings) -> ConversionHost:
    """The service's host as the settings make it, with what the command line says instead.

    Registries are reached over plain HTTP or on private addresses only when --insecure-registry names them
    (the service's default allows its own development registry). A local conversion is signed, given a CA bundle
    or boot-checked only when its flags ask: the service's signing identity is not the user's."""
    from worker.pipeline.host import ConversionHost

    return replace(
        ConversionHost.from_settings(settings),
        blobs_dir=args.blobs or settings.blobs_dir,
        runtime_dir=args.runtime or settings.runtime_dir,
        insecure_registries=frozenset(args.insecure_registry or ()),
        signing_key=args.signing_key,
        signing_cert=args.signing_cert,
        ca_bundle=args.ca_bundle,
        output_base=settings.output_base_image if args.output_base is None else args.output_base,
        boot_check=_boot_plan(settings, args.boot_check_timeout, args.boot_check_mode) if args.boot_check else None,
    )


def _boot_plan(settings: Settings, timeout: float, mode: str | None) -> BootCheckPlan:
    """The settings' boot check plan with this timeout, in `mode` when one is given."""
    from worker.pipeline.emulatorboot import BootCheckPlan

    plan = BootCheckPlan.from_settings(settings, timeout=timeout)
    return plan if mode is None else replace(plan, mode=mode)


def _print_boot_check(boot: dict[str, object], stream: TextIO) -> None:
    verdict = "ok" if boot.get("ok") else "FAILED"
    # Not prefixed `nitroconv:`: that line is the one error line a failed run prints.
    print(f"boot check {verdict} in {boot.get('seconds')}s: {boot.get('reason')}", file=stream)
    mode = str(boot.get("mode") or "plain")
    if boot.get("fallback_reason"):
        mode += f" (fallback: {boot.get('fallback_reason')})"
    heartbeat = {True: "received", False: "MISSING", None: "n/a"}.get(boot.get("heartbeat"))  # type: ignore[call-overload]
    print(f"  mode {mode}; heartbeat {heartbeat}", file=stream)
    pcrs = boot.get("pcrs")
    for name, value in sorted(pcrs.items()) if isinstance(pcrs, dict) else []:
        print(f"  {name} {value} (emulator)", file=stream)
    lines = boot.get("program_output") if boot.get("ok") else boot.get("console_tail")
    for line in lines if isinstance(lines, list) else []:
        print(f"  | {line}", file=stream)


def cmd_describe_eif(args: argparse.Namespace) -> int:
    from common.enclave.reader import describe_eif

    print(json.dumps(describe_eif(args.eif), indent=2))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`describe-eif`'s output, then strict: a bad CRC or signature, or an unexpected PCR, fails (exit 1)."""
    from common.enclave.reader import describe_eif
    from common.errors import EifCheckFailed

    described = describe_eif(args.eif)  # structural defects raise InvalidEif here
    print(json.dumps(described, indent=2))
    problems = []
    if described.get("CheckCRC") is not True:
        problems.append("CRC mismatch (the file is corrupted or was altered)")
    if described.get("IsSigned") and described.get("SignatureCheck") is not True:
        problems.append("the signature does not verify against PCR0 and the signing certificate")
    measurements = described.get("Measurements")
    registers = measurements if isinstance(measurements, dict) else {}
    for index, expected in sorted(dict(args.expect_pcr or ()).items()):
        actual = registers.get(f"PCR{index}")
        if actual != expected:
            problems.append(f"PCR{index} is {actual or 'absent'}, expected {expected}")
    if problems:
        raise EifCheckFailed(f"{args.eif}: " + "; ".join(problems), details={"problems": problems})
    return 0


def _expected_pcr(value: str) -> tuple[int, str]:
    index, sep, digest = value.partition("=")
    if not sep or index not in {"0", "1", "2", "3", "4", "8"} or len(digest) != 96 or \
            any(c not in "0123456789abcdef" for c in digest.lower()):
        raise argparse.ArgumentTypeError("expected N=HEX with N in 0,1,2,3,4,8 and 96 hex digits (SHA-384)")
    return int(index), digest.lower()


def cmd_boot_check(args: argparse.Namespace) -> int:
    """The pipeline's boot check on a file: the PCRs expected are the EIF's own (as `describe-eif`
    computes them) unless `--expect-pcr` says otherwise. The result's JSON on stdout; exit 1 on failure."""
    from common.enclave.reader import read_eif
    from worker.pipeline.emulatorboot import expected_registers, run_boot_check

    expected = expected_registers(read_eif(args.eif).measurements.registers())
    expected.update({f"PCR{index}": digest for index, digest in args.expect_pcr or ()})
    plan = _boot_plan(_settings(), args.timeout, args.mode)
    result = run_boot_check(args.eif, plan=plan, expected=expected)
    print(json.dumps(result.to_json(), indent=2))
    if not result.ok:
        error = result.error_code
        print(f"nitroconv: {error}: boot check failed: {result.reason} ({args.eif})", file=sys.stderr)
    return 0 if result.ok else 1


def cmd_fetch_eif(args: argparse.Namespace) -> int:
    from worker.pipeline.outputimage import fetch_eif

    insecure = frozenset(args.insecure_registry or ())
    digest = fetch_eif(args.image, args.out, credentials=_settings().input_credentials, insecure_registries=insecure)
    print(f"{args.out} (sha256:{digest})")
    return 0


def cmd_run_local(args: argparse.Namespace) -> int:
    from common.settings import get_settings
    from worker.emulator.runlocal import RunLocalRequest, run_local

    req = RunLocalRequest(target=args.target, env=args.env or [], args=args.args, cpu_count=args.cpu_count,
                          mem_size=args.mem_size, console=args.console,
                          insecure_registries=frozenset(args.insecure_registry or ()), publish=args.publish or [])
    settings = get_settings()
    return run_local(req, settings, credentials=settings.input_credentials)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Mount the local commands (no service needed) on the `nitroconv` command's subparsers."""
    conv = sub.add_parser("convert-local", help="convert an image here, without the service")
    conv.add_argument("--input", required=True, help="image reference, or docker-daemon:NAME for a local engine")
    conv.add_argument("--output", required=True, help="where to push the converted image")
    conv.add_argument("--entrypoint", nargs="+", action="extend", metavar="ARG", help="replaces ENTRYPOINT")
    conv.add_argument("--entrypoint-args", nargs="+", action="extend", metavar="ARG", help="replaces CMD")
    conv.add_argument("--env", nargs="+", action="extend", metavar="K=V", help="added after the image's ENV")
    conv.add_argument("--network", type=_network, metavar="JSON",
                      help='converter_options.network, e.g. \'{"ingress": [8080], "egress": {"mode": "none"}}\'')
    conv.add_argument("--cpu-count", type=int, default=2)
    conv.add_argument("--mem-size", type=int, metavar="MIB",
                      help="enclave memory, at least 4x the EIF (default: that minimum rounded up to 256 MiB)")
    conv.add_argument("--blobs", type=Path, help="kernel/cmdline/init/nsm.ko dir (default $NITROCONV_BLOBS_DIR)")
    conv.add_argument("--runtime", type=Path,
                      help="dir of the exec shim built by `make runtime` (default $NITROCONV_RUNTIME_DIR)")
    conv.add_argument("--eif-out", type=Path, help="also keep the EIF here")
    conv.add_argument("--insecure-registry", nargs="+", action="extend", metavar="HOST",
                      help="host:port reachable over plain HTTP or on a private address")
    conv.add_argument("--scratch", type=Path, help="scratch parent dir (default the system temp dir)")
    conv.add_argument("--signing-key", type=Path, metavar="PEM",
                      help="EC (P-256/384/521) private key: sign the EIF, which adds PCR8 (with --signing-cert)")
    conv.add_argument("--signing-cert", type=Path, metavar="PEM", help="the signing key's X.509 certificate")
    conv.add_argument("--ca-bundle", type=Path, metavar="PEM",
                      help="append these CA certificates to the image's trust store (add_ccm_ca_certificates)")
    conv.add_argument("--debug", action="store_true",
                      help="a debug-mode enclave (console attached; attests all-zero PCRs)")
    conv.add_argument("--boot-check", action="store_true",
                      help="boot the EIF under QEMU before pushing; push nothing unless its entrypoint starts")
    conv.add_argument("--boot-check-timeout", type=float, default=120.0, metavar="SECONDS")
    conv.add_argument("--boot-check-mode", choices=("auto", "emulator", "plain"),
                      help="emulator: QEMU's nitro-enclave machine (PCRs, heartbeat); plain: -kernel/-initrd "
                           "(default $NITROCONV_BOOT_CHECK_MODE, else auto: the emulator when installed)")
    conv.add_argument("--output-base", metavar="IMAGE",
                      help="registry image to layer the output on, e.g. one with nitro-cli for /enclave/run "
                           "(default $NITROCONV_OUTPUT_BASE_IMAGE; empty: none)")
    conv.add_argument("--no-reuse", action="store_true",
                      help="convert afresh even when the same input, options and blobs were converted before")
    conv.set_defaults(func=cmd_convert_local)

    desc = sub.add_parser("describe-eif", help="print what `nitro-cli describe-eif` prints")
    desc.add_argument("eif", type=Path)
    desc.set_defaults(func=cmd_describe_eif)

    verify = sub.add_parser("verify", help="print the EIF's PCRs like describe-eif; exit 1 on any CRC, "
                                           "structure or signature error, or an --expect-pcr mismatch")
    verify.add_argument("eif", type=Path)
    verify.add_argument("--expect-pcr", type=_expected_pcr, action="append", metavar="N=HEX",
                        help="also require PCR N to equal HEX (repeatable)")
    verify.set_defaults(func=cmd_verify)

    boot = sub.add_parser("boot-check", help="boot an EIF under QEMU and check that its entrypoint starts "
                                             "(in the emulator: and that its PCRs and heartbeat are right)")
    boot.add_argument("eif", type=Path)
    boot.add_argument("--timeout", type=float, default=120.0)
    boot.add_argument("--mode", choices=("auto", "emulator", "plain"),
                      help="default $NITROCONV_BOOT_CHECK_MODE, else auto (the emulator when installed)")
    boot.add_argument("--expect-pcr", type=_expected_pcr, action="append", metavar="N=HEX",
                      help="hold the emulator's PCR N to HEX instead of the EIF's own (repeatable)")
    boot.set_defaults(func=cmd_boot_check)

    fetch = sub.add_parser("fetch-eif", help="download /enclave/app.eif from a converted image")
    fetch.add_argument("image", help="the converted (output) image reference")
    fetch.add_argument("--out", type=Path, required=True)
    fetch.add_argument("--insecure-registry", nargs="+", action="extend", metavar="HOST")
    fetch.set_defaults(func=cmd_fetch_eif)

    run_local = sub.add_parser(
        "run-local", help="run a converted enclave here, in the emulator (QEMU nitro-enclave + vsock), with "
                          "the parent side of /enclave/run attached; exits with the program's status")
    run_local.add_argument("target", metavar="EIF|IMAGE", help="an .eif file, or a converted (output) image")
    run_local.add_argument("--env", action="append", metavar="K=V",
                           help="a run-time value (served only for names on the build's mutable_env_vars)")
    run_local.add_argument("--cpu-count", type=int, metavar="N")
    run_local.add_argument("--mem-size", type=int, metavar="MIB")
    run_local.add_argument("--console", action="store_true", help="show the whole console, kernel and init too")
    run_local.add_argument("--publish", "-p", action="append", metavar="[IP:]HOSTPORT:PORT",
                           help="serve the enclave's published PORT on IP:HOSTPORT here (IP 127.0.0.1 unless "
                                "given; HOSTPORT 0 picks a free one, the launcher prints it)")
    run_local.add_argument("--insecure-registry", nargs="+", action="extend", metavar="HOST")
    run_local.add_argument("--args", nargs=argparse.REMAINDER, default=[], metavar="ARG",
                           help="the program's extra arguments (last; only with allow_cmdline_args)")
    run_local.set_defaults(func=cmd_run_local)
