"""The CLI's service commands (`nitroconv login/apps/convert/builds/tasks`), over the HTTP client."""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from common.options import JAVA_MODES
from worker.cli.client import (
    EXIT_FAILED,
    EXIT_OK,
    Client,
    JsonObject,
    UsageError,
    as_object,
)

if TYPE_CHECKING:
    from common.settings import ClientSettings


# --- output -------------------------------------------------------------------------------------
def _print_json(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def _table(rows: Sequence[Sequence[object]], header: Sequence[str]) -> None:
    cells = [[str(c) for c in header], *[["-" if c is None else str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    for row in cells:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def build_summary(build: Mapping[str, object]) -> list[str]:
    """The lines `nitroconv builds get` prints: what a person checks first."""
    conv, status = as_object(build.get("conversion")), as_object(build.get("status"))
    request = as_object(conv.get("request"))
    src, dst = as_object(request.get("input_image")), as_object(request.get("output_image"))
    lines = [
        f"build_id:   {build.get('build_id')}",
        f"app:        {build.get('app_name')} ({build.get('app_id')})",
        f"conversion: {conv.get('state')} {round(float(str(conv.get('progress', 0))) * 100)}%"
        f" (attempts {conv.get('attempts')})",
        f"approval:   {status.get('status')}"
        + (f" (task {build['pending_task_id']})" if build.get("pending_task_id") else ""),
        f"input:      {src.get('name')}" + (f" @ {conv['input_digest']}" if conv.get("input_digest") else ""),
        f"output:     {dst.get('name')}" + (f" @ {conv['output_digest']}" if conv.get("output_digest") else ""),
    ]
    error = as_object(conv.get("error"))
    if error:
        lines.append(f"error:      {error.get('code')}: {error.get('message')}")
    nitro = as_object(as_object(as_object(build.get("attributes")).get("eif")).get("nitro_enclave"))
    for pcr in ("pcr0", "pcr1", "pcr2", "pcr8"):
        if nitro.get(pcr):
            lines.append(f"{pcr.upper()}:       {nitro[pcr]}")
    for warning in conv.get("warnings") or []:  # type: ignore[attr-defined]
        lines.append(f"warning:    {warning}")
    return lines


def _show_build(build: Mapping[str, object], as_json: bool) -> None:
    if as_json:
        _print_json(build)
    else:
        print("\n".join(build_summary(build)))


def _finished_status(build: Mapping[str, object]) -> int:
    """Exit status for a build `--wait` followed to its end; a failure gets the one error line on stderr."""
    conv = as_object(build.get("conversion"))
    state = conv.get("state")
    if state == "SUCCEEDED":
        return EXIT_OK
    error = as_object(conv.get("error"))
    code = error.get("code") or ("cancelled" if state == "CANCELLED" else "conversion_failed")
    message = error.get("message") or f"conversion {str(state).lower()}"
    print(f"nitroconv: {code}: {message} (build {build.get('build_id')})", file=sys.stderr)
    return EXIT_FAILED


# --- CLI ----------------------------------------------------------------------------------------
def _settings() -> ClientSettings:
    from common.settings import ClientSettings

    return ClientSettings.from_env(os.environ)


def _session_file() -> Path:
    return _settings().session_file


def _default_url() -> str:
    return _settings().url


def _client(args: argparse.Namespace) -> Client:
    url, token = args.url, _settings().token
    try:
        saved = json.loads(_session_file().read_text())
        url = url or saved.get("url")
        token = token or saved.get("access_token")
    except (OSError, ValueError, AttributeError):
        pass
    return Client(url or _default_url(), token)


def cmd_login(args: argparse.Namespace) -> int:
    password = os.environ.get(args.password_env) if args.password_env else None
    if args.password_env and password is None:
        raise UsageError(f"${args.password_env} is not set")
    if password is None:
        import getpass

        password = getpass.getpass("password: ")
    client = Client(args.url or _default_url())
    data = client.login(args.email, password)
    path = _session_file()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    # The token is a credential: created 0600 (and re-chmodded should an older, wider file exist).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as out:
        json.dump({"url": client.base_url, "access_token": data["access_token"]}, out)
    info = as_object(data.get("session_info"))
    print(f"signed in as {info.get('user_email')} (account {info.get('acct_id')}, {info.get('role')})",
          file=sys.stderr)
    return EXIT_OK


def cmd_app_create(args: argparse.Namespace) -> int:
    body: JsonObject = {"name": args.name, "auto_approve": args.auto_approve}
    if args.description is not None:
        body["description"] = args.description
    app = _client(args).create_app(body)
    if args.json:
        _print_json(app)
    else:
        print(app["app_id"])
    return EXIT_OK


def cmd_app_list(args: argparse.Namespace) -> int:
    page = _client(args).list_apps(limit=args.limit, offset=args.offset, name=args.name)
    if args.json:
        _print_json(page)
        return EXIT_OK
    items = [as_object(i) for i in page.get("items") or []]  # type: ignore[attr-defined]
    _table([(a.get("app_id"), a.get("name"), "yes" if a.get("auto_approve") else "no") for a in items],
           ("APP_ID", "NAME", "AUTO_APPROVE"))
    return EXIT_OK


def _auth(side: str, args: argparse.Namespace) -> JsonObject | None:
    user = getattr(args, f"{side}_user")
    password_env = getattr(args, f"{side}_password_env")
    if user is None and password_env is None:
        return None
    # Passwords come from the environment, never argv (which `ps` shows to every user).
    password = os.environ.get(password_env) if password_env else ""
    if password is None:
        raise UsageError(f"--{side}-password-env: ${password_env} is not set")
    return {"username": user or "", "password": password}


def _json_object(text: str) -> JsonObject:
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("must be a JSON object")
    return value


def conversion_request(args: argparse.Namespace) -> JsonObject:
    """The POST body for `nitroconv convert`'s options: the API's request, option for option."""
    converter: JsonObject = {k: v for k, v in {
        "entrypoint": args.entrypoint, "entrypoint_args": args.entrypoint_args, "env_vars": args.env,
        "mutable_env_vars": args.mutable_env, "java_mode": args.java_mode,
        "network": getattr(args, "network", None)}.items() if v is not None}
    for flag in ("debug", "allow_cmdline_args", "add_ccm_ca_certificates"):
        if getattr(args, flag):
            converter[flag] = True
    request: JsonObject = {
        "app_id": args.app_id,
        "input_image": {"name": args.input, "auth_config": _auth("input", args)},
        "output_image": {"name": args.output, "auth_config": _auth("output", args)},
        "converter_options": converter,
    }
    # Omitted sizes are the app's defaults, else 2 vCPUs and the smallest valid memory for the EIF.
    options = {k: v for k, v in {"cpu_count": args.cpu_count, "mem_size": args.mem_size,
                                 "enable_overlay_filesystem_persistence": args.overlay_persistence}.items()
               if v is not None}
    return {"request": request, "nitro_enclaves_options": options}


def cmd_convert(args: argparse.Namespace) -> int:
    client = _client(args)
    build = client.convert(conversion_request(args), idempotency_key=args.idempotency_key)
    if not args.wait:
        if args.json:
            _print_json(build)
        else:
            print(build["build_id"])
        return EXIT_OK
    build = client.wait(str(build["build_id"]), poll=args.poll, timeout=args.timeout)
    _show_build(build, args.json)
    return _finished_status(build)


def cmd_build_list(args: argparse.Namespace) -> int:
    page = _client(args).list_builds(limit=args.limit, offset=args.offset, status=args.status, app_id=args.app_id)
    if args.json:
        _print_json(page)
        return EXIT_OK
    rows = []
    for b in (as_object(i) for i in page.get("items") or []):  # type: ignore[attr-defined]
        conv = as_object(b.get("conversion"))
        rows.append((b.get("build_id"), b.get("app_name"), conv.get("state"),
                     f"{round(float(str(conv.get('progress', 0))) * 100)}%", as_object(b.get("status")).get("status"),
                     as_object(b.get("docker_info")).get("docker_image_name")))
    _table(rows, ("BUILD_ID", "APP", "CONVERSION", "PROGRESS", "APPROVAL", "OUTPUT"))
    return EXIT_OK


def cmd_build_get(args: argparse.Namespace) -> int:
    client = _client(args)
    if not args.wait:
        _show_build(client.build(args.build_id), args.json)
        return EXIT_OK
    build = client.wait(args.build_id, poll=args.poll, timeout=args.timeout)
    _show_build(build, args.json)
    return _finished_status(build)


def cmd_build_delete(args: argparse.Namespace) -> int:
    _client(args).delete_build(args.build_id)
    print(f"{args.build_id} deleted")
    return EXIT_OK


def cmd_build_cancel(args: argparse.Namespace) -> int:
    build = _client(args).cancel_build(args.build_id)
    if args.json:
        _print_json(build)
    else:
        state = as_object(build.get("conversion")).get("state")
        print(f"{args.build_id} {'cancelled' if state == 'CANCELLED' else 'cancel requested'}")
    return EXIT_OK


def cmd_task_list(args: argparse.Namespace) -> int:
    page = _client(args).list_tasks(limit=args.limit, offset=args.offset, status=args.status,
                                    build_id=args.build_id)
    if args.json:
        _print_json(page)
        return EXIT_OK
    items = [as_object(i) for i in page.get("items") or []]  # type: ignore[attr-defined]
    _table([(t.get("task_id"), t.get("build_id"), as_object(t.get("status")).get("status"),
             as_object(t.get("requester")).get("user_name")) for t in items],
           ("TASK_ID", "BUILD_ID", "STATUS", "REQUESTER"))
    return EXIT_OK


def cmd_task_decide(args: argparse.Namespace) -> int:
    status = "APPROVED" if args.action == "approve" else "DENIED"
    task = _client(args).decide(args.task_id, status, getattr(args, "reason", None))
    if args.json:
        _print_json(task)
    else:
        print(f"{task.get('task_id')} {as_object(task.get('status')).get('status')} (build {task.get('build_id')})")
    return EXIT_OK


def _wait_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="give up waiting after this long (exit status 4)")
    parser.add_argument("--poll", type=float, default=1.0, metavar="SECONDS", help=argparse.SUPPRESS)


def _page_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--offset", type=int, default=0)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Mount the service commands on the `nitroconv` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="service URL (default: saved by login, else $NITROCONV_URL)")
    common.add_argument("--json", action="store_true", help="print the service's JSON instead of a summary")

    login = sub.add_parser("login", parents=[common], help="sign in and cache the token (0600)")
    login.add_argument("--email", required=True)
    login.add_argument("--password-env", metavar="VAR", help="read the password from this variable")
    login.set_defaults(func=cmd_login)

    apps = sub.add_parser("apps", help="manage apps").add_subparsers(dest="apps_command", required=True)
    create = apps.add_parser("create", parents=[common], help="create an app; prints its id")
    create.add_argument("name")
    create.add_argument("--description")
    create.add_argument("--auto-approve", action="store_true", help="approve its successful builds automatically")
    create.set_defaults(func=cmd_app_create)
    alist = apps.add_parser("list", parents=[common], help="list the account's apps")
    alist.add_argument("--name", help="only the app with this name")
    _page_options(alist)
    alist.set_defaults(func=cmd_app_list)

    conv = sub.add_parser("convert", parents=[common], help="submit a conversion to the service")
    conv.add_argument("--app-id", required=True)
    conv.add_argument("--input", required=True, help="the image to convert")
    conv.add_argument("--output", required=True, help="where the worker pushes the converted image")
    for side in ("input", "output"):
        conv.add_argument(f"--{side}-user", metavar="USER", help=f"{side} registry user")
        conv.add_argument(f"--{side}-password-env", metavar="VAR", help=f"{side} registry password's variable")
    conv.add_argument("--entrypoint", nargs="+", action="extend", metavar="ARG", help="replaces ENTRYPOINT")
    conv.add_argument("--entrypoint-args", nargs="+", action="extend", metavar="ARG", help="replaces CMD")
    conv.add_argument("--env", nargs="+", action="extend", metavar="K=V", help="env_vars, after the image's ENV")
    conv.add_argument("--mutable-env", nargs="+", action="extend", metavar="K=V",
                      help="mutable_env_vars: defaults the parent may override at launch")
    conv.add_argument("--java-mode", choices=JAVA_MODES)
    conv.add_argument("--network", type=_json_object, metavar="JSON",
                      help='converter_options.network, e.g. \'{"ingress": [8080], "egress": {"mode": "none"}}\' '
                           "(the service checks it)")
    conv.add_argument("--debug", action="store_true", help="a debug-mode enclave (all-zero PCRs when attested)")
    conv.add_argument("--allow-cmdline-args", action="store_true")
    conv.add_argument("--add-ccm-ca-certificates", action="store_true",
                      help="append the service's CA bundle to the image's trust store")
    conv.add_argument("--cpu-count", type=int, help="default: the app's, else 2")
    conv.add_argument("--mem-size", type=int, metavar="MIB",
                      help="default: the app's, else 4x the EIF size rounded up to 256 MiB")
    conv.add_argument("--overlay-persistence", action=argparse.BooleanOptionalAction, default=None,
                      help="enable_overlay_filesystem_persistence")
    conv.add_argument("--idempotency-key", help="a retried submit with the same key returns the same build")
    conv.add_argument("--wait", action="store_true",
                      help="follow the conversion to its end (progress on a terminal's stderr); "
                           "exit 1 unless it SUCCEEDED")
    _wait_options(conv)
    conv.set_defaults(func=cmd_convert)

    builds = sub.add_parser("builds", help="read and cancel builds").add_subparsers(dest="builds_command",
                                                                                     required=True)
    blist = builds.add_parser("list", parents=[common], help="list builds, newest first")
    blist.add_argument("--status", choices=("PENDING", "WHITELISTED", "REJECTED"), help="approval status")
    blist.add_argument("--app-id")
    _page_options(blist)
    blist.set_defaults(func=cmd_build_list)
    get = builds.add_parser("get", parents=[common], help="show one build")
    get.add_argument("build_id")
    get.add_argument("--wait", action="store_true", help="follow until the conversion ends")
    _wait_options(get)
    get.set_defaults(func=cmd_build_get)
    cancel = builds.add_parser("cancel", parents=[common], help="cancel a build (a running one stops between steps)")
    cancel.add_argument("build_id")
    cancel.set_defaults(func=cmd_build_cancel)
    delete = builds.add_parser("delete", parents=[common], help="delete a build (cancelling its conversion first)")
    delete.add_argument("build_id")
    delete.set_defaults(func=cmd_build_delete)

    tasks = sub.add_parser("tasks", help="approve or deny builds").add_subparsers(dest="tasks_command", required=True)
    tlist = tasks.add_parser("list", parents=[common], help="list approval tasks")
    tlist.add_argument("--status", choices=("PENDING", "CLOSED", "INPROGRESS", "SUCCESS", "DENIED", "FAILED"),
                       help="PENDING (awaiting a decision), CLOSED (decided), or one exact status")
    tlist.add_argument("--build-id")
    _page_options(tlist)
    tlist.set_defaults(func=cmd_task_list)
    approve = tasks.add_parser("approve", parents=[common], help="approve a build's task (MANAGER)")
    approve.add_argument("task_id")
    approve.set_defaults(func=cmd_task_decide, action="approve")
    deny = tasks.add_parser("deny", parents=[common], help="deny a build's task (MANAGER)")
    deny.add_argument("task_id")
    deny.add_argument("--reason")
    deny.set_defaults(func=cmd_task_decide, action="deny")
