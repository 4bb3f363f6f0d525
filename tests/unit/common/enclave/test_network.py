"""common.enclave.network: the policy's checks (each refusal names its field), defaults and canonical bytes."""
from __future__ import annotations

import json

import pytest

from common.enclave.network import (
    ALLOW_ALL,
    canonical_json,
    etc_files,
    hostname_for,
    netd_conf,
    parse_request,
    resolve,
)
from common.errors import InvalidOptions

EVERYTHING = [{"cidr": "0.0.0.0/0", "ports": ["1-65535"]}, {"cidr": "::/0", "ports": ["1-65535"]}]
PARENT = [{"cidr": cidr, "ports": ["1-65535"]} for cidr in
          ("0.0.0.0/8", "127.0.0.0/8", "169.254.0.0/16", "::/128", "::1/128", "fe80::/10", "fd00:ec2::254/128")]


def test_network_absent_is_ccm_default_with_image_parts_left_open() -> None:
    assert parse_request(None) == {"ingress": None, "hostname": None,
                                   "egress": {"mode": "transparent", "allow": EVERYTHING, "deny": PARENT}}
    assert [dict(r) for r in ALLOW_ALL] == EVERYTHING


def test_network_omitted_deny_denies_the_parent_itself_and_a_given_one_replaces_it() -> None:
    # Loopback and the instance metadata service (v4 and v6) of the parent, whatever the allow rules say.
    assert parse_request({"egress": {"allow": [{"host": "api.example.com"}]}})["egress"]["deny"] == PARENT
    assert parse_request({"egress": {"mode": "proxy"}})["egress"]["deny"] == PARENT
    assert parse_request({"egress": {"deny": []}})["egress"]["deny"] == []
    assert parse_request({"egress": {"deny": [{"cidr": "10.0.0.0/8"}]}})["egress"]["deny"] == [
        {"cidr": "10.0.0.0/8", "ports": ["1-65535"]}]
    assert parse_request({"egress": {"mode": "none"}})["egress"]["deny"] == []


def test_network_resolve_takes_exposed_tcp_ports_and_the_image_name() -> None:
    policy = resolve(None, exposed_ports=[(8080, "tcp"), (53, "udp"), (443, "tcp"), (8080, "tcp")],
                     image_name="127.0.0.1:5000/team/My_App")
    assert policy["ingress"] == [{"port": 443, "proxy_protocol": False}, {"port": 8080, "proxy_protocol": False}]
    assert policy["hostname"] == "my-app"
    assert policy["egress"] == {"mode": "transparent", "allow": EVERYTHING, "deny": PARENT}


def test_network_resolve_keeps_what_the_request_said() -> None:
    requested = parse_request({"ingress": [], "hostname": "Web", "egress": {"mode": "none"}})
    policy = resolve(requested, exposed_ports=[(8080, "tcp")], image_name="x/y")
    assert policy == {"ingress": [], "hostname": "web", "egress": {"mode": "none", "allow": [], "deny": []}}
    # resolve() accepts its own output again unchanged (the worker re-checks what the API stored).
    assert resolve(policy, exposed_ports=[], image_name="z") == policy


def test_network_normalizes_rules_and_ingress() -> None:
    policy = parse_request({
        "ingress": [8080, {"port": 8443, "proxy_protocol": True}, {"port": 9000}],
        "egress": {"mode": "proxy",
                   "allow": [{"host": "API.Example.com."}, {"host": "*.example.org", "ports": [443, "8000-8100", "5-5"]},
                             {"cidr": "10.0.0.0/8"}, {"cidr": "2001:DB8::/32", "ports": [53]}],
                   "deny": [{"cidr": "10.1.0.0/16"}]}})
    assert policy["ingress"] == [{"port": 8080, "proxy_protocol": False}, {"port": 8443, "proxy_protocol": True},
                                 {"port": 9000, "proxy_protocol": False}]
    egress = policy["egress"]
    assert isinstance(egress, dict)
    assert egress["allow"] == [{"host": "api.example.com", "ports": ["1-65535"]},
                               {"host": "*.example.org", "ports": [443, "8000-8100", 5]},
                               {"cidr": "10.0.0.0/8", "ports": ["1-65535"]},
                               {"cidr": "2001:db8::/32", "ports": [53]}]
    assert egress["deny"] == [{"cidr": "10.1.0.0/16", "ports": ["1-65535"]}]


