"""Image reference parsing and Docker's normalisation."""
from __future__ import annotations

import hashlib

import pytest

from common.errors import InvalidReference
from common.registry.digest import Digest
from common.registry.reference import (
    DaemonImage,
    Reference,
    check_repository,
    parse_image_source,
    parse_reference,
)

HEX = hashlib.sha256(b"x").hexdigest()


@pytest.mark.parametrize("text,expected", [
    ("busybox", "docker.io/library/busybox:latest"),
    ("library/busybox:1.36", "docker.io/library/busybox:1.36"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest"),
    ("user/app:v1", "docker.io/user/app:v1"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/app", "localhost:5000/app:latest"),
    ("127.0.0.1:5000/team/app:v2.1-rc_1", "127.0.0.1:5000/team/app:v2.1-rc_1"),
    ("ghcr.io/org/sub/app:x", "ghcr.io/org/sub/app:x"),
    ("[::1]:5000/app", "[::1]:5000/app:latest"),
    ("Registry.Example.com/app", "Registry.Example.com/app:latest"),
    ("a__b/c-d.e---f", "docker.io/a__b/c-d.e---f:latest"),
])
def test_parse_reference_normalises_like_docker(text, expected):
    assert str(parse_reference(text)) == expected


def test_parse_reference_digest_and_tag():
    ref = parse_reference(f"host:5000/app:v1@sha256:{HEX}")
    assert ref == Reference("host:5000", "app", "v1", Digest("sha256", HEX))
    assert ref.manifest_reference == f"sha256:{HEX}"
    only_digest = parse_reference(f"app@sha256:{HEX}")
    assert only_digest.tag is None and only_digest.manifest_reference == f"sha256:{HEX}"


def test_reference_api_host_maps_docker_hub():
    assert parse_reference("busybox").api_host == "registry-1.docker.io"
    assert parse_reference("127.0.0.1:5000/x").api_host == "127.0.0.1:5000"


@pytest.mark.parametrize("text", [
    "",
    "Busybox",
    "docker.io/Library/busybox",
    "app:",
    "app:-tag",
    "app:" + "t" * 129,
    "app@sha256:abc",
    f"app@sha256:{HEX.upper()}",
    "app@md5:" + "0" * 32,
    "/app",
    "app/",
    "a//b",
    "app name",
    "app\n",
    "-app",
    "app-",
    "a..b",
    HEX,
    "host:port/app",
    "ex ample.com/app",
    "x" * 256,
    "héllo",
])
def test_parse_reference_rejects_grammar_errors(text):
    with pytest.raises(InvalidReference) as exc:
        parse_reference(text)
    assert exc.value.code == "invalid_reference"


def test_parse_reference_rejects_names_longer_than_255():
    with pytest.raises(InvalidReference):
        parse_reference("example.com/" + "/".join(["abcdefghij"] * 24))


def test_parse_image_source_recognises_daemon_and_docker_prefixes():
    assert parse_image_source("docker://busybox") == parse_reference("busybox")
    daemon = parse_image_source("docker-daemon:myapp:dev")
    assert isinstance(daemon, DaemonImage) and str(daemon.reference) == "docker.io/library/myapp:dev"
    by_id = parse_image_source(f"docker-daemon:sha256:{HEX}")
    assert isinstance(by_id, DaemonImage) and by_id.image_id == Digest("sha256", HEX)
    assert str(by_id) == f"docker-daemon:sha256:{HEX}"


def test_parse_image_source_refuses_daemon_digest_reference():
    with pytest.raises(InvalidReference):
        parse_image_source(f"docker-daemon:app@sha256:{HEX}")


def test_check_registry_host():
    from common.registry.reference import check_registry_host

    assert check_registry_host("127.0.0.1:5000") == "127.0.0.1:5000"
    for bad in ("evil.com/path", "user@evil.com", "https://x", "x:y", ""):
        with pytest.raises(InvalidReference):
            check_registry_host(bad)


def test_check_repository_guards_url_paths():
    assert check_repository("team/app") == "team/app"
    for bad in ("../x", "a/../b", "a?b", "A", "a/b/", "a%2fb"):
        with pytest.raises(InvalidReference):
            check_repository(bad)
