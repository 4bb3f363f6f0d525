"""The service's HTTP client and its CLI commands (`nitroconv login/apps/convert/builds/tasks`), requests only.

Exit statuses of every `nitroconv` command (also in README, "CLI exit statuses"):

    0  success (for `convert --wait`: the conversion SUCCEEDED)
    1  failure: the conversion FAILED or was CANCELLED, the service answered an error, the EIF is invalid
    2  usage: bad arguments or option values (argparse's own status)
    3  the service could not be reached
    4  `--wait` timed out before the conversion ended (it may still finish: `builds get --wait`)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import requests

from common.errors import NitroconvError, ServiceUnreachable, WaitTimedOut
from common.options import JAVA_MODES

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4


class ApiError(NitroconvError):
    """A non-2xx answer of the service, carrying its envelope's code."""


class UsageError(NitroconvError):
    """Arguments argparse accepted but that cannot form a request (exit status 2)."""

    code = "usage"


def exit_status(exc: NitroconvError) -> int:
    """The documented exit status for an error that ends a command."""
    if isinstance(exc, ServiceUnreachable):
        return EXIT_UNREACHABLE
    if isinstance(exc, WaitTimedOut):
        return EXIT_TIMEOUT
    if isinstance(exc, UsageError):
        return EXIT_USAGE
    return EXIT_FAILED


JsonObject = dict[str, object]


