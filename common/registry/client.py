"""Docker Registry v2 / OCI distribution client: resolve, verified pull, push, auth, retries and deadlines.

Written on `requests` rather than on a registry library because none covers the contract:
`oras` (oras-py) is built for OCI artifacts, with no index/platform selection for container
images, no DiffID or size-bounded verification and no host policy for token realms and redirects;
`docker-registry-client` and Google's `containerregistry` are unmaintained Python 2-era code;
`docker` (docker-py) drives a daemon, which conversion must not need. What is needed beyond HTTP is
small (auth challenges, digests, redirects under a host policy), and owning it keeps every security
rule of RELIABILITY.md section D checkable in one place.
"""
from __future__ import annotations

import errno
import http.client
import io
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
import urllib3.exceptions

from common.errors import (
    BlobUnknown,
    Denied,
    DigestMismatch,
    InvalidManifest,
    InvalidReference,
    LimitExceeded,
    ManifestUnknown,
    NitroconvError,
    RegistryError,
    RegistryTimeout,
    RegistryUnavailable,
    SizeMismatch,
    Unauthorized,
)
from common.registry.auth import (
    Challenge,
    Credentials,
    TokenCache,
    is_valid_bearer_token,
    parse_challenges,
    repository_scope,
)
from common.registry.digest import Digest, VerifyingWriter
from common.registry.hostpolicy import ConnectionGuard, HostPolicy, guarded_adapter, split_host_port
from common.registry.manifests import (
    LINUX_AMD64,
    MANIFEST_ACCEPT,
    MAX_INDEX_DEPTH,
    Descriptor,
    ImageConfig,
    Index,
    Manifest,
    Platform,
    check_config_platform,
    load_json_object,
    nested_indexes,
    no_matching_platform,
    parse_image_config,
    parse_manifest_document,
    select_manifest,
    unplatformed_manifests,
)
from common.registry.reference import (
    Reference,
    check_registry_host,
    check_repository,
    check_tag,
    parse_reference,
)
from common.registry.retry import RETRYABLE_STATUSES, Deadline, RetryPolicy, Timeouts, parse_retry_after
from common.util.atomicfile import atomic_file

__all__ = [
    "BlobUpload", "Credentials", "FetchedManifest", "HostPolicy", "RegistryClient", "ResolvedImage", "RetryPolicy", "Timeouts",
]

log = logging.getLogger(__name__)

# containerd caps manifests at about 4 MiB too; a real one is a few KiB.
MAX_MANIFEST_BYTES = 4 * 1024 * 1024
MAX_CONFIG_BYTES = 8 * 1024 * 1024
_MAX_TOKEN_RESPONSE_BYTES = 1024 * 1024
_MAX_ERROR_BODY_BYTES = 64 * 1024
_MAX_REDIRECTS = 5
# One fresh token for a rejected cached one, and one more if the server hands out a dud: then stop.
_MAX_AUTH_ROUNDS = 2
_CHUNK = 1024 * 1024
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError, http.client.HTTPException, OSError,
)
_LOCAL_DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})
_DEFAULT_TIMEOUTS = Timeouts()
_DEFAULT_RETRY = RetryPolicy()
_Origin = tuple[str, str, int]


class _Readable(Protocol):
    def read(self, n: int = ..., /) -> bytes: ...

    def close(self) -> None: ...


class Streamed:
    """A body of unknown length, sent as `parts` yields it (chunked transfer encoding), and only once: a request
    that would send it again (after a redirect or an auth round) fails instead of sending what is left of it.
    Raising from `parts` aborts the request, and its connection is closed."""

    def __init__(self, parts: Iterable[bytes]) -> None:
        self._parts = parts
        self._started = False
        self.sent = 0

    def __iter__(self) -> Iterator[bytes]:
        if self._started:
            raise RegistryError("a streamed body cannot be sent twice")
        self._started = True
        for part in self._parts:
            if part:
                self.sent += len(part)
                yield part


Body = bytes | Streamed | Callable[[], _Readable] | None


@dataclass(frozen=True)
class FetchedManifest:
    """A manifest or index exactly as received, with the digest computed over those bytes."""

    digest: Digest
    media_type: str
    raw: bytes
    document: Manifest | Index


@dataclass(frozen=True)
class ResolvedImage:
    """Everything needed to fetch and apply an image, all verified against digests.

    `digest` is what the reference resolved to (an index when the tag names one, as `docker pull`
    reports); `manifest_digest` is the platform manifest actually pulled.
    """

    reference: Reference
    repository: str
    digest: Digest
    manifest_digest: Digest
    manifest_media_type: str
    manifest_bytes: bytes
    manifest: Manifest
    config_bytes: bytes
    config: ImageConfig

    @property
    def layers(self) -> tuple[Descriptor, ...]:
        return self.manifest.layers

    @property
    def diff_ids(self) -> tuple[Digest, ...]:
        return self.config.diff_ids

    @property
    def compressed_size(self) -> int:
        return sum(layer.size for layer in self.manifest.layers)


@dataclass(frozen=True)
class _Auth:
    origin: _Origin
    header: str


