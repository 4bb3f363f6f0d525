"""Content digests: the accepted grammar, hashing, and readers that verify size and digest as they stream."""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import IO, Protocol

from common.errors import DigestMismatch, InvalidDigest, SizeMismatch

# Only registered algorithms with a fixed lowercase-hex encoding. The OCI grammar allows more, but an
# algorithm we cannot compute is one we cannot verify, and every digest ends up in a URL or a path.
HEX_LENGTHS: dict[str, int] = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")


class _Hash(Protocol):
    def update(self, data: bytes, /) -> None: ...

    def hexdigest(self) -> str: ...


@dataclass(frozen=True, order=True)
class Digest:
    """A validated `algorithm:hex` digest; construct with `Digest.parse` or `Digest.of`."""

    algorithm: str
    hex: str

    def __post_init__(self) -> None:
        length = HEX_LENGTHS.get(self.algorithm)
        if length is None:
            raise InvalidDigest(
                f"unsupported digest algorithm {self.algorithm[:20]!r}", details={"algorithm": self.algorithm[:20]}
            )
        if len(self.hex) != length or not _HEX.fullmatch(self.hex):
            raise InvalidDigest(
                f"malformed {self.algorithm} digest: expected {length} lowercase hex characters",
                details={"digest": f"{self.algorithm}:{self.hex[:140]}"},
            )

    @classmethod
    def parse(cls, text: object) -> Digest:
        """Parse `sha256:<64 hex>` or `sha512:<128 hex>`; anything else raises `InvalidDigest`."""
        if not isinstance(text, str):
            raise InvalidDigest("digest must be a string")
        algorithm, sep, hexpart = text.partition(":")
        if not sep:
            raise InvalidDigest("digest must look like algorithm:hex", details={"digest": text[:140]})
        return cls(algorithm, hexpart)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        """The digest of `data` under `algorithm`."""
        hasher = new_hasher(algorithm)
        hasher.update(data)
        return cls(algorithm, hasher.hexdigest())

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def matches(self, data: bytes) -> bool:
        """True if `data` hashes to this digest."""
        return Digest.of(data, self.algorithm) == self


def new_hasher(algorithm: str) -> _Hash:
    """A fresh hashlib object for one of the accepted algorithms."""
    if algorithm not in HEX_LENGTHS:
        raise InvalidDigest(f"unsupported digest algorithm {algorithm[:20]!r}")
    return hashlib.new(algorithm)


def verify_bytes(data: bytes, expected: Digest, size: int | None = None, *, what: str = "content") -> None:
    """Check `data` against a descriptor's size (first: it is cheap) and digest."""
    if size is not None and len(data) != size:
        raise SizeMismatch(
            f"{what} is {len(data)} bytes, descriptor says {size}",
            details={"expected": size, "actual": len(data), "digest": str(expected)},
        )
    actual = Digest.of(data, expected.algorithm)
    if actual != expected:
        raise DigestMismatch(
            f"{what} hashes to {actual}, expected {expected}",
            details={"expected": str(expected), "actual": str(actual)},
        )


class VerifyingWriter:
    """Counts and hashes bytes as they are written through it; `verify()` at the end.

    Size is enforced while writing, so a blob that is longer than its descriptor is stopped at
    the first excess byte instead of filling the disk.
    """

    def __init__(self, sink: IO[bytes], expected: Digest, size: int, *, what: str = "blob") -> None:
        self._sink = sink
        self._expected = expected
        self._size = size
        self._what = what
        self._hasher = new_hasher(expected.algorithm)
        self.written = 0

    def write(self, chunk: bytes) -> None:
        if self.written + len(chunk) > self._size:
            raise SizeMismatch(
                f"{self._what} {self._expected} is longer than its descriptor size {self._size}",
                details={"expected": self._size, "actual_at_least": self.written + len(chunk)},
            )
        self._hasher.update(chunk)
        self._sink.write(chunk)
        self.written += len(chunk)

    def reset(self) -> None:
        """Forget everything written (the caller truncated the sink to restart a download)."""
        self._hasher = new_hasher(self._expected.algorithm)
        self.written = 0

    def verify(self) -> Digest:
        """Raise `SizeMismatch`/`DigestMismatch` unless exactly the described bytes went through."""
        if self.written != self._size:
            raise SizeMismatch(
                f"{self._what} {self._expected} ended after {self.written} bytes, descriptor says {self._size}",
                details={"expected": self._size, "actual": self.written},
            )
        actual = Digest(self._expected.algorithm, self._hasher.hexdigest())
        if actual != self._expected:
            raise DigestMismatch(
                f"{self._what} hashes to {actual}, expected {self._expected}",
                details={"expected": str(self._expected), "actual": str(actual)},
            )
        return actual


class HashingReader:
    """Wraps a binary stream; hashes and counts everything read through it."""

    def __init__(self, raw: IO[bytes], algorithm: str = "sha256") -> None:
        self._raw = raw
        self._algorithm = algorithm
        self._hasher = new_hasher(algorithm)
        self.count = 0

    def read(self, size: int = -1, /) -> bytes:
        chunk = self._raw.read(size)
        self._hasher.update(chunk)
        self.count += len(chunk)
        return chunk

    def digest(self) -> Digest:
        return Digest(self._algorithm, self._hasher.hexdigest())
