"""Registry authentication pieces: credentials that never print, WWW-Authenticate parsing, the token cache."""
from __future__ import annotations

import base64
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from common.errors import InvalidOptions

_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A bearer token goes verbatim into a header: anything outside RFC 6750's b64token (+ JWT dots) is refused.
_BEARER = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


@dataclass(frozen=True)
class Credentials:
    """A registry username and password. The password is never part of repr, str or an error message.

    One type from the request to the registry: sealed at rest by the store, opened in the worker just before use,
    checked by the registry client that sends them."""

    username: str
    password: str = field(repr=False)

    def check(self) -> None:
        """A ':' in the username or a control character would break the Authorization header."""
        if ":" in self.username or any(c in self.username + self.password for c in "\r\n\0"):
            raise InvalidOptions("registry username must not contain ':' and credentials no control characters")

    def basic_header(self) -> str:
        raw = f"{self.username}:{self.password}".encode()
        return "Basic " + base64.b64encode(raw).decode("ascii")


@dataclass(frozen=True)
class Challenge:
    """One challenge from a WWW-Authenticate header; `scheme` is lowercase, param names too."""

    scheme: str
    params: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def scopes(self) -> tuple[str, ...]:
        """Bearer scopes the registry asked for (space-separated per the token spec)."""
        return tuple(self.params.get("scope", "").split())


def parse_challenges(header: str) -> tuple[Challenge, ...]:
    """Parse `Bearer realm="…",service="…",scope="repository:x:pull,push"` (several challenges allowed).

    Quoted values may contain commas (scopes do), which is why this is a tokenizer and not a split.
    """
    challenges: list[Challenge] = []
    pos, n = 0, len(header)

    def skip(chars: str) -> None:
        nonlocal pos
        while pos < n and header[pos] in chars:
            pos += 1

    def token() -> str:
        nonlocal pos
        m = _TOKEN.match(header, pos)
        if not m:
            return ""
        pos = m.end()
        return m.group(0)

    def quoted() -> str:
        nonlocal pos
        pos += 1  # opening quote
        out: list[str] = []
        while pos < n and header[pos] != '"':
            if header[pos] == "\\" and pos + 1 < n:
                pos += 1
            out.append(header[pos])
            pos += 1
        pos += 1  # closing quote (or end)
        return "".join(out)

    while pos < n:
        skip(" \t,")
        scheme = token()
        if not scheme:
            break
        params: dict[str, str] = {}
        while True:
            skip(" \t")
            mark = pos
            name = token()
            skip(" \t")
            if not name or pos >= n or header[pos] != "=":
                pos = mark  # not an auth-param: the next challenge's scheme, or the end
                break
            pos += 1
            skip(" \t")
            value = quoted() if pos < n and header[pos] == '"' else token()
            params[name.lower()] = value
            skip(" \t")
            if pos < n and header[pos] == ",":
                pos += 1
        challenges.append(Challenge(scheme.lower(), params))
    return tuple(challenges)


def repository_scope(repository: str, *actions: str) -> str:
    """`repository:<name>:pull,push` as the token spec spells it."""
    return f"repository:{repository}:{','.join(actions)}"


def is_valid_bearer_token(token: object) -> bool:
    return isinstance(token, str) and len(token) <= 65536 and _BEARER.fullmatch(token) is not None


@dataclass
class TokenCache:
    """Bearer tokens by scope set, forgotten a little before they expire; safe across threads."""

    clock: Callable[[], float] = time.monotonic
    _tokens: dict[frozenset[str], tuple[str, float]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def get(self, scopes: Iterable[str]) -> str | None:
        key = frozenset(scopes)
        with self._lock:
            entry = self._tokens.get(key)
            if entry is None:
                return None
            token, expires_at = entry
            if self.clock() >= expires_at:
                del self._tokens[key]
                return None
            return token

    def put(self, scopes: Iterable[str], token: str, expires_in: float) -> None:
        # Refresh early so a token does not lapse between being read here and reaching the registry.
        margin = min(10.0, expires_in / 4)
        with self._lock:
            self._tokens[frozenset(scopes)] = (token, self.clock() + expires_in - margin)

    def drop(self, scopes: Iterable[str]) -> None:
        with self._lock:
            self._tokens.pop(frozenset(scopes), None)