BAD = [
    ("not an object", [8080], "network"),
    ("unknown top key", {"ingres": [1]}, "network.ingres"),
    ("ingress not a list", {"ingress": 8080}, "network.ingress"),
    ("ingress port zero", {"ingress": [0]}, "network.ingress[0]"),
    ("ingress port too big", {"ingress": [8080, 70000]}, "network.ingress[1]"),
    ("ingress port a bool", {"ingress": [True]}, "network.ingress[0]"),
    ("ingress port a string", {"ingress": ["8080"]}, "network.ingress[0]"),
    ("ingress object without port", {"ingress": [{"proxy_protocol": True}]}, "network.ingress[0].port"),
    ("ingress object bad port", {"ingress": [{"port": -1}]}, "network.ingress[0].port"),
    ("ingress proxy not bool", {"ingress": [{"port": 1, "proxy_protocol": "yes"}]},
     "network.ingress[0].proxy_protocol"),
    ("ingress unknown key", {"ingress": [{"port": 1, "tls": True}]}, "network.ingress[0].tls"),
    ("ingress duplicate", {"ingress": [80, {"port": 80}]}, "network.ingress[1]"),
    ("ingress too many", {"ingress": list(range(1, 66))}, "network.ingress"),
    ("egress not an object", {"egress": "none"}, "network.egress"),
    ("egress unknown key", {"egress": {"mode": "proxy", "allowed": []}}, "network.egress.allowed"),
    ("egress bad mode", {"egress": {"mode": "open"}}, "network.egress.mode"),
    ("allow not a list", {"egress": {"allow": {"cidr": "10.0.0.0/8"}}}, "network.egress.allow"),
    ("rule not an object", {"egress": {"allow": ["10.0.0.0/8"]}}, "network.egress.allow[0]"),
    ("rule with neither", {"egress": {"allow": [{"ports": [443]}]}}, "network.egress.allow[0]"),
    ("rule with both", {"egress": {"allow": [{"host": "a.b", "cidr": "10.0.0.0/8"}]}}, "network.egress.allow[0]"),
    ("rule unknown key", {"egress": {"deny": [{"host": "a.b", "port": 1}]}}, "network.egress.deny[0].port"),
    ("bad cidr", {"egress": {"allow": [{"cidr": "1.1.1.1/8"}, {"cidr": "10.0.0.0/8"}, {"cidr": "300.0.0.0/8"}]}},
     "network.egress.allow[0].cidr"),
    ("cidr garbage", {"egress": {"allow": [{"cidr": "10.0.0.0/8"}, {"cidr": "x"}]}}, "network.egress.allow[1].cidr"),
    ("cidr not a string", {"egress": {"deny": [{"cidr": 10}]}}, "network.egress.deny[0].cidr"),
    ("host empty", {"egress": {"allow": [{"host": ""}]}}, "network.egress.allow[0].host"),
    ("host bad chars", {"egress": {"allow": [{"host": "exa mple.com"}]}}, "network.egress.allow[0].host"),
    ("host wildcard in the middle", {"egress": {"allow": [{"host": "a.*.com"}]}}, "network.egress.allow[0].host"),
    ("host bare wildcard", {"egress": {"allow": [{"host": "*"}]}}, "network.egress.allow[0].host"),
    ("host label too long", {"egress": {"allow": [{"host": "a" * 64 + ".com"}]}}, "network.egress.allow[0].host"),
    ("host leading hyphen", {"egress": {"allow": [{"host": "-a.com"}]}}, "network.egress.allow[0].host"),
    ("ports not a list", {"egress": {"allow": [{"host": "a.com", "ports": 443}]}}, "network.egress.allow[0].ports"),
    ("ports empty", {"egress": {"allow": [{"host": "a.com", "ports": []}]}}, "network.egress.allow[0].ports"),
    ("port out of range", {"egress": {"allow": [{"host": "a.com", "ports": [443, 0]}]}},
     "network.egress.allow[0].ports[1]"),
    ("range reversed", {"egress": {"allow": [{"host": "a.com", "ports": ["9000-8000"]}]}},
     "network.egress.allow[0].ports[0]"),
    ("range too big", {"egress": {"allow": [{"host": "a.com", "ports": ["1-65536"]}]}},
     "network.egress.allow[0].ports[0]"),
    ("range not a range", {"egress": {"allow": [{"host": "a.com", "ports": ["443"]}]}},
     "network.egress.allow[0].ports[0]"),
    ("too many rules", {"egress": {"allow": [{"cidr": "10.0.0.0/8"}] * 257}}, "network.egress.allow"),
    ("rules with mode none", {"egress": {"mode": "none", "allow": [{"cidr": "10.0.0.0/8"}]}},
     "network.egress.allow"),
    ("deny with mode none", {"egress": {"mode": "none", "deny": [{"cidr": "10.0.0.0/8"}]}}, "network.egress.deny"),
    ("hostname not a string", {"hostname": 5}, "network.hostname"),
    ("hostname bad", {"hostname": "my_app"}, "network.hostname"),
    ("hostname dotted", {"hostname": "app.example.com"}, "network.hostname"),
    ("hostname wildcard", {"hostname": "*.app"}, "network.hostname"),
]


