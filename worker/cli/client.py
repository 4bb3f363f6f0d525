"""The service's HTTP client (requests only), and the exit statuses of every `nitroconv` command.

Exit statuses of every `nitroconv` command (also in README, "CLI exit statuses"):

    0  success (for `convert --wait`: the conversion SUCCEEDED)
    1  failure: the conversion FAILED or was CANCELLED, the service answered an error, the EIF is invalid
    2  usage: bad arguments or option values (argparse's own status)
    3  the service could not be reached
    4  `--wait` timed out before the conversion ended (it may still finish: `builds get --wait`)
"""
from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TextIO

import requests

from common.errors import NitroconvError, ServiceUnreachable, WaitTimedOut

TERMINAL = frozenset({"SUCCEEDED", "FAILED", "CANCELLED"})

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_TIMEOUT = 0, 1, 2, 3, 4
# How long `--wait` keeps polling a service that answered before and then stopped answering: an API
# restarted or redeployed under a waiting client (the conversion goes on in the workers meanwhile).
UNREACHABLE_GRACE_SECONDS = 120.0


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

    def cancel_build(self, build_id: str) -> JsonObject:
        return self.call("POST", f"/v1/builds/{build_id}/cancel")

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
        answered, unreachable_since = False, 0.0
        try:
            while True:
                try:
                    build = self.build(build_id)
                except ServiceUnreachable:
                    # Never reached (a wrong URL): at once. Lost after it answered: retried for a while.
                    now = time.monotonic()
                    unreachable_since = unreachable_since or now
                    if not answered or now - unreachable_since > UNREACHABLE_GRACE_SECONDS or now > deadline:
                        raise
                    time.sleep(poll)
                    continue
                answered, unreachable_since = True, 0.0
                conversion = as_object(build.get("conversion"))
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


def as_object(value: object) -> JsonObject:
    return value if isinstance(value, dict) else {}