@dataclass(frozen=True)
class Client:
    base_url: str
    token: str | None = None
    timeout: float = 30.0

    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        headers.update(extra or {})
        return headers

    def call(self, method: str, path: str, *, body: object = None, params: Mapping[str, object] | None = None,
             headers: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None,
             timeout: float | None = None) -> JsonObject:
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        try:
            resp = requests.request(method, self.base_url.rstrip("/") + path, json=body, params=query,
                                    headers=self._headers(headers), auth=auth, timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            raise ServiceUnreachable(f"cannot reach {self.base_url}: {type(exc).__name__}") from None
        if resp.status_code == 204:
            return {}
        try:
            data = resp.json()
        except ValueError:
            if resp.status_code in (502, 503, 504):  # a proxy or load balancer with no service behind it
                raise ServiceUnreachable(f"{self.base_url} answered HTTP {resp.status_code}") from None
            raise ApiError(f"HTTP {resp.status_code} without JSON", code="bad_response") from None
        if resp.status_code >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            error = error if isinstance(error, dict) else {}
            details = error.get("details")
            raise ApiError(str(error.get("message", resp.reason)), code=str(error.get("code", "http_error")),
                           details=details if isinstance(details, dict) else {})
        if not isinstance(data, dict):
            raise ApiError("unexpected response shape", code="bad_response")
        return data

    # --- resources --------------------------------------------------------------------------------
    def login(self, email: str, password: str) -> JsonObject:
        return self.call("POST", "/v1/sys/auth", auth=(email, password))

    def create_app(self, body: Mapping[str, object]) -> JsonObject:
        return self.call("POST", "/v1/apps", body=dict(body))

    def list_apps(self, *, limit: int = 100, offset: int = 0, name: str | None = None) -> JsonObject:
        return self.call("GET", "/v1/apps", params={"limit": limit, "offset": offset, "name": name})

    def convert(self, request: Mapping[str, object], *, idempotency_key: str | None = None) -> JsonObject:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.call("POST", "/v1/builds/convert-app/nitro-enclaves", body=dict(request), headers=headers)

    def build(self, build_id: str) -> JsonObject:
        return self.call("GET", f"/v1/builds/{build_id}")

    def list_builds(self, *, limit: int = 100, offset: int = 0, status: str | None = None,
                    app_id: str | None = None) -> JsonObject:
        return self.call("GET", "/v1/builds", params={"limit": limit, "offset": offset, "status": status,
                                                      "app_id": app_id})

    def delete_build(self, build_id: str) -> JsonObject:
        return self.call("DELETE", f"/v1/builds/{build_id}")

    def list_tasks(self, *, limit: int = 100, offset: int = 0, status: str | None = None,
                   build_id: str | None = None) -> JsonObject:
        return self.call("GET", "/v1/tasks", params={"limit": limit, "offset": offset, "status": status,
                                                     "build_id": build_id})

    def decide(self, task_id: str, status: str, reason: str | None = None) -> JsonObject:
        body: JsonObject = {"status": status}
        if reason:
            body["denial_reason"] = reason
        return self.call("PATCH", f"/v1/tasks/{task_id}", body=body)

    def wait(self, build_id: str, *, out: TextIO | None = None, poll: float = 1.0,
             timeout: float = 3600.0) -> JsonObject:
        """Poll until the conversion ends; a progress bar (state and progress) is drawn when `out` is a terminal."""
        stream = sys.stderr if out is None else out
        bar = None
        if stream.isatty():
            from tqdm import tqdm

            bar = tqdm(total=1000, file=stream, ncols=_columns(stream),
                       bar_format="{desc:<10} {bar} {percentage:3.0f}% {elapsed}")
        deadline = time.monotonic() + timeout
        try:
            while True:
                build = self.build(build_id)
                conversion = _obj(build.get("conversion"))
                if bar is not None:
                    bar.set_description_str(str(conversion.get("state", "")).lower())
                    bar.n = int(float(str(conversion.get("progress", 0.0))) * 1000)
                    bar.refresh()
                if conversion.get("state") in TERMINAL:
                    return build
                if time.monotonic() > deadline:
                    raise WaitTimedOut(f"build {build_id} still {conversion.get('state')} after {timeout:g}s")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()


def _columns(stream: TextIO) -> int:
    """The terminal's width; 80 when it reports none (a fresh pty, a serial console)."""
    try:
        return os.get_terminal_size(stream.fileno()).columns or 80
    except (OSError, ValueError):
        return 80


def _obj(value: object) -> JsonObject:
    return value if isinstance(value, dict) else {}


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
    conv, status = _obj(build.get("conversion")), _obj(build.get("status"))
    request = _obj(conv.get("request"))
    src, dst = _obj(request.get("input_image")), _obj(request.get("output_image"))
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
    error = _obj(conv.get("error"))
    if error:
        lines.append(f"error:      {error.get('code')}: {error.get('message')}")
    nitro = _obj(_obj(build.get("attributes")).get("nitro_enclave"))
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
    conv = _obj(build.get("conversion"))
    state = conv.get("state")
    if state == "SUCCEEDED":
        return EXIT_OK
    error = _obj(conv.get("error"))
    code = error.get("code") or ("cancelled" if state == "CANCELLED" else "conversion_failed")
    message = error.get("message") or f"conversion {str(state).lower()}"
    print(f"nitroconv: {code}: {message} (build {build.get('build_id')})", file=sys.stderr)
    return EXIT_FAILED


# --- CLI ----------------------------------------------------------------------------------------
def _session_file() -> Path:
    return Path(os.environ.get("NITROCONV_CLIENT_CONFIG", Path.home() / ".config" / "nitroconv" / "session.json"))


def _default_url() -> str:
    return os.environ.get("NITROCONV_URL") or f"http://{os.environ.get('NITROCONV_API_ADDR', '127.0.0.1:8080')}"


def _client(args: argparse.Namespace) -> Client:
    url, token = args.url, os.environ.get("NITROCONV_TOKEN")
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
    info = _obj(data.get("session_info"))
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
    items = [_obj(i) for i in page.get("items") or []]  # type: ignore[attr-defined]
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


def conversion_request(args: argparse.Namespace) -> JsonObject:
    """The POST body for `nitroconv convert`'s options: the API's request, option for option."""
    converter: JsonObject = {k: v for k, v in {
        "entrypoint": args.entrypoint, "entrypoint_args": args.entrypoint_args, "env_vars": args.env,
        "mutable_env_vars": args.mutable_env, "java_mode": args.java_mode}.items() if v is not None}
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
    for b in (_obj(i) for i in page.get("items") or []):  # type: ignore[attr-defined]
        conv = _obj(b.get("conversion"))
        rows.append((b.get("build_id"), b.get("app_name"), conv.get("state"),
                     f"{round(float(str(conv.get('progress', 0))) * 100)}%", _obj(b.get("status")).get("status"),
                     _obj(b.get("docker_info")).get("docker_image_name")))
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
    build = _client(args).delete_build(args.build_id)
    if args.json:
        _print_json(build)
    else:
        state = _obj(build.get("conversion")).get("state")
        print(f"{args.build_id} {'cancelled' if state == 'CANCELLED' else 'cancel requested'}")
    return EXIT_OK


def cmd_task_list(args: argparse.Namespace) -> int:
    page = _client(args).list_tasks(limit=args.limit, offset=args.offset, status=args.status,
                                    build_id=args.build_id)
    if args.json:
        _print_json(page)
        return EXIT_OK
    items = [_obj(i) for i in page.get("items") or []]  # type: ignore[attr-defined]
    _table([(t.get("task_id"), t.get("build_id"), _obj(t.get("status")).get("status"),
             _obj(t.get("requester")).get("user_name")) for t in items],
           ("TASK_ID", "BUILD_ID", "STATUS", "REQUESTER"))
    return EXIT_OK


def cmd_task_decide(args: argparse.Namespace) -> int:
    status = "APPROVED" if args.action == "approve" else "DENIED"
    task = _client(args).decide(args.task_id, status, getattr(args, "reason", None))
    if args.json:
        _print_json(task)
    else:
        print(f"{task.get('task_id')} {_obj(task.get('status')).get('status')} (build {task.get('build_id')})")
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
    delete = builds.add_parser("delete", parents=[common], help="cancel a build (a running one stops between steps)")
    delete.add_argument("build_id")
    delete.set_defaults(func=cmd_build_delete)

    tasks = sub.add_parser("tasks", help="approve or deny builds").add_subparsers(dest="tasks_command", required=True)
    tlist = tasks.add_parser("list", parents=[common], help="list approval tasks")
    tlist.add_argument("--status", choices=("INPROGRESS", "SUCCESS", "DENIED"))
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