@pytest.mark.parametrize(("value", "field"), [(v, f) for _, v, f in BAD], ids=[name for name, _, _ in BAD])
def test_network_refusals_name_the_field(value: object, field: str) -> None:
    with pytest.raises(InvalidOptions) as info:
        parse_request(value)
    assert info.value.details == {"field": field}
    assert info.value.message.startswith(field + ": ")
    assert info.value.code == "invalid_options"


def test_network_canonical_bytes_are_stable_and_sorted() -> None:
    a = resolve({"hostname": "app", "ingress": [80], "egress": {"mode": "none"}}, exposed_ports=[], image_name="x")
    b = resolve(parse_request({"egress": {"mode": "none"}, "ingress": [{"port": 80, "proxy_protocol": False}],
                               "hostname": "APP"}), exposed_ports=[(1, "tcp")], image_name="y")
    assert canonical_json(a) == canonical_json(b)
    text = canonical_json(a)
    assert text == (b'{"egress":{"allow":[],"deny":[],"mode":"none"},"hostname":"app",'
                    b'"ingress":[{"port":80,"proxy_protocol":false}]}\n')
    assert json.loads(text) == a


def test_network_netd_conf_and_etc_files() -> None:
    policy = resolve({"ingress": [8080, {"port": 8443, "proxy_protocol": True}]}, exposed_ports=[], image_name="web")
    assert netd_conf(policy) == b"8080 0\n8443 1\n"
    files = etc_files(policy)
    assert files["etc/hostname"] == b"web\n"
    assert b"127.0.1.1\tweb\n" in files["etc/hosts"] and files["etc/hosts"].startswith(b"127.0.0.1\tlocalhost")
    assert files["etc/resolv.conf"].startswith(b"nameserver 127.0.0.1\n")


@pytest.mark.parametrize(("name", "label"), [("127.0.0.1:5000/tour/hello:1", "hello"), ("busybox", "busybox"),
                                             ("r/x@sha256:" + "a" * 64, "x"), ("r/___", "enclave"),
                                             ("r/" + "b" * 80, "b" * 63)])
def test_network_hostname_from_image_name(name: str, label: str) -> None:
    assert hostname_for(name) == label
