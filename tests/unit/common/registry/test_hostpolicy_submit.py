"""The submit-time registry host check: metadata and link-local always refused, private only if allow-listed in production."""
from __future__ import annotations

import ipaddress

import pytest

from common.errors import HostNotAllowed
from common.registry.hostpolicy import HostPolicy, check_registry_host, is_instance_local

ALLOW = ("127.0.0.1:5000", "10.9.9.9")


@pytest.mark.parametrize("host", [
    "169.254.169.254", "169.254.169.254:80", "169.254.170.2", "[fe80::1]:5000", "[fd00:ec2::254]",
    "100.100.100.200", "168.63.129.16", "[::ffff:169.254.169.254]", "[64:ff9b::a9fe:a9fe]",
    "metadata.google.internal", "METADATA.google.internal.", "instance-data",
])
@pytest.mark.parametrize("production", [False, True])
def test_hostpolicy_submit_refuses_instance_local_hosts_always(host, production):
    with pytest.raises(HostNotAllowed):
        check_registry_host(host, allow_list=(*ALLOW, host), production=production)


@pytest.mark.parametrize(("host", "production", "allowed"), [
    ("10.1.2.3:5000", False, True),
    ("10.1.2.3:5000", True, False),
    ("127.0.0.1:5000", True, True),      # allow-listed with its port
    ("127.0.0.1:5001", True, False),     # the allow-list entry names another port
    ("10.9.9.9:443", True, True),        # allow-listed without a port: any port
    ("localhost:5000", True, False),
    ("app.localhost", True, False),
    ("[::1]:5000", True, False),
    ("192.168.1.1", True, False),
    ("registry.example.com", True, True),  # names are resolved and checked by the worker at connect time
    ("8.8.8.8", True, True),
])
def test_hostpolicy_submit_private_needs_allow_list_in_production(host, production, allowed):
    if allowed:
        check_registry_host(host, allow_list=ALLOW, production=production)
    else:
        with pytest.raises(HostNotAllowed):
            check_registry_host(host, allow_list=ALLOW, production=production)


def test_hostpolicy_connect_time_refuses_metadata_even_when_insecure():
    policy = HostPolicy.allowing({"169.254.169.254", "169.254.169.254:80"})
    with pytest.raises(HostNotAllowed):
        policy.check_url("http://169.254.169.254/latest/meta-data/")
    with pytest.raises(HostNotAllowed):
        policy.resolve("169.254.169.254", 80)
    assert not is_instance_local(ipaddress.ip_address("8.8.8.8"))
