"""Which hosts the registry client may talk to (SSRF guard), enforced on the URL and again at connect time."""
from __future__ import annotations

import ipaddress
import socket
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError
from urllib3.util import parse_url
from urllib3.util.timeout import _DEFAULT_TIMEOUT

from common.errors import HostNotAllowed

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Internal services a registry never runs on; a refusal here is defence in depth behind the address check.
DEFAULT_DENIED_PORTS: frozenset[int] = frozenset({
    0, 22, 23, 25, 53, 111, 135, 139, 445, 2375, 2376, 2379, 2380, 3306, 5432, 5672, 6379, 6443,
    9200, 10250, 10255, 11211, 15672, 27017,
})
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# Instance-local endpoints (cloud metadata, link-local): never a registry, whatever any allow-list says.
ALWAYS_DENIED_NETWORKS = tuple(ipaddress.ip_network(n) for n in (
    "169.254.0.0/16",      # IPv4 link-local: AWS/GCP/Azure/OpenStack metadata at 169.254.169.254, ECS at .170.2
    "fe80::/10",           # IPv6 link-local
    "fd00:ec2::254/128",   # AWS IMDS over IPv6
    "100.100.100.200/32",  # Alibaba Cloud metadata
    "168.63.129.16/32",    # Azure WireServer
))
METADATA_HOSTNAMES = frozenset({
    "metadata", "metadata.google.internal", "metadata.goog", "instance-data", "instance-data.ec2.internal",
})
_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(frozen=True)
class HostPolicy:
    """Where a registry client may connect.

    By default only https to public addresses. Hosts listed in `insecure_registries` (`host` or
    `host:port`, like Docker's `--insecure-registry`) may also use plain http and resolve to
    loopback or private addresses: that is how tests and the demo reach `127.0.0.1:PORT`.
    """

    insecure_registries: frozenset[str] = frozenset()
    denied_ports: frozenset[int] = DEFAULT_DENIED_PORTS
    allow_private_networks: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "insecure_registries", frozenset(h.lower() for h in self.insecure_registries))

    @classmethod
    def allowing(cls, hosts: Iterable[str]) -> HostPolicy:
        return cls(insecure_registries=frozenset(hosts))

    def is_insecure(self, host: str, port: int | None = None) -> bool:
        """True if `host[:port]` was explicitly marked insecure/allowed."""
        host = _bare_host(host)
        entries = self.insecure_registries
        if port is not None and (f"{_bracket(host)}:{port}" in entries):
            return True
        return _bracket(host) in entries or host in entries

    def scheme_for(self, host_port: str) -> str:
        """`http` for an insecure registry (as the demo's local one), `https` otherwise."""
        host, port = split_host_port(host_port)
        return "http" if self.is_insecure(host, port) else "https"

    def check_url(self, url: str) -> None:
        """Refuse a URL by scheme, userinfo, port or literal address, with the parser urllib3 connects with."""
        try:
            parsed = parse_url(url)
        except ValueError as exc:
            raise HostNotAllowed(f"unparseable URL: {exc}") from exc
        scheme = (parsed.scheme or "").lower()
        host = parsed.host or ""
        if scheme not in _DEFAULT_PORTS or not host:
            raise HostNotAllowed(f"only http(s) URLs with a host are allowed, got scheme {scheme!r}",
                                 details={"scheme": scheme})
        if parsed.auth is not None:
            raise HostNotAllowed("URLs with user:password@ are not allowed", details={"host": host})
        port = parsed.port or _DEFAULT_PORTS[scheme]
        insecure = self.is_insecure(host, port)
        if scheme == "http" and not insecure:
            raise HostNotAllowed(
                f"plain http to {host}:{port} is not allowed; mark the registry insecure to permit it",
                details={"host": f"{host}:{port}"},
            )
        if not insecure and port in self.denied_ports:
            raise HostNotAllowed(f"port {port} is not allowed", details={"host": f"{host}:{port}"})
        literal = _literal_ip(_bare_host(host))
        if literal is not None:
            refuse_instance_local(host, literal)
        if literal is not None and not insecure:
            self._check_address(host, port, literal)

    def resolve(self, host: str, port: int) -> list[tuple[Any, ...]]:
        """getaddrinfo once and validate every address; the caller connects only to these (no rebinding)."""
        bare = _bare_host(host)
        infos = socket.getaddrinfo(bare, port, type=socket.SOCK_STREAM)
        for *_, sockaddr in infos:
            refuse_instance_local(host, ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        if not self.is_insecure(bare, port):
            for *_, sockaddr in infos:
                self._check_address(host, port, ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0]))
        return infos

    def _check_address(self, host: str, port: int, address: IPAddress) -> None:
        if self.allow_private_networks or is_public_address(address):
            return
        raise HostNotAllowed(
            f"{host}:{port} resolves to the non-public address {address}; only explicitly allowed registries may",
            details={"host": f"{host}:{port}", "address": str(address)},
        )


