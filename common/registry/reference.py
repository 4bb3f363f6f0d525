"""Image references: Docker's grammar and normalisation (`busybox` → `docker.io/library/busybox:latest`)."""
from __future__ import annotations

import re
from dataclasses import dataclass

from common.errors import InvalidDigest, InvalidReference
from common.registry.digest import Digest

DEFAULT_DOMAIN = "docker.io"
DEFAULT_TAG = "latest"
DAEMON_PREFIX = "docker-daemon:"
REGISTRY_PREFIX = "docker://"
# docker.io is a name, not a host: the v2 API answers on this one (as in the Docker CLI).
_DOCKER_HUB_API_HOST = "registry-1.docker.io"
_LEGACY_DEFAULT_DOMAIN = "index.docker.io"
_OFFICIAL_PREFIX = "library/"
NAME_TOTAL_LENGTH_MAX = 255

# The grammar of github.com/distribution/reference (regexp.go), spelled out piece by piece.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_REMOTE_NAME = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN = re.compile(rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?")
_TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
_HEX64 = re.compile(r"[a-f0-9]{64}")


@dataclass(frozen=True)
class Reference:
    """A normalised registry reference. `tag` and `digest` may both be set; the digest is what is pulled."""

    domain: str
    repository: str
    tag: str | None = None
    digest: Digest | None = None

    @property
    def name(self) -> str:
        """`domain/repository`, the fully qualified name without tag or digest."""
        return f"{self.domain}/{self.repository}"

    @property
    def api_host(self) -> str:
        """The `host[:port]` that serves the v2 API for this reference's domain."""
        return _DOCKER_HUB_API_HOST if self.domain == DEFAULT_DOMAIN else self.domain

    @property
    def manifest_reference(self) -> str:
        """What goes after `/manifests/`: the digest when pinned, else the tag."""
        if self.digest is not None:
            return str(self.digest)
        return self.tag or DEFAULT_TAG

    def with_digest(self, digest: Digest) -> Reference:
        return Reference(self.domain, self.repository, self.tag, digest)

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text


@dataclass(frozen=True)
class DaemonImage:
    """An image in the local Docker engine (`docker-daemon:NAME[:TAG]` or `docker-daemon:sha256:<id>`)."""

    reference: Reference | None = None
    image_id: Digest | None = None

    def __str__(self) -> str:
        return DAEMON_PREFIX + str(self.image_id if self.image_id is not None else self.reference)


def parse_reference(text: str) -> Reference:
    """Parse and normalise an image reference as `docker pull` does; grammar errors raise `InvalidReference`."""
    if not isinstance(text, str) or not text:
        raise InvalidReference("image reference is empty")
    if len(text) > 1024 or any(ord(c) < 0x21 or ord(c) > 0x7E for c in text):
        raise InvalidReference("image reference has whitespace, control or non-ASCII characters",
                               details={"reference": text[:200]})
    remainder, at, digest_text = text.partition("@")
    digest: Digest | None = None
    if at:
        try:
            digest = Digest.parse(digest_text)
        except InvalidDigest as exc:
            raise InvalidReference(f"invalid digest in image reference: {exc.message}",
                                   details={"reference": text}) from exc

    # A tag is the part after the last ':' that comes after the last '/' (so host:port stays whole).
    name, tag = remainder, None
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        name, tag = remainder[:colon], remainder[colon + 1:]
        if not _TAG.fullmatch(tag):
            raise InvalidReference(f"invalid tag {tag!r}", details={"reference": text})

    if _HEX64.fullmatch(name):
        raise InvalidReference("a 64-character hexadecimal string is an image ID, not a repository name",
                               details={"reference": text})
    domain, repository = _split_domain(name)
    if not _DOMAIN.fullmatch(domain):
        raise InvalidReference(f"invalid registry host {domain!r}", details={"reference": text})
    if repository != repository.lower() and _REMOTE_NAME.fullmatch(repository.lower()):
        raise InvalidReference("repository name must be lowercase", details={"reference": text})
    if not _REMOTE_NAME.fullmatch(repository):
        raise InvalidReference(f"invalid repository name {repository!r}", details={"reference": text})
    if len(f"{domain}/{repository}") > NAME_TOTAL_LENGTH_MAX:
        raise InvalidReference(f"repository name longer than {NAME_TOTAL_LENGTH_MAX} characters",
                               details={"reference": text[:300]})
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return Reference(domain, repository, tag, digest)


def parse_image_source(text: str) -> Reference | DaemonImage:
    """A registry reference (optionally `docker://`-prefixed) or a `docker-daemon:` image."""
    if text.startswith(REGISTRY_PREFIX):
        return parse_reference(text[len(REGISTRY_PREFIX):])
    if not text.startswith(DAEMON_PREFIX):
        return parse_reference(text)
    rest = text[len(DAEMON_PREFIX):]
    try:
        return DaemonImage(image_id=Digest.parse(rest))
    except InvalidDigest:
        pass
    ref = parse_reference(rest)
    if ref.digest is not None:
        # The engine's image store is keyed by name:tag and image ID, not by registry manifest digest.
        raise InvalidReference("a docker-daemon: reference takes NAME[:TAG] or an image ID, not @digest",
                               details={"reference": text})
    return DaemonImage(reference=ref)


def check_repository(name: str) -> str:
    """`name` if it is a valid repository path (it goes into URLs and scopes verbatim), else `InvalidReference`."""
    if not isinstance(name, str) or len(name) > NAME_TOTAL_LENGTH_MAX or not _REMOTE_NAME.fullmatch(name):
        raise InvalidReference(f"invalid repository name {str(name)[:300]!r}")
    return name


def check_registry_host(host: str) -> str:
    """`host` if it is a `host[:port]` as the reference grammar allows (no scheme, path or userinfo)."""
    if not isinstance(host, str) or not _DOMAIN.fullmatch(host):
        raise InvalidReference(f"invalid registry host {str(host)[:200]!r}")
    return host


def check_tag(tag: str) -> str:
    """`tag` if it matches Docker's tag grammar, else `InvalidReference`."""
    if not isinstance(tag, str) or not _TAG.fullmatch(tag):
        raise InvalidReference(f"invalid tag {str(tag)[:200]!r}")
    return tag


def _split_domain(name: str) -> tuple[str, str]:
    """Docker's splitDockerDomain: the first component is a host only if it looks like one."""
    first, slash, rest = name.partition("/")
    if not slash or ("." not in first and ":" not in first and first != "localhost" and first == first.lower()):
        domain, remainder = DEFAULT_DOMAIN, name
    else:
        domain, remainder = first, rest
    if domain == _LEGACY_DEFAULT_DOMAIN:
        domain = DEFAULT_DOMAIN
    if domain == DEFAULT_DOMAIN and "/" not in remainder:
        remainder = _OFFICIAL_PREFIX + remainder
    return domain, remainder
