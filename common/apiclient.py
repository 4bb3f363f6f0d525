"""The service's HTTP client and its CLI commands (`nitroconv login/apps/convert/builds/tasks`), requests only."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import requests

from common.errors import NitroconvError

TERMINAL = {"SUCCEEDED", "FAILED", "CANCELLED"}


class ApiError(NitroconvError):
    """A non-2xx answer of the service, carrying its envelope's code."""


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

    def call(self, method: str, path: str, *, body: object = None, params: Mapping[str, str] | None = None,
             headers: Mapping[str, str] | None = None, auth: tuple[str, str] | None = None,
             timeout: float | None = None) -> dict[str, object]:
        try:
            resp = requests.request(method, self.base_url.rstrip("/") + path, json=body, params=params,
                                    headers=self._headers(headers), auth=auth, timeout=timeout or self.timeout)
        except requests.RequestException as exc:
            raise ApiError(f"cannot reach {self.base_url}: {type(exc).__name__}", code="unreachable") from None
        if resp.status_code == 204:
            return {}
        try:
            data = resp.json()
        except ValueError:
            raise ApiError(f"HTTP {resp.status_code} without JSON", code="bad_response") from None
        if resp.status_code >= 400:
            error = data.get("error", {}) if isinstance(data, dict) else {}
            raise ApiError(str(error.get("message", resp.reason)), code=str(error.get("code", "http_error")),
                           details=error.get("details") or {})
        if not isinstance(data, dict):
            raise ApiError("unexpected response shape", code="bad_response")
        return data

    def login(self, email: str, password: str) -> dict[str, object]:
        return self.call("POST", "/v1/sys/auth", auth=(email, password))

    def convert(self, request: Mapping[str, object], *, idempotency_key: str | None = None) -> dict[str, object]:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        return self.call("POST", "/v1/builds/convert-app/nitro-enclaves", body=request, headers=headers)

    def build(self, build_id: str) -> dict[str, object]:
        return self.call("GET", f"/v1/builds/{build_id}")

    def decide(self, task_id: str, status: str, reason: str | None = None) -> dict[str, object]:
        body: dict[str, object] = {"status": status}
        if reason:
            body["denial_reason"] = reason
        return self.call("PATCH", f"/v1/tasks/{task_id}", body=body)

    def wait(self, build_id: str, *, out: TextIO = sys.stderr, poll: float = 1.0,
             timeout: float = 3600.0) -> dict[str, object]:
        """Poll until the conversion ends, drawing a progress bar on a terminal."""
        bar = None
        if out.isatty():
            from tqdm import tqdm

            bar = tqdm(total=1000, file=out, bar_format="{desc:<10} {bar} {percentage:3.0f}% {elapsed}")
        deadline = time.monotonic() + timeout
        try:
            while True:
                build = self.build(build_id)
                conversion = build["conversion"]
                assert isinstance(conversion, dict)
                if bar is not None:
                    bar.set_description_str(str(conversion["state"]).lower())
                    bar.n = int(float(conversion["progress"]) * 1000)
                    bar.refresh()
                if conversion["state"] in TERMINAL:
                    return build
                if time.monotonic() > deadline:
                    raise ApiError("timed out waiting for the conversion", code="timeout")
                time.sleep(poll)
        finally:
            if bar is not None:
                bar.close()


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
    except (OSError, ValueError):
        pass
    return Client(url or _default_url(), token)


def _print(data: object) -> None:
    print(json.dumps(data, indent=2, sort_keys=True))


def cmd_login(args: argparse.Namespace) -> int:
    password = os.environ.get(args.password_env) if args.password_env else None
    if password is None:
        import getpass

        password = getpass.getpass("password: ")
    client = Client(args.url or _default_url())
    data = client.login(args.email, password)
    path = _session_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # the token is a credential
    with os.fdopen(fd, "w") as out:
        json.dump({"url": client.base_url, "access_token": data["access_token"]}, out)
    info = data["session_info"]
    assert isinstance(info, dict)
    print(f"signed in as {info['user_email']} (account {info['acct_id']}, {info['role']})", file=sys.stderr)
    return 0


def cmd_app_create(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"name": args.name, "auto_approve": args.auto_approve}
    _print(_client(args).call("POST", "/v1/apps", body=body))
    return 0