def is_public_address(address: IPAddress) -> bool:
    """Globally routable unicast, looking through IPv4-mapped, NAT64, 6to4 and Teredo wrappers."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded: ipaddress.IPv4Address | None = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None and not is_public_address(embedded):
            return False
    return address.is_global and not address.is_multicast


def is_instance_local(address: IPAddress) -> bool:
    """Link-local or a cloud metadata address, also behind an IPv4-mapped/NAT64/6to4/Teredo wrapper."""
    candidates: list[IPAddress] = [address]
    if isinstance(address, ipaddress.IPv6Address):
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is None and address.teredo is not None:
            embedded = address.teredo[1]
        if embedded is not None:
            candidates.append(embedded)
    return any(a in net for a in candidates for net in ALWAYS_DENIED_NETWORKS if a.version == net.version)


def refuse_instance_local(host: str, address: IPAddress) -> None:
    if is_instance_local(address):
        raise HostNotAllowed(f"{host} is a link-local or cloud metadata address, never a registry",
                             details={"host": host, "address": str(address)})


def check_registry_host(host_port: str, *, allow_list: Iterable[str], production: bool) -> None:
    """Submit-time check of the registry an image reference names (before anything is queued).

    Link-local and metadata hosts are refused always. In production a literal private or loopback
    address (or `localhost`) is refused unless the host is in `allow_list`; other names are resolved
    and checked again by the worker at connect time, which is what defeats DNS tricks.
    """
    host, port = split_host_port(host_port)
    bare = _bare_host(host)
    if bare in METADATA_HOSTNAMES:
        raise HostNotAllowed(f"{bare} is a cloud metadata host, never a registry", details={"host": host_port})
    literal = _literal_ip(bare)
    if literal is not None:
        refuse_instance_local(host_port, literal)
    if not production or HostPolicy.allowing(allow_list).is_insecure(host, port):
        return
    local_name = bare == "localhost" or bare.endswith(".localhost")
    if local_name or (literal is not None and not is_public_address(literal)):
        raise HostNotAllowed(f"{host_port} is a private or loopback address; only allow-listed registries may be",
                             details={"host": host_port})


def _literal_ip(host: str) -> IPAddress | None:
    """The address a literal host denotes, including inet_aton shorthands (`127.1`, `0x7f000001`)."""
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    try:
        # getaddrinfo accepts these legacy forms too, so the check must see what the socket will see.
        return ipaddress.IPv4Address(socket.inet_aton(host))
    except OSError:
        return None


def split_host_port(host_port: str) -> tuple[str, int | None]:
    """`host:port`, `[v6]:port` or `host` → (host, port or None)."""
    parsed = parse_url(f"//{host_port}")
    return parsed.host or "", parsed.port


def _bare_host(host: str) -> str:
    host = host.lower().rstrip(".")
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


# --- connect-time enforcement inside requests/urllib3 ----------------------------------------------
@dataclass
class ConnectionGuard:
    """Resolves and validates at connect time, and remembers live connections so a deadline can cut them."""

    policy: HostPolicy
    _live: weakref.WeakSet[HTTPConnection] = field(default_factory=weakref.WeakSet)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def connect(self, conn: HTTPConnection) -> socket.socket:
        host, port = conn._dns_host, conn.port  # noqa: SLF001 - the name urllib3 itself resolves
        try:
            infos = self.policy.resolve(host, port)
        except socket.gaierror as exc:
            raise NewConnectionError(conn, f"cannot resolve {host}: {exc}") from exc
        last: OSError | None = None
        for family, socktype, proto, _, sockaddr in infos:
            sock = socket.socket(family, socktype, proto)
            try:
                for option in conn.socket_options or ():
                    sock.setsockopt(*option)
                if conn.timeout is not _DEFAULT_TIMEOUT:
                    sock.settimeout(conn.timeout)
                if conn.source_address:
                    sock.bind(conn.source_address)
                sock.connect(sockaddr)
            except TimeoutError as exc:
                sock.close()
                raise ConnectTimeoutError(conn, f"connection to {host}:{port} timed out") from exc
            except OSError as exc:
                sock.close()
                last = exc
                continue
            with self._lock:
                self._live.add(conn)
            return sock
        raise NewConnectionError(conn, f"failed to connect to {host}:{port}: {last}")

    def abort_all(self) -> None:
        """Shut down every live socket; a thread blocked reading one wakes with EOF."""
        with self._lock:
            conns = list(self._live)
        for conn in conns:
            sock = getattr(conn, "sock", None)
            if sock is None:
                continue
            try:
                # The base method on purpose: SSLSocket.shutdown would also tear down SSL state that the
                # reading thread is still using.
                socket.socket.shutdown(sock, socket.SHUT_RDWR)
            except OSError:
                pass


def guarded_adapter(guard: ConnectionGuard, **kwargs: Any) -> HTTPAdapter:
    """A requests adapter whose every connection (redirects and token realms included) goes through `guard`."""

    class _GuardedHTTP(HTTPConnection):
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class _GuardedHTTPS(HTTPSConnection):
        def _new_conn(self) -> socket.socket:
            return guard.connect(self)

    class _HTTPPool(HTTPConnectionPool):
        ConnectionCls = _GuardedHTTP

    class _HTTPSPool(HTTPSConnectionPool):
        ConnectionCls = _GuardedHTTPS

    class _Adapter(HTTPAdapter):
        def init_poolmanager(self, *args: Any, **kw: Any) -> None:
            super().init_poolmanager(*args, **kw)
            self.poolmanager.pool_classes_by_scheme = {"http": _HTTPPool, "https": _HTTPSPool}

    return _Adapter(**kwargs)

