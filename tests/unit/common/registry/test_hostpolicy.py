"""The registry host policy (SSRF guard): URL and literal-address checks, without touching the network."""
from __future__ import annotations

import ipaddress

import pytest

from common.errors import HostNotAllowed
from common.registry.hostpolicy import HostPolicy, is_public_address, split_host_port

STRICT = HostPolicy()


@pytest.mark.parametrize("url", [
    "https://169.254.169.254/latest/meta-data/",
    "https://0xA9FEA9FE/",
    "https://2852039166/",
    "https://0251.0376.0251.0376/",
    "https://[::ffff:169.254.169.254]/",
    "https://[fd00:ec2::254]/",
    "https://[64:ff9b::a9fe:a9fe]/",
    "https://[2002:a9fe:a9fe::1]/",
    "https://127.1/",
    "https://127.0.0.1/",
    "https://[::1]/",
    "https://10.0.0.8/",
    "https://192.168.1.1/",
    "https://172.16.0.1/",
    "https://100.64.0.1/",
    "https://0.0.0.0/",
    "https://224.0.0.1/",
])
def test_policy_refuses_non_public_literal_addresses(url):
    with pytest.raises(HostNotAllowed) as exc:
        STRICT.check_url(url)
    assert exc.value.code == "host_not_allowed"


@pytest.mark.parametrize("url", [
    "http://registry.example.com/v2/",
    "file:///etc/passwd",
    "gopher://registry.example.com/",
    "https://user:pass@registry.example.com/",
    "https://registry.example.com:6379/",
    "https://registry.example.com:5432/",
    "https://registry.example.com:2375/",
    "https:///v2/",
])
def test_policy_refuses_schemes_userinfo_and_ports(url):
    with pytest.raises(HostNotAllowed):
        STRICT.check_url(url)


def test_policy_allows_public_https():
    STRICT.check_url("https://registry.example.com/v2/")
    STRICT.check_url("https://8.8.8.8:5000/v2/")
    STRICT.check_url("https://[2001:4860:4860::8888]/v2/")


def test_insecure_registries_allow_http_and_loopback_for_that_host_only():
    policy = HostPolicy.allowing(["127.0.0.1:5000", "localhost"])
    policy.check_url("http://127.0.0.1:5000/v2/")
    policy.check_url("http://localhost:1234/v2/")
    assert policy.scheme_for("127.0.0.1:5000") == "http"
    assert policy.scheme_for("registry.example.com") == "https"
    with pytest.raises(HostNotAllowed):
        policy.check_url("http://127.0.0.1:5001/v2/")
    with pytest.raises(HostNotAllowed):
        policy.check_url("https://127.0.0.1:5001/v2/")


def test_allow_private_networks_still_needs_https():
    policy = HostPolicy(allow_private_networks=True)
    policy.check_url("https://10.1.2.3/v2/")
    with pytest.raises(HostNotAllowed):
        policy.check_url("http://10.1.2.3/v2/")


@pytest.mark.parametrize("address,public", [
    ("8.8.8.8", True), ("169.254.169.254", False), ("::ffff:8.8.8.8", True), ("::ffff:10.0.0.1", False),
    ("2001:4860:4860::8888", True), ("fe80::1", False), ("ff02::1", False), ("64:ff9b::808:808", True),
])
def test_is_public_address(address, public):
    assert is_public_address(ipaddress.ip_address(address)) is public


def test_split_host_port():
    assert split_host_port("127.0.0.1:5000") == ("127.0.0.1", 5000)
    assert split_host_port("example.com") == ("example.com", None)
