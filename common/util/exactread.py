"""Exact-length reads from a stream with position tracking, shared by the cpio and EIF readers."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import BinaryIO

# Bounds one read so a huge declared length never becomes one huge allocation.
CHUNK_SIZE = 1 << 20


class ExactReader:
    """Reads exactly what is asked or raises the format's own truncation error, naming where it broke."""

    def __init__(self, stream: BinaryIO, truncated: Callable[[str, int], Exception]) -> None:
        self._stream = stream
        self._truncated = truncated
        self.offset = 0

    def read_exact(self, n: int, what: str) -> bytes:
        parts: list[bytes] = []
        missing = n
        while missing:
            piece = self._stream.read(min(missing, CHUNK_SIZE))
            if not piece:
                raise self._truncated(what, self.offset + n - missing)
            parts.append(piece)
            missing -= len(piece)
        self.offset += n
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def read_some(self, n: int) -> bytes:
        piece = self._stream.read(n)
        self.offset += len(piece)
        return piece

    def chunks(self, n: int, what: str) -> Iterator[bytes]:
        while n:
            piece = self.read_exact(min(n, CHUNK_SIZE), what)
            n -= len(piece)
            yield piece

    def at_eof(self) -> bool:
        return not self._stream.read(1)
