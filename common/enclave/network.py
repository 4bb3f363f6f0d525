"""The network policy of a converted app: `converter_options.network`, validated, normalized and made canonical.

Two steps, both pure:
- `parse_request` checks what a request says and fills the defaults that do not depend on the image;
  `ingress` and `hostname` stay None when not given (the API stores this form with the Build);
- `resolve` fills those from the image (its EXPOSEd TCP ports, its name) once it is pulled; the result is
  what the launcher (launch.json "network") and the enclave (`/.nitroconv/network.json`, measured in PCR2)
  read, and what the Build records.

Every refusal is `InvalidOptions` whose `details["field"]` names the offending field as
`network.egress.allow[2].cidr`.
"""
from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping, Sequence

from common.errors import InvalidOptions

EGRESS_MODES = ("none", "proxy", "transparent")
# What the app gets when the request says nothing about egress: CCM's behaviour, the app has network.
DEFAULT_EGRESS_MODE = "transparent"
ALLOW_ALL = ({"cidr": "0.0.0.0/0", "ports": ["1-65535"]}, {"cidr": "::/0", "ports": ["1-65535"]})
# What an omitted `deny` denies: the parent instance itself. Egress leaves from the parent, so without it an app
# reaches the parent's own services on loopback (0.0.0.0 and :: connect there too) and the instance metadata
# service (169.254.169.254 and fd00:ec2::254: the parent's IAM role credentials) on link-local. A request that
# needs them says `deny` itself (`[]` denies nothing).
PARENT_ONLY = tuple({"cidr": cidr, "ports": ["1-65535"]} for cidr in (
    "0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "::/128", "::1/128", "fe80::/10", "fd00:ec2::254/128"))
DEFAULT_HOSTNAME = "enclave"
MAX_INGRESS = 64
MAX_RULES = 256
MAX_RULE_PORTS = 64
MAX_HOST_CHARS = 253

_LABEL = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
_RANGE = re.compile(r"([0-9]{1,5})-([0-9]{1,5})")


# The ingress daemon beside the exec shim (worker/runtime/netd.c), started by the shim with its netd.conf.
NETD_NAME = "netd"


def _bad(field: str, message: str) -> InvalidOptions:
    return InvalidOptions(f"{field}: {message}", details={"field": field})


def _object(value: object, field: str, keys: Iterable[str]) -> Mapping[str, object]:
    if not isinstance(value, Mapping):
        raise _bad(field, "must be an object")
    allowed = set(keys)
    for key in value:
        if key not in allowed:
            raise _bad(f"{field}.{key}", f"unknown field (expected one of {', '.join(sorted(allowed))})")
    return value


def _list(value: object, field: str, longest: int) -> Sequence[object]:
    if not isinstance(value, list):
        raise _bad(field, "must be a list")
    if len(value) > longest:
        raise _bad(field, f"at most {longest} items")
    return value


def _port(value: object, field: str) -> int:
    # bool is an int in Python; `true` is not a port.
    if type(value) is not int or not 1 <= value <= 65535:
        raise _bad(field, "must be an integer port from 1 to 65535")
    return value


def _hostname(value: object, field: str, *, wildcard: bool) -> str:
    if not isinstance(value, str) or not value:
        raise _bad(field, "must be a non-empty string")
    name = value.lower()
    if name.endswith("."):
        name = name[:-1]
    labels = name.split(".")
    if wildcard and labels[0] == "*" and len(labels) > 1:
        labels = labels[1:]
    if len(name) > MAX_HOST_CHARS or not all(_LABEL.fullmatch(label) for label in labels):
        what = "a DNS name or *.name (RFC 1123 labels)" if wildcard else "an RFC 1123 host name"
        raise _bad(field, f"{value!r} is not {what}")
    return name


def _rule_ports(value: object, field: str) -> list[int | str]:
    items = _list(value, field, MAX_RULE_PORTS)
    if not items:
        raise _bad(field, "must name at least one port or range (omit it for every port)")
    ports: list[int | str] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, str):
            match = _RANGE.fullmatch(item)
            low, high = (int(match.group(1)), int(match.group(2))) if match else (0, 0)
            if not match or not 1 <= low <= high <= 65535:
                raise _bad(where, f"{item!r} is not a range LOW-HIGH of ports from 1 to 65535")
            ports.append(low if low == high else f"{low}-{high}")
        else:
            ports.append(_port(item, where))
    return ports


def _rule(value: object, field: str) -> dict[str, object]:
    rule = _object(value, field, ("host", "cidr", "ports"))
    if ("host" in rule) == ("cidr" in rule):
        raise _bad(field, "must have exactly one of host and cidr")
    out: dict[str, object] = {}
    if "host" in rule:
        out["host"] = _hostname(rule["host"], f"{field}.host", wildcard=True)
    else:
        cidr = rule["cidr"]
        try:
            if not isinstance(cidr, str):
                raise ValueError("not a string")
            out["cidr"] = str(ipaddress.ip_network(cidr, strict=True))
        except ValueError:
            raise _bad(f"{field}.cidr", f"{cidr!r} is not a CIDR block (address/prefix, no host bits set)") from None
    out["ports"] = _rule_ports(rule["ports"], f"{field}.ports") if "ports" in rule else ["1-65535"]
    return out


def _rules(value: object, field: str) -> list[dict[str, object]]:
    return [_rule(item, f"{field}[{i}]") for i, item in enumerate(_list(value, field, MAX_RULES))]


def _ingress(value: object) -> list[dict[str, object]]:
    field = "network.ingress"
    items = _list(value, field, MAX_INGRESS)
    seen: set[int] = set()
    out: list[dict[str, object]] = []
    for i, item in enumerate(items):
        where = f"{field}[{i}]"
        if isinstance(item, Mapping):
            entry = _object(item, where, ("port", "proxy_protocol"))
            if "port" not in entry:
                raise _bad(f"{where}.port", "is required")
            port = _port(entry["port"], f"{where}.port")
            proxy = entry.get("proxy_protocol", False)
            if type(proxy) is not bool:
                raise _bad(f"{where}.proxy_protocol", "must be true or false")
        else:
            port, proxy = _port(item, where), False
        if port in seen:
            raise _bad(where, f"port {port} is published twice")
        seen.add(port)
        out.append({"port": port, "proxy_protocol": proxy})
    return out


def _egress(value: object) -> dict[str, object]:
    field = "network.egress"
    egress = _object(value, field, ("mode", "allow", "deny"))
    mode = egress.get("mode", DEFAULT_EGRESS_MODE)
    if mode not in EGRESS_MODES:
        raise _bad(f"{field}.mode", f"{mode!r} is not one of {', '.join(EGRESS_MODES)}")
    allow = _rules(egress["allow"], f"{field}.allow") if "allow" in egress else [dict(r) for r in ALLOW_ALL]
    deny = _rules(egress["deny"], f"{field}.deny") if "deny" in egress else [dict(r) for r in PARENT_ONLY]
    if mode == "none":
        for key in ("allow", "deny"):
            if egress.get(key):
                raise _bad(f"{field}.{key}", 'has no meaning with mode "none" (the app has no egress)')
        allow, deny = [], []
    return {"mode": mode, "allow": allow, "deny": deny}


def parse_request(value: object) -> dict[str, object]:
    """A request's `network` (None when absent) checked, with the image-independent defaults filled in.

    `ingress` and `hostname` are None here when the request leaves them to the image (see `resolve`).
    """
    if value is None:
        value = {}
    policy = _object(value, "network", ("ingress", "egress", "hostname"))
    ingress = _ingress(policy["ingress"]) if policy.get("ingress") is not None else None
    hostname = (_hostname(policy["hostname"], "network.hostname", wildcard=False)
                if policy.get("hostname") is not None else None)
    if hostname is not None and "." in hostname:
        raise _bad("network.hostname", "must be a single label (the enclave's short host name)")
    egress = _egress(policy["egress"] if policy.get("egress") is not None else {})
    return {"ingress": ingress, "egress": egress, "hostname": hostname}


def hostname_for(image_name: str) -> str:
    """An RFC 1123 label from an image's repository name: its last path component, lowercase, `-` for the rest."""
    last = image_name.rsplit("/", 1)[-1].split("@", 1)[0].split(":", 1)[0].lower()
    label = re.sub(r"[^a-z0-9-]+", "-", last).strip("-")[:63].strip("-")
    return label or DEFAULT_HOSTNAME


def resolve(requested: Mapping[str, object] | None, *, exposed_ports: Iterable[tuple[int, str]],
            image_name: str) -> dict[str, object]:
    """The policy the enclave runs with: `requested` (a `parse_request` result, or None for a request that said
    nothing), its ingress defaulting to the image's EXPOSEd TCP ports and its hostname to the image's name."""
    policy = parse_request(requested)
    if policy["ingress"] is None:
        tcp = sorted({port for port, proto in exposed_ports if proto.lower() == "tcp" and 1 <= port <= 65535})
        policy["ingress"] = [{"port": port, "proxy_protocol": False} for port in tcp]
    if policy["hostname"] is None:
        policy["hostname"] = hostname_for(image_name)
    return policy


def canonical_json(policy: Mapping[str, object]) -> bytes:
    """The bytes measured into the enclave: sorted keys, no spaces, ASCII, one trailing newline."""
    return json.dumps(policy, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode() + b"\n"


def published_ports(policy: Mapping[str, object] | None) -> list[int]:
    """The TCP ports a resolved policy publishes (none for None)."""
    ingress = (policy or {}).get("ingress") or []
    return [int(e["port"]) for e in ingress] if isinstance(ingress, list) else []


def netd_conf(policy: Mapping[str, object]) -> bytes:
    """netd's configuration (worker/runtime/netd.c): one `PORT PROXY` line per published port, PROXY 0 or 1."""
    ingress = policy.get("ingress") or []
    assert isinstance(ingress, list)
    return "".join(f"{e['port']} {1 if e['proxy_protocol'] else 0}\n" for e in ingress).encode()


def etc_files(policy: Mapping[str, object]) -> dict[str, bytes]:
    """/etc/hostname, /etc/hosts and /etc/resolv.conf of the enclave's rootfs (the DNS stub is on loopback)."""
    name = str(policy["hostname"])
    return {
        "etc/hostname": f"{name}\n".encode(),
        "etc/hosts": (f"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                      f"127.0.1.1\t{name}\n").encode(),
        "etc/resolv.conf": b"nameserver 127.0.0.1\noptions ndots:1\n",
    }
