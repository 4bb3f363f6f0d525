"""attestd (worker/runtime/attestd.c) over real sockets on this host, built by the pinned zig as its test build
(`attestd-test PORT NSM_DEVICE`: the shipped code, but a port of the test's and no loopback or privilege changes).

This host has no NSM, so the documents themselves are the emulator's test (tests/e2e/test_attestation_endpoint.py);
here: every refusal with its status and stable code, 503 without /dev/nsm, the size and time bounds, and that slow
or idle clients cannot keep others out."""
from __future__ import annotations

import json
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures.devblobs import RUNTIME_SOURCES, make

PATH = "/.well-known/nitroconv/attestation"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def attestd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    out = tmp_path_factory.mktemp("attestd")
    make(RUNTIME_SOURCES, f"OUT={out}", f"{out}/attestd-test")
    port = _free_port()
    proc = subprocess.Popen([str(out / "attestd-test"), str(port), str(out / "no-nsm")], stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert f"listening on 127.0.0.1:{port}, nsm absent" in line, line
        yield port
        assert proc.poll() is None, "attestd died during the tests"
    finally:
        proc.kill()
        proc.wait()


def exchange(port: int, request: bytes, timeout: float = 10.0) -> tuple[int, dict[str, str], bytes]:
    """Send the raw bytes, read until the server closes; the status, headers (lower-case names) and body."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *fields = head.decode("ascii").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (f.partition(":") for f in fields)}
    assert int(headers["content-length"]) == len(body)
    return int(status_line.split(" ")[1]), headers, body


def get(port: int, target: str, extra: str = "") -> tuple[int, dict[str, str], bytes]:
    return exchange(port, f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}\r\n".encode())


def code_of(body: bytes) -> tuple[str, dict[str, object]]:
    error = json.loads(body)["error"]
    return error["code"], error["details"]


def test_a_valid_request_without_nsm_is_503_nsm_unavailable(attestd: int) -> None:
    status, headers, body = get(attestd, f"{PATH}?nonce={'ab' * 512}&public_key={'04' * 1024}&user_data=00")
    assert status == 503 and headers["content-type"] == "application/json"
    assert headers["connection"] == "close" and headers["cache-control"] == "no-store"
    assert code_of(body) == ("nsm_unavailable", {})


@pytest.mark.parametrize("query, code, parameter", [
    ("nonce=0g", "invalid_hex", "nonce"),
    ("nonce=abc", "invalid_hex", "nonce"),
    ("user_data=%41%41", "invalid_hex", "user_data"),
    ("nonce=", "empty_parameter", "nonce"),
    ("nonce=00&nonce=00", "duplicate_parameter", "nonce"),
    ("nonce=" + "00" * 513, "parameter_too_long", "nonce"),
    ("user_data=" + "00" * 513, "parameter_too_long", "user_data"),
    ("public_key=" + "00" * 1025, "parameter_too_long", "public_key"),
    ("pubkey=00", "unknown_parameter", None),
    ("nonce", "malformed_query", None),
    ("nonce=00&", "malformed_query", None),
])
def test_bad_parameters_are_400_with_their_code(attestd: int, query: str, code: str, parameter: str | None) -> None:
    status, _, body = get(attestd, f"{PATH}?{query}")
    assert status == 400
    assert code_of(body) == (code, {"parameter": parameter} if parameter else {})


@pytest.mark.parametrize("request_bytes, status, code", [
    (b"GET /other HTTP/1.1\r\n\r\n", 404, "not_found"),
    (f"GET {PATH}/x HTTP/1.1\r\n\r\n".encode(), 404, "not_found"),
    (f"POST {PATH} HTTP/1.1\r\nContent-Length: 0\r\n\r\n".encode(), 405, "method_not_allowed"),
    (f"GET {PATH} HTTP/2.0\r\n\r\n".encode(), 505, "http_version_not_supported"),
    (f"GET {PATH} HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc".encode(), 400, "body_not_allowed"),
    (f"GET {PATH} HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n".encode(), 400, "body_not_allowed"),
    (f"GET {PATH} HTTP/1.1\r\nX: a\r\n folded\r\n\r\n".encode(), 400, "malformed_request"),
    (f"GET {PATH} HTTP/1.1\r\nBad Name: a\r\n\r\n".encode(), 400, "malformed_request"),
    (f"GET {PATH} HTTP/1.1\r\nX: a\x01b\r\n\r\n".encode(), 400, "malformed_request"),
    (f"GET  {PATH} HTTP/1.1\r\n\r\n".encode(), 400, "malformed_request"),
    (f"GET {PATH}\r\n\r\n".encode(), 400, "malformed_request"),
    (f"GET {PATH}#frag HTTP/1.1\r\n\r\n".encode(), 400, "malformed_request"),
    (f"GET {PATH} HTTP/1.1\rX: y\r\n\r\n".encode(), 400, "malformed_request"),
    (f"GET {PATH} HTTP/1.1\r\n" .encode() + b"X: y\r\n" * 65 + b"\r\n", 431, "request_too_large"),
    (f"GET {PATH}?nonce={'0' * 9000} HTTP/1.1\r\n\r\n".encode(), 431, "request_too_large"),
])
def test_malformed_requests_get_their_status_and_code(attestd: int, request_bytes: bytes, status: int,
                                                      code: str) -> None:
    got, headers, body = exchange(attestd, request_bytes)
    assert (got, code_of(body)[0]) == (status, code)
    if status == 405:
        assert headers["allow"] == "GET"


def test_absolute_form_bare_lf_and_http_1_0_are_understood(attestd: int) -> None:
    for raw in (f"GET http://127.0.0.1:1300{PATH}?nonce=00 HTTP/1.1\r\nHost: x\r\n\r\n",
                f"GET {PATH} HTTP/1.0\n\n", f"\r\nGET {PATH}?user_data=AbCd HTTP/1.1\r\n\r\n"):
        status, _, body = exchange(attestd, raw.encode())
        assert (status, code_of(body)[0]) == (503, "nsm_unavailable"), raw


def test_a_request_that_never_completes_gets_408_after_the_timeout(attestd: int) -> None:
    with socket.create_connection(("127.0.0.1", attestd), timeout=15) as s:
        s.sendall(f"GET {PATH} HTTP/1.1\r\nHost: x\r\n".encode())  # no empty line: never complete
        started = time.monotonic()
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        waited = time.monotonic() - started
    assert data.startswith(b"HTTP/1.1 408 ") and b'"request_timeout"' in data
    assert 4.0 < waited < 9.0


def test_slow_and_idle_clients_do_not_keep_others_out(attestd: int) -> None:
    # More idle connections than attestd serves at once (32), each having sent part of a request: the oldest
    # make room, and a well-behaved client is answered at once.
    idle = []
    try:
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", attestd), timeout=5)
            s.sendall(b"GET /.well-known/")
            idle.append(s)
        started = time.monotonic()
        status, _, body = get(attestd, f"{PATH}?nonce=00")
        assert status == 503 and code_of(body)[0] == "nsm_unavailable"
        assert time.monotonic() - started < 2.0
        # The evicted ones were closed without an answer; the newest are still being waited for.
        evicted = 0
        for s in idle:
            s.setblocking(False)
            try:
                evicted += s.recv(1) == b""
            except ConnectionResetError:
                evicted += 1
            except BlockingIOError:
                pass
        assert evicted >= 8
    finally:
        for s in idle:
            s.close()


def test_it_listens_on_loopback_only(attestd: int) -> None:
    out = Path("/proc/net/tcp").read_text().splitlines()[1:]
    listening = [line.split() for line in out if line.split()[3] == "0A"]  # TCP_LISTEN
    mine = [fields[1] for fields in listening if int(fields[1].split(":")[1], 16) == attestd]
    assert mine == [f"0100007F:{attestd:04X}"]


def test_a_request_sent_a_byte_at_a_time_is_answered(attestd: int) -> None:
    request = f"GET {PATH}?nonce=00 HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    with socket.create_connection(("127.0.0.1", attestd), timeout=10) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for i in range(len(request)):
            s.sendall(request[i:i + 1])
            time.sleep(0.002)
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    assert data.startswith(b"HTTP/1.1 503 ") and b'"nsm_unavailable"' in data