def _auth(prefix: str, args: argparse.Namespace) -> dict[str, object] | None:
    user = getattr(args, f"{prefix}_user")
    password_env = getattr(args, f"{prefix}_password_env")
    if user is None and password_env is None:
        return None
    # Passwords come from the environment, never argv (which `ps` shows to every user).
    return {"username": user or "", "password": os.environ.get(password_env, "") if password_env else ""}


def cmd_convert(args: argparse.Namespace) -> int:
    request: dict[str, object] = {
        "app_id": args.app_id,
        "input_image": {"name": args.input, "auth_config": _auth("input", args)},
        "output_image": {"name": args.output, "auth_config": _auth("output", args)},
        "converter_options": {k: v for k, v in {
            "entrypoint": args.entrypoint, "entrypoint_args": args.entrypoint_args, "env_vars": args.env,
            "mutable_env_vars": args.mutable_env, "debug": args.debug or None,
            "allow_cmdline_args": args.allow_cmdline_args or None}.items() if v},
    }
    options = {"cpu_count": args.cpu_count, "mem_size": args.mem_size}
    client = _client(args)
    build = client.convert({"request": request, "nitro_enclaves_options": options},
                           idempotency_key=args.idempotency_key)
    if args.no_wait:
        _print(build)
        return 0
    build = client.wait(str(build["build_id"]))
    _print(build)
    conversion = build["conversion"]
    assert isinstance(conversion, dict)
    return 0 if conversion["state"] == "SUCCEEDED" else 1


def cmd_build_get(args: argparse.Namespace) -> int:
    client = _client(args)
    _print(client.wait(args.build_id) if args.wait else client.build(args.build_id))
    return 0


def cmd_task_decide(args: argparse.Namespace) -> int:
    status = "APPROVED" if args.action == "approve" else "DENIED"
    _print(_client(args).decide(args.task_id, status, getattr(args, "reason", None)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    """Mount the service commands on the `nitroconv` command's subparsers."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--url", help="service URL (default: saved by login, or $NITROCONV_URL)")

    login = sub.add_parser("login", parents=[common], help="sign in to the service and save the token")
    login.add_argument("--email", required=True)
    login.add_argument("--password-env", metavar="VAR", help="read the password from this variable")
    login.set_defaults(func=cmd_login)

    apps = sub.add_parser("apps", help="manage apps").add_subparsers(dest="apps_command", required=True)
    create = apps.add_parser("create", parents=[common])
    create.add_argument("name")
    create.add_argument("--auto-approve", action="store_true")
    create.set_defaults(func=cmd_app_create)

    conv = sub.add_parser("convert", parents=[common], help="submit a conversion and follow it")
    conv.add_argument("--app-id", required=True)
    conv.add_argument("--input", required=True)
    conv.add_argument("--output", required=True)
    for side in ("input", "output"):
        conv.add_argument(f"--{side}-user")
        conv.add_argument(f"--{side}-password-env", metavar="VAR")
    conv.add_argument("--entrypoint", nargs="+", action="extend", metavar="ARG")
    conv.add_argument("--entrypoint-args", nargs="+", action="extend", metavar="ARG")
    conv.add_argument("--env", nargs="+", action="extend", metavar="K=V")
    conv.add_argument("--mutable-env", nargs="+", action="extend", metavar="K=V")
    conv.add_argument("--debug", action="store_true")
    conv.add_argument("--allow-cmdline-args", action="store_true")
    conv.add_argument("--cpu-count", type=int, default=2)
    conv.add_argument("--mem-size", type=int, default=1024, metavar="MIB")
    conv.add_argument("--idempotency-key")
    conv.add_argument("--no-wait", action="store_true", help="print the queued Build and return")
    conv.set_defaults(func=cmd_convert)

    builds = sub.add_parser("builds", help="read builds").add_subparsers(dest="builds_command", required=True)
    get = builds.add_parser("get", parents=[common])
    get.add_argument("build_id")
    get.add_argument("--wait", action="store_true", help="follow until the conversion ends")
    get.set_defaults(func=cmd_build_get)

    tasks = sub.add_parser("tasks", help="approve or deny builds").add_subparsers(dest="tasks_command", required=True)
    approve = tasks.add_parser("approve", parents=[common])
    approve.add_argument("task_id")
    approve.set_defaults(func=cmd_task_decide, action="approve")
    deny = tasks.add_parser("deny", parents=[common])
    deny.add_argument("task_id")
    deny.add_argument("--reason")
    deny.set_defaults(func=cmd_task_decide, action="deny")