class RegistryClient:
    """A client for one registry host, used for one job: credentials, policy and deadline are fixed.

    Use as a context manager (or call `close()`) so the deadline watchdog and connections go away.
    Blob downloads may run from several threads at once on one client.
    """

    def __init__(
        self,
        host: str,
        *,
        credentials: Credentials | None = None,
        policy: HostPolicy | None = None,
        insecure: bool = False,
        timeouts: Timeouts = _DEFAULT_TIMEOUTS,
        retry: RetryPolicy = _DEFAULT_RETRY,
        deadline: float | None = 3600.0,
        tls_verify: bool | str = True,
        user_agent: str = "nitroconv",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """
        Args:
            host: `host[:port]` that serves `/v2/` (`Reference.api_host`).
            insecure: shorthand for a policy that allows plain http and private addresses for `host` only.
            deadline: seconds from now after which every call fails with `registry_timeout`.
            tls_verify: False, True, or a CA bundle path (as `requests`' `verify`).
        """
        self.host = check_registry_host(host).lower()
        if policy is None:
            policy = HostPolicy.allowing([self.host]) if insecure else HostPolicy()
        elif insecure and not policy.is_insecure(*split_host_port(self.host)):
            policy = HostPolicy(policy.insecure_registries | {self.host}, policy.denied_ports,
                                policy.allow_private_networks)
        self.policy = policy
        self.base_url = f"{policy.scheme_for(self.host)}://{self.host}"
        policy.check_url(self.base_url + "/v2/")
        self._origin = _origin(self.base_url)
        if credentials is not None:
            credentials.check()
        self._credentials = credentials
        self._timeouts = timeouts
        self._retry = retry
        self._sleep = sleep
        self._deadline = Deadline(deadline)
        self._tokens = TokenCache()
        self._basic = False  # set once the registry has asked for Basic: then it is sent up front
        self._auth_lock = threading.Lock()
        self._guard = ConnectionGuard(policy)
        self._session = requests.Session()
        # No proxies, .netrc or REQUESTS_CA_BUNDLE from the environment: .netrc alone would attach
        # stored credentials to any host, redirects included.
        self._session.trust_env = False
        self._session.verify = tls_verify
        self._session.headers.update({"User-Agent": user_agent, "Accept-Encoding": "identity"})
        adapter = guarded_adapter(self._guard, max_retries=0)
        self._session.mount("http://", adapter)
        self._session.mount("https://", adapter)
        self._watchdog: threading.Timer | None = None
        remaining = self._deadline.remaining()
        if remaining is not None:
            # A server that trickles one byte at a time never trips a per-read timeout; cutting the
            # sockets is the only way to free the worker at the deadline whatever phase it is in.
            self._watchdog = threading.Timer(remaining, self._guard.abort_all)
            self._watchdog.daemon = True
            self._watchdog.start()

    @classmethod
    def for_reference(cls, reference: Reference, **kwargs: Any) -> RegistryClient:
        """A client for the registry that serves `reference` (docker.io → registry-1.docker.io)."""
        return cls(reference.api_host, **kwargs)

    def __enter__(self) -> RegistryClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
        # A download still running now was abandoned by its caller (a pull aborted by a time limit or a cancel):
        # cut it, or a trickling server keeps a thread and a socket of the worker busy for as long as it likes.
        self._deadline.expire()
        self._guard.abort_all()
        self._session.close()

    def __repr__(self) -> str:
        user = self._credentials.username if self._credentials else None
        return f"RegistryClient(host={self.host!r}, user={user!r})"

    # --- pull -------------------------------------------------------------------------------------
    def resolve(self, reference: Reference | str, platform: Platform = LINUX_AMD64, *,
                top: FetchedManifest | None = None) -> ResolvedImage:
        """Resolve a reference to a verified manifest and config for `platform` (indexes walked, bounded).

        `top`: what `fetch_manifest` returned for this reference earlier (the caller resolved the tag to decide
        something): it is used as is, so what is resolved is exactly what the caller saw, one round trip fewer."""
        ref = parse_reference(reference) if isinstance(reference, str) else reference
        if ref.api_host != self.host:
            raise InvalidReference(f"{ref} is not on registry {self.host}", details={"reference": str(ref)})
        repo = ref.repository
        if top is None:
            top = self.fetch_manifest(repo, ref.digest or ref.manifest_reference)
        elif ref.digest is not None and top.digest != ref.digest:
            raise InvalidManifest(f"{ref} was given with the manifest {top.digest}",
                                  details={"reference": str(ref), "digest": str(top.digest)})
        chosen = top
        if isinstance(top.document, Index):
            found = self._select(repo, top.document, platform, depth=1)
            if found is None:
                raise no_matching_platform(top.document, platform)
            chosen = found
        assert isinstance(chosen.document, Manifest)
        manifest = chosen.document
        config_bytes = self.fetch_blob_bytes(repo, manifest.config, max_bytes=MAX_CONFIG_BYTES)
        config = parse_image_config(config_bytes)
        check_config_platform(config, platform)
        if len(config.diff_ids) != len(manifest.layers):
            raise InvalidManifest(
                f"manifest has {len(manifest.layers)} layers but the config lists {len(config.diff_ids)} diff_ids",
                details={"layers": len(manifest.layers), "diff_ids": len(config.diff_ids)},
            )
        return ResolvedImage(ref, repo, top.digest, chosen.digest, chosen.media_type, chosen.raw, manifest,
                             config_bytes, config)

    def _select(self, repo: str, index: Index, platform: Platform, depth: int) -> FetchedManifest | None:
        entry = select_manifest(index, platform)
        if entry is not None:
            return self.fetch_manifest(repo, entry.digest, expected_media_type=entry.media_type,
                                       expected_size=entry.size)
        for child in nested_indexes(index, platform):
            if depth >= MAX_INDEX_DEPTH:
                raise LimitExceeded(f"image index nested deeper than {MAX_INDEX_DEPTH} levels",
                                    details={"max_depth": MAX_INDEX_DEPTH})
            fetched = self.fetch_manifest(repo, child.digest, expected_media_type=child.media_type,
                                          expected_size=child.size)
            assert isinstance(fetched.document, Index)
            found = self._select(repo, fetched.document, platform, depth + 1)
            if found is not None:
                return found
        for candidate in unplatformed_manifests(index):
            fetched = self.fetch_manifest(repo, candidate.digest, expected_media_type=candidate.media_type,
                                          expected_size=candidate.size)
            assert isinstance(fetched.document, Manifest)
            config = parse_image_config(
                self.fetch_blob_bytes(repo, fetched.document.config, max_bytes=MAX_CONFIG_BYTES))
            if (config.os, config.architecture) == (platform.os, platform.architecture):
                return fetched
        return None

    def fetch_manifest(
        self,
        repository: str,
        reference: str | Digest,
        *,
        expected_media_type: str | None = None,
        expected_size: int | None = None,
    ) -> FetchedManifest:
        """GET a manifest or index by tag or digest; read at most 4 MiB and verify before parsing.

        By digest, the bytes must hash to it; by tag, the digest is computed here and a
        `Docker-Content-Digest` header that disagrees is treated as a lie, never trusted alone.
        """
        repo = check_repository(repository)
        if isinstance(reference, str) and ":" in reference:
            reference = Digest.parse(reference)
        ref_text = str(reference) if isinstance(reference, Digest) else check_tag(reference)
        url = f"{self.base_url}/v2/{repo}/manifests/{ref_text}"
        with self._call("GET", url, scopes=(repository_scope(repo, "pull"),),
                        headers={"Accept": ", ".join(MANIFEST_ACCEPT)}) as resp:
            if resp.status_code != 200:
                raise self._error(resp, f"manifest {repo}:{ref_text}", unknown=ManifestUnknown)
            raw = _read_capped(resp, MAX_MANIFEST_BYTES, what="manifest")
            content_type = resp.headers.get("Content-Type")
            header_digest = resp.headers.get("Docker-Content-Digest")
        if isinstance(reference, Digest):
            digest = reference
            if expected_size is not None and len(raw) != expected_size:
                raise SizeMismatch(f"manifest {digest} is {len(raw)} bytes, descriptor says {expected_size}",
                                   details={"expected": expected_size, "actual": len(raw)})
            if not digest.matches(raw):
                raise DigestMismatch(f"manifest bytes do not hash to the requested {digest}",
                                     details={"expected": str(digest), "actual": str(Digest.of(raw))})
        else:
            digest = Digest.of(raw)
        if header_digest:
            try:
                claimed = Digest.parse(header_digest.strip())
            except NitroconvError as exc:
                raise DigestMismatch("registry sent a malformed Docker-Content-Digest header") from exc
            if not claimed.matches(raw):
                raise DigestMismatch(
                    f"Docker-Content-Digest {claimed} does not match the manifest bytes ({digest})",
                    details={"header": str(claimed), "actual": str(digest)},
                )
        document = parse_manifest_document(raw, content_type, expected_media_type=expected_media_type)
        return FetchedManifest(digest, document.media_type, raw, document)

    def fetch_blob(self, repository: str, descriptor: Descriptor, dest: Path, *,
                   on_write: Callable[[int, int], None] | None = None) -> Path:
        """Download a blob to `dest`, verified (size while reading, digest at EOF), renamed into place atomically.

        The temporary file lives next to `dest` so the final rename cannot cross filesystems; a
        failure leaves nothing at `dest`. `on_write(fd, size)` is called whenever the temporary file's
        descriptor holds `size` bytes of the blob (less than before when a download starts over), so a
        reader can follow the download with `pread`; those bytes are verified only once this returns.
        """
        with atomic_file(Path(dest)) as sink:
            writer = VerifyingWriter(sink, descriptor.digest, descriptor.size)
            self._download(repository, descriptor, writer, sink, on_write)
            writer.verify()
        return Path(dest)

    def fetch_blob_bytes(self, repository: str, descriptor: Descriptor, *, max_bytes: int) -> bytes:
        """A small blob (a config) into memory, verified; larger than `max_bytes` is `limit_exceeded`."""
        if descriptor.size > max_bytes:
            raise LimitExceeded(f"blob {descriptor.digest} is {descriptor.size} bytes, limit is {max_bytes}",
                                details={"size": descriptor.size, "limit": max_bytes})
        sink = io.BytesIO()
        writer = VerifyingWriter(sink, descriptor.digest, descriptor.size)
        self._download(repository, descriptor, writer, sink)
        writer.verify()
        return sink.getvalue()

    def _download(self, repository: str, descriptor: Descriptor, writer: VerifyingWriter, sink: IO[bytes],
                  on_write: Callable[[int, int], None] | None = None) -> None:
        """Stream a blob into `writer`, resuming with Range after a broken connection where the server allows."""
        repo = check_repository(repository)
        url = f"{self.base_url}/v2/{repo}/blobs/{descriptor.digest}"
        scopes = (repository_scope(repo, "pull"),)
        failures = 0
        while True:
            headers = {"Range": f"bytes={writer.written}-"} if writer.written else {}
            with self._call("GET", url, scopes=scopes, headers=headers) as resp:
                if resp.status_code == 206 and _range_start(resp) == writer.written:
                    pass
                elif resp.status_code == 200:
                    if writer.written:  # the server ignored Range: start over
                        sink.seek(0)
                        sink.truncate()
                        writer.reset()
                        if on_write is not None:
                            on_write(sink.fileno(), 0)
                    length = resp.headers.get("Content-Length")
                    if length is not None and length.isdigit() and int(length) != descriptor.size:
                        raise SizeMismatch(
                            f"registry announces {length} bytes for blob {descriptor.digest}, descriptor says "
                            f"{descriptor.size}",
                            details={"expected": descriptor.size, "announced": int(length)},
                        )
                else:
                    raise self._error(resp, f"blob {descriptor.digest}", unknown=BlobUnknown)
                try:
                    while True:
                        # Never ask for more than one byte past the descriptor size (the overrun proof).
                        want = min(_CHUNK, descriptor.size + 1 - writer.written)
                        chunk = resp.raw.read(want, decode_content=False)
                        if not chunk:
                            return
                        writer.write(chunk)
                        if on_write is not None:
                            sink.flush()
                            on_write(sink.fileno(), writer.written)
                except _TRANSPORT_ERRORS as exc:
                    if isinstance(exc, OSError) and exc.errno in _LOCAL_DISK_ERRNOS:
                        raise  # our disk is full, not the connection broken: resuming would fail the same way
                    self._deadline.check(f"download of {descriptor.digest}")
                    failures += 1
                    if failures >= self._retry.attempts:
                        raise RegistryUnavailable(f"blob {descriptor.digest} download kept failing: {exc}",
                                                  details={"attempts": failures}) from exc
                    log.info("blob read broke registry=%s digest=%s at=%d, resuming", self.host,
                             descriptor.digest, writer.written)
                    self._sleep(self._deadline.cap(self._retry.backoff(failures)))

    # --- push -------------------------------------------------------------------------------------
    def blob_exists(self, repository: str, digest: Digest, *, push: bool = False) -> bool:
        """HEAD the blob: True if the registry has it in this repository.

        `push=True` asks for a pull+push token, so the check before an upload and the upload share it.
        """
        repo = check_repository(repository)
        url = f"{self.base_url}/v2/{repo}/blobs/{digest}"
        with self._call("HEAD", url, scopes=self._scopes(repo, push)) as resp:
            if resp.status_code == 200:
                return True
            if resp.status_code == 404:
                return False
            raise self._error(resp, f"blob {digest}")

    def upload_blob(
        self,
        repository: str,
        digest: Digest,
        size: int,
        opener: Callable[[], IO[bytes]],
        *,
        mount_from: str | None = None,
        chunk_size: int | None = None,
    ) -> bool:
        """Upload a blob unless the repository already has it; False means it was skipped.

        `opener` returns a fresh stream of exactly `size` bytes each time it is called (a retry
        re-reads from the start). `mount_from` tries a cross-repository mount first; a registry that
        answers 202 simply gets a normal upload in the session it opened. `chunk_size` switches to the
        chunked PATCH protocol (each returned Location is followed; 416 resyncs from the upload status).
        """
        repo = check_repository(repository)
        if self.blob_exists(repo, digest, push=True):
            return False
        failures = 0
        while True:
            try:
                self._upload_once(repo, digest, size, opener, mount_from, chunk_size)
                return True
            except (RegistryUnavailable, RegistryTimeout) as exc:
                self._deadline.check(f"upload of {digest}")
                failures += 1
                if failures >= self._retry.attempts:
                    raise
                log.info("blob upload failed registry=%s digest=%s (%s), restarting", self.host, digest, exc.code)
                self._sleep(self._deadline.cap(self._retry.backoff(failures)))

    def _upload_once(
        self, repo: str, digest: Digest, size: int, opener: Callable[[], IO[bytes]], mount_from: str | None,
        chunk_size: int | None,
    ) -> None:
        scopes = self._scopes(repo, True)
        start = f"{self.base_url}/v2/{repo}/blobs/uploads/"
        if mount_from is not None:
            source = check_repository(mount_from)
            scopes = (*scopes, repository_scope(source, "pull"))
            start += "?" + urlencode({"mount": str(digest), "from": source})
        with self._call("POST", start, scopes=scopes, body=b"", headers={"Content-Length": "0"}) as resp:
            if resp.status_code == 201 and mount_from is not None:
                return
            if resp.status_code != 202 or "Location" not in resp.headers:
                raise self._error(resp, f"upload of {digest}")
            location = urljoin(resp.url, resp.headers["Location"])
            min_chunk = _int_header(resp, "OCI-Chunk-Min-Length")
        if chunk_size is not None:
            location = self._upload_chunks(location, scopes, digest, size, opener, max(chunk_size, min_chunk))
            body: Body = b""
            headers = {"Content-Length": "0", "Content-Type": "application/octet-stream"}
        else:
            body = lambda: _ExactReader(opener(), size)  # noqa: E731 - a fresh stream per attempt
            headers = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        with self._call("PUT", _with_query(location, digest=str(digest)), scopes=scopes, body=body,
                        headers=headers, retry=False) as resp:
            if resp.status_code != 201:
                raise self._error(resp, f"upload of {digest}")
            _check_digest_header(resp, digest)

    def _upload_chunks(
        self, location: str, scopes: tuple[str, ...], digest: Digest, size: int, opener: Callable[[], IO[bytes]],
        chunk_size: int,
    ) -> str:
        offset = 0
        resyncs = 0
        stream = opener()
        try:
            while offset < size:
                stream.seek(offset)
                data = stream.read(min(chunk_size, size - offset))
                if not data:
                    raise SizeMismatch(f"blob {digest} stream ended at {offset} of {size} bytes")
                moved = self._patch_chunk(location, scopes, offset, data, f"chunk upload of {digest}")
                if moved is None:
                    resyncs += 1
                    if resyncs > 3:
                        raise RegistryError(f"chunk upload of {digest} keeps getting 416", details={"status": 416})
                    location, offset = self._upload_status(location, scopes)
                    continue
                location = moved
                offset += len(data)
        finally:
            stream.close()
        return location

    def _patch_chunk(self, location: str, scopes: tuple[str, ...], offset: int, data: bytes, what: str
                     ) -> str | None:
        """PATCH one chunk at `offset`: the Location to continue at, or None when the registry answered 416."""
        headers = {"Content-Type": "application/octet-stream", "Content-Length": str(len(data)),
                   "Content-Range": f"{offset}-{offset + len(data) - 1}"}
        with self._call("PATCH", location, scopes=scopes, body=data, headers=headers, retry=False) as resp:
            if resp.status_code == 416:
                return None
            if resp.status_code != 202:
                raise self._error(resp, what)
            return urljoin(resp.url, resp.headers.get("Location", location))

    def _patch_stream(self, location: str, scopes: tuple[str, ...], body: Streamed, what: str
                      ) -> tuple[str, int | None]:
        """PATCH a streamed body: the Location to continue at, and the bytes the registry holds by its `Range`."""
        with self._call("PATCH", location, scopes=scopes, body=body, retry=False,
                        headers={"Content-Type": "application/octet-stream"}) as resp:
            if resp.status_code != 202:
                raise self._error(resp, what)
            return urljoin(resp.url, resp.headers.get("Location", location)), _held_bytes(resp)

    def open_upload(self, repository: str) -> BlobUpload:
        """Open an upload session for a blob whose digest is not known yet (it is being produced): the
        caller appends its bytes in order and names the digest only at `BlobUpload.commit`."""
        repo = check_repository(repository)
        scopes = self._scopes(repo, True)
        with self._call("POST", f"{self.base_url}/v2/{repo}/blobs/uploads/", scopes=scopes, body=b"",
                        headers={"Content-Length": "0"}) as resp:
            if resp.status_code != 202 or "Location" not in resp.headers:
                raise self._error(resp, f"upload session in {repo}")
            return BlobUpload(self, repo, scopes, urljoin(resp.url, resp.headers["Location"]))

    def _upload_status(self, location: str, scopes: tuple[str, ...]) -> tuple[str, int]:
        """GET the upload session: where to continue and how many bytes the registry holds."""
        with self._call("GET", location, scopes=scopes) as resp:
            if resp.status_code != 204:
                raise self._error(resp, "upload status")
            # Unknown is read as 0, the safe reading (a wrong guess costs a 416 and another resync, bounded by
            # the caller).
            return urljoin(resp.url, resp.headers.get("Location", location)), _held_bytes(resp) or 0

    def put_manifest(self, repository: str, reference: str, media_type: str, body: bytes) -> Digest:
        """PUT a manifest or index under a tag (or its digest); returns the sha256 digest of `body`."""
        repo = check_repository(repository)
        ref_text = str(Digest.parse(reference)) if ":" in reference else check_tag(reference)
        declared = load_json_object(body, what="manifest").get("mediaType")
        if declared is not None and declared != media_type:
            raise InvalidManifest(f"manifest declares {declared!r} but is pushed as {media_type!r}")
        digest = Digest.of(body)
        url = f"{self.base_url}/v2/{repo}/manifests/{ref_text}"
        with self._call("PUT", url, scopes=self._scopes(repo, True), body=body,
                        headers={"Content-Type": media_type}) as resp:
            if resp.status_code not in (200, 201):
                raise self._error(resp, f"manifest {repo}:{ref_text}", unknown=ManifestUnknown)
            _check_digest_header(resp, digest)
        return digest

    # --- HTTP machinery ---------------------------------------------------------------------------
    @staticmethod
    def _scopes(repo: str, push: bool) -> tuple[str, ...]:
        return (repository_scope(repo, "pull", "push") if push else repository_scope(repo, "pull"),)

    @contextmanager
    def _call(
        self,
        method: str,
        url: str,
        *,
        scopes: tuple[str, ...],
        headers: dict[str, str] | None = None,
        body: Body = None,
        retry: bool = True,
    ) -> Iterator[requests.Response]:
        """One registry request with auth challenges, redirects, retries; the response is closed after use."""
        resp = self._send(method, url, scopes=scopes, headers=headers or {}, body=body, retry=retry)
        used = False
        try:
            yield resp
            used = True
        except _TRANSPORT_ERRORS as exc:
            if isinstance(exc, OSError) and exc.errno in _LOCAL_DISK_ERRNOS:
                raise  # the caller's disk, not the registry: not a transient fault to retry
            if self._deadline.expired:
                raise RegistryTimeout(f"{method} {_path(url)} was cut off at the deadline") from exc
            raise RegistryUnavailable(f"{method} {_path(url)} on {_host(url)} broke off: {exc}") from exc
        finally:
            # After a failure the connection is suspect (and may be stalled): it is closed, not reused.
            if used:
                _release(resp)
            else:
                resp.close()

    def _send(
        self, method: str, url: str, *, scopes: tuple[str, ...] | None, headers: dict[str, str], body: Body,
        retry: bool = True, auth: _Auth | None = None,
    ) -> requests.Response:
        failures = 0
        auth_rounds = 0
        fresh_token = False
        while True:
            self._deadline.check(f"{method} {_path(url)}")
            if scopes is not None:
                auth = self._registry_auth(scopes)
            try:
                resp = self._exchange(method, url, headers, body, auth)
                if self._deadline.expired:
                    # The watchdog cut the socket: what arrived may be a truncated head parsed leniently.
                    resp.close()
                    raise RegistryTimeout(f"{method} {_path(url)} was cut off at the deadline")
            except requests.exceptions.SSLError as exc:
                if self._deadline.expired:
                    raise RegistryTimeout(f"{method} {_path(url)} was cut off at the deadline") from exc
                raise RegistryError(f"TLS error talking to {_host(url)}: {exc}", details={"host": _host(url)}) from exc
            except _TRANSPORT_ERRORS as exc:
                if self._deadline.expired:
                    raise RegistryTimeout(f"{method} {_path(url)} was cut off at the deadline") from exc
                failures += 1
                if not retry or failures >= self._retry.attempts:
                    raise RegistryUnavailable(f"{method} {_path(url)} on {_host(url)} failed: {exc}",
                                              details={"attempts": failures}) from exc
                self._sleep(self._deadline.cap(self._retry.backoff(failures)))
                continue

            if resp.status_code == 401 and scopes is not None and _origin(resp.url) == self._origin:
                challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
                # A token fetched for this very request that still lacks the scope is the token
                # service's answer, not a glitch: asking again would only loop.
                refused_fresh = fresh_token and any(c.params.get("error") == "insufficient_scope"
                                                    for c in challenges)
                if auth_rounds >= _MAX_AUTH_ROUNDS or not challenges or refused_fresh:
                    return resp  # the caller turns it into unauthorized/denied
                _discard(resp)
                auth_rounds += 1
                with self._auth_lock:
                    # Threads that hit the same 401 together: the first fetches, the rest reuse its answer.
                    if self._registry_auth(scopes) == auth:
                        fresh_token = self._authenticate(challenges, scopes)
                    else:
                        fresh_token = False
                continue

            if resp.status_code in RETRYABLE_STATUSES and retry:
                failures += 1
                wait = parse_retry_after(resp.headers.get("Retry-After"))
                status = resp.status_code
                if failures >= self._retry.attempts:
                    _discard(resp)
                    raise RegistryUnavailable(f"{method} {_path(url)} answered {status} {failures} times",
                                              details={"status": status, "attempts": failures})
                if wait is not None:
                    remaining = self._deadline.remaining()
                    if wait > self._retry.max_retry_after or (remaining is not None and wait > remaining):
                        _discard(resp)
                        raise RegistryUnavailable(
                            f"registry asked to retry after {wait:g}s, beyond this client's budget",
                            details={"status": status, "retry_after": wait},
                        )
                else:
                    wait = self._retry.backoff(failures)
                _discard(resp)
                log.info("registry=%s %s %s answered %d, retry %d in %.2fs", self.host, method, _path(url), status,
                         failures, wait)
                self._sleep(self._deadline.cap(wait))
                continue
            return resp

    def _exchange(self, method: str, url: str, headers: dict[str, str], body: Body,
                  auth: _Auth | None) -> requests.Response:
        """Send once, following redirects by hand: each hop is checked by the host policy, and the
        Authorization header goes only to the origin it was issued for (never across hosts)."""
        for _ in range(_MAX_REDIRECTS + 1):
            self.policy.check_url(url)
            hop_headers = dict(headers)
            if auth is not None and _origin(url) == auth.origin:
                hop_headers["Authorization"] = auth.header
            data = body() if callable(body) else body
            try:
                resp = self._session.request(
                    method, url, headers=hop_headers, data=data, stream=True, allow_redirects=False,
                    timeout=(self._deadline.cap(self._timeouts.connect), self._deadline.cap(self._timeouts.read)),
                )
            finally:
                if data is not None and not isinstance(data, (bytes, Streamed)):
                    data.close()
            if resp.status_code not in _REDIRECTS or "Location" not in resp.headers:
                return resp
            target = urljoin(url, resp.headers["Location"])
            _discard(resp)
            log.debug("redirect %s %s -> %s", method, _path(url), _host(target))
            if resp.status_code == 303 or (resp.status_code in (301, 302) and method not in ("GET", "HEAD")):
                method, body = "GET", None
                headers = {k: v for k, v in headers.items() if k.lower() not in ("content-length", "content-type")}
            url = target
        raise RegistryError(f"more than {_MAX_REDIRECTS} redirects", details={"host": _host(url)})

    def _registry_auth(self, scopes: Sequence[str]) -> _Auth | None:
        token = self._tokens.get(scopes)
        if token is not None:
            return _Auth(self._origin, f"Bearer {token}")
        if self._basic and self._credentials is not None:
            return _Auth(self._origin, self._credentials.basic_header())
        return None

    def _authenticate(self, challenges: Sequence[Challenge], scopes: tuple[str, ...]) -> bool:
        """Answer a 401: fetch a fresh bearer token for `scopes` (True), or switch to Basic (False)."""
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None:
            self._tokens.drop(scopes)
            token, expires_in = self._fetch_token(bearer, scopes)
            self._tokens.put(scopes, token, expires_in)
            return True
        if any(c.scheme == "basic" for c in challenges):
            if self._credentials is None:
                raise Unauthorized(f"registry {self.host} requires credentials")
            if self._basic:
                raise Unauthorized(f"registry {self.host} rejected the credentials for {self._credentials.username!r}")
            self._basic = True
            return False
        raise Unauthorized(f"registry {self.host} asked for unsupported auth scheme {challenges[0].scheme!r}")

    def _fetch_token(self, challenge: Challenge, scopes: tuple[str, ...]) -> tuple[str, float]:
        realm = challenge.params.get("realm", "")
        if not realm:
            raise Unauthorized(f"registry {self.host} sent a Bearer challenge without a realm")
        # The realm is chosen by the server: it gets the same scrutiny as the registry itself.
        self.policy.check_url(realm)
        # Our scopes name what the request needs; the challenge's are added only for other resources.
        ours = {s.rpartition(":")[0] for s in scopes}
        wanted = [*scopes, *(s for s in challenge.scopes if s.rpartition(":")[0] not in ours)]
        query: list[tuple[str, str]] = []
        if "service" in challenge.params:
            query.append(("service", challenge.params["service"]))
        query += [("scope", s) for s in wanted]
        auth = None
        if self._credentials is not None:
            query.append(("account", self._credentials.username))
            auth = _Auth(_origin(realm), self._credentials.basic_header())
        url = _with_query(realm, *query)
        resp = self._send("GET", url, scopes=None, headers={"Accept": "application/json"}, body=None, auth=auth)
        try:
            if resp.status_code in (401, 403):
                who = f"the credentials for {self._credentials.username!r}" if self._credentials else "anonymous access"
                raise Unauthorized(f"token service of {self.host} rejected {who}",
                                   details={"status": resp.status_code})
            if resp.status_code != 200:
                raise RegistryError(f"token service of {self.host} answered {resp.status_code}",
                                    details={"status": resp.status_code})
            doc = load_json_object(_read_capped(resp, _MAX_TOKEN_RESPONSE_BYTES, what="token response"),
                                   what="token response")
        except InvalidManifest as exc:
            raise Unauthorized(f"token service of {self.host} sent an unreadable response: {exc.message}") from exc
        finally:
            resp.close()
        token = doc.get("token") or doc.get("access_token")
        if not is_valid_bearer_token(token):
            raise Unauthorized(f"token service of {self.host} returned no usable token")
        assert isinstance(token, str)
        expires_in = doc.get("expires_in")
        # The token spec's default lifetime when the field is absent or nonsense.
        if isinstance(expires_in, bool) or not isinstance(expires_in, int | float) or expires_in <= 0:
            expires_in = 60
        return token, float(expires_in)

    def _error(self, resp: requests.Response, what: str, *, unknown: type[RegistryError] = RegistryError
               ) -> NitroconvError:
        """Turn a final non-success response into a typed error (the body is read, capped, for its message)."""
        status = resp.status_code
        codes, message = _registry_errors(resp)
        details: dict[str, object] = {"status": status, "registry_codes": codes}
        suffix = f": {message}" if message else ""
        if status == 401:
            challenges = parse_challenges(resp.headers.get("WWW-Authenticate", ""))
            if any(c.params.get("error") == "insufficient_scope" for c in challenges) and self._credentials:
                return Denied(f"{what}: access denied by {self.host} (insufficient scope){suffix}", details=details)
            return Unauthorized(f"{what}: not authorized by {self.host}{suffix}", details=details)
        if status == 403:
            return Denied(f"{what}: access denied by {self.host}{suffix}", details=details)
        if status == 404:
            return unknown(f"{what} not found on {self.host}{suffix}", details=details)
        if status == 413:
            return LimitExceeded(f"{what}: {self.host} refused it as too large{suffix}", details=details)
        if status >= 500 or status == 429:
            return RegistryUnavailable(f"{what}: {self.host} answered {status}{suffix}", details=details)
        return RegistryError(f"{what}: {self.host} answered {status}{suffix}", details=details)


class BlobUpload:
    """An upload session (POST, a streamed PATCH, PUT ?digest=) for a blob produced while it is sent.

    Nothing is retried here: a PATCH the registry did not take leaves the session in an unknown state,
    and its owner is expected to `cancel()` it and upload the whole blob another way.
    """

    def __init__(self, client: RegistryClient, repository: str, scopes: tuple[str, ...], location: str) -> None:
        self._client, self.repository, self._scopes = client, repository, scopes
        self.location = location
        self.offset = 0

    def stream(self, parts: Iterable[bytes]) -> None:
        """Send the rest of the blob as one PATCH whose body is `parts` as they come (chunked transfer encoding).

        This is how `docker push` sends a layer, so every registry that takes a push takes it, whatever it asks
        of separate chunks (ECR's parts but the last must be 5 MiB); and it is one request, not one per chunk.
        Raising from `parts` aborts the request; the session is then in an unknown state (`cancel()` it)."""
        body = Streamed(parts)
        moved, held = self._client._patch_stream(self.location, self._scopes, body,
                                                 f"streamed upload in {self.repository}")
        self.location = moved
        self.offset += body.sent
        # Unknown is not checked: the digest named at the closing PUT is what the registry verifies in the end.
        if held is not None and held != self.offset:
            raise RegistryError(f"the registry holds {held} bytes of the {self.offset} sent in {self.repository}",
                                details={"held": held, "sent": self.offset})

    def commit(self, digest: Digest) -> None:
        """Close the session as `digest`; the registry checks that the bytes received hash to it."""
        url = _with_query(self.location, digest=str(digest))
        with self._client._call("PUT", url, scopes=self._scopes, body=b"", retry=False,
                                headers={"Content-Length": "0", "Content-Type": "application/octet-stream"}) as resp:
            if resp.status_code != 201:
                raise self._client._error(resp, f"upload of {digest}")
            _check_digest_header(resp, digest)

    def cancel(self) -> None:
        """DELETE the session, best effort: a registry that cannot also expires it by itself."""
        try:
            with self._client._call("DELETE", self.location, scopes=self._scopes, retry=False):
                pass
        except NitroconvError as exc:
            log.info("upload session in %s not deleted: %s", self.repository, exc.code)


# --- helpers ----------------------------------------------------------------------------------------
class _ExactReader:
    """Presents exactly `size` bytes of a stream to requests (with a length, so no chunked encoding)."""

    def __init__(self, raw: IO[bytes], size: int) -> None:
        self._raw = raw
        self._left = size
        self._size = size

    def __len__(self) -> int:
        return self._size

    def read(self, n: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        data = self._raw.read(self._left if n is None or n < 0 else min(n, self._left))
        if not data:
            raise SizeMismatch(f"upload stream ended {self._left} bytes short of {self._size}")
        self._left -= len(data)
        return data

    def close(self) -> None:
        self._raw.close()


def _read_capped(resp: requests.Response, cap: int, *, what: str) -> bytes:
    length = resp.headers.get("Content-Length")
    if length is not None and length.isdigit() and int(length) > cap:
        raise LimitExceeded(f"{what} is {length} bytes, limit is {cap}", details={"limit": cap})
    buf = bytearray()
    while len(buf) <= cap:
        chunk = resp.raw.read(min(_CHUNK, cap + 1 - len(buf)), decode_content=False)
        if not chunk:
            return bytes(buf)
        buf += chunk
    raise LimitExceeded(f"{what} is larger than {cap} bytes", details={"limit": cap})


def _discard(resp: requests.Response) -> None:
    """Drop a response we will not use; a small body is drained so the connection can be reused."""
    try:
        resp.raw.read(_MAX_ERROR_BODY_BYTES, decode_content=False)
    except _TRANSPORT_ERRORS:
        pass
    resp.close()


def _held_bytes(resp: requests.Response) -> int | None:
    """How many bytes an upload session holds by the answer's `Range: 0-<last>`; None when unknown: no header,
    or distribution's "0-0", which it says for both 0 and 1 byte received."""
    end = resp.headers.get("Range", "").rpartition("-")[2]
    return int(end) + 1 if end.isdigit() and int(end) > 0 else None


def _release(resp: requests.Response) -> None:
    """Close a response that served its purpose, keeping its connection for the next request.

    urllib3 pools a connection only once its response has been read to the end and closes it otherwise, so
    every answer with a body nobody reads (a 202 to each PATCH of an upload, a 201, a HEAD's) used to cost the
    next request a new TCP and TLS handshake. What is left of a body declared small is read first; a large
    rest (a blob its reader stopped in) is not worth its bytes, and that connection is closed."""
    length = resp.headers.get("Content-Length")
    small = resp.request.method == "HEAD" or (length is not None and length.isdigit()
                                              and int(length) <= _MAX_ERROR_BODY_BYTES)
    if small:
        _discard(resp)
    else:
        resp.close()


def _registry_errors(resp: requests.Response) -> tuple[list[str], str]:
    """The distribution-spec `errors[]` codes and first message, if the body has them."""
    try:
        doc = load_json_object(_read_capped(resp, _MAX_ERROR_BODY_BYTES, what="error body"), what="error body")
    except NitroconvError:
        return [], ""
    except _TRANSPORT_ERRORS:
        return [], ""
    errors = doc.get("errors")
    if not isinstance(errors, list):
        return [], ""
    codes = [str(e.get("code"))[:64] for e in errors if isinstance(e, dict) and e.get("code")]
    first = next((e.get("message") for e in errors if isinstance(e, dict) and isinstance(e.get("message"), str)), "")
    message = "".join(c if c.isprintable() else "?" for c in str(first))[:300]
    return codes, f"{', '.join(codes)} {message}".strip()


def _check_digest_header(resp: requests.Response, digest: Digest) -> None:
    header = resp.headers.get("Docker-Content-Digest")
    if header and header.strip() != str(digest):
        raise DigestMismatch(f"registry stored {header.strip()[:140]} for {digest}",
                             details={"expected": str(digest), "registry": header.strip()[:140]})


def _range_start(resp: requests.Response) -> int | None:
    value = resp.headers.get("Content-Range", "")  # "bytes 100-199/200"
    start = value.removeprefix("bytes ").split("-", 1)[0]
    return int(start) if start.isdigit() else None


def _int_header(resp: requests.Response, name: str) -> int:
    value = resp.headers.get(name, "")
    return int(value) if value.isdigit() else 0


def _with_query(url: str, *pairs: tuple[str, str], **params: str) -> str:
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True) + list(pairs) + list(params.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


def _origin(url: str) -> _Origin:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or (443 if scheme == "https" else 80)


def _host(url: str) -> str:
    return urlsplit(url).netloc


def _path(url: str) -> str:
    return urlsplit(url).path

