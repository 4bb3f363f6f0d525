"""The helper threads of the one-pass pipeline: the layer read-ahead (common/image/tarstream.py) and hashing in a
thread (common/util/hashpipe.py): order, errors at their place in the stream, and no thread left behind."""
from __future__ import annotations

import hashlib
import io
import random
import threading
import time

import pytest

from common.image.tarstream import READAHEAD, CountingSource, ReadAhead
from common.util.hashpipe import HashPipe


def live(prefix: str) -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix)]


class Failing(io.RawIOBase):
    """Yields `good` bytes, then raises."""

    def __init__(self, good: bytes) -> None:
        self._data, self.reads = io.BytesIO(good), 0

    def readable(self) -> bool:
        return True

    def read(self, size: int = -1) -> bytes:  # type: ignore[override]
        self.reads += 1
        data = self._data.read(size)
        if not data:
            raise ValueError("broken stream")
        return data


def test_readahead_gives_every_byte_in_order() -> None:
    data = random.Random(5).randbytes(3 * READAHEAD + 17)
    with ReadAhead(io.BytesIO(data)) as ahead:
        source = CountingSource(ahead, lambda n: None)  # type: ignore[arg-type]
        got = b"".join(iter(lambda: source.read(10240), b""))
    assert got == data and source.count == len(data)
    assert live("nitroconv-readahead") == []


def test_readahead_raises_at_the_failing_place() -> None:
    good = b"x" * (2 * READAHEAD)
    with ReadAhead(Failing(good)) as ahead:  # type: ignore[arg-type]
        assert ahead.read(READAHEAD) + ahead.read(READAHEAD) == good
        with pytest.raises(ValueError, match="broken stream"):
            ahead.read(READAHEAD)
        assert ahead.read(READAHEAD) == b""
    assert live("nitroconv-readahead") == []


def test_readahead_close_stops_a_blocked_reader() -> None:
    """The consumer gives up early: the thread, blocked on a full queue, is stopped and joined."""
    raw = Failing(b"y" * (20 * READAHEAD))
    ahead = ReadAhead(raw, depth=2)  # type: ignore[arg-type]
    ahead.read(1)
    time.sleep(0.2)
    ahead.close()
    assert live("nitroconv-readahead") == []
    assert raw.reads < 20, "it stopped reading instead of draining the stream"


def test_readahead_read_all() -> None:
    data = b"z" * (READAHEAD + 3)
    with ReadAhead(io.BytesIO(data)) as ahead:
        assert ahead.read() == data


def test_hashpipe_hashes_in_order_and_runs_calls_between_updates() -> None:
    pieces = [random.Random(i).randbytes(100_000) for i in range(20)]
    snapshots: list[str] = []
    with HashPipe(hashlib.sha384()) as pipe:
        for i, piece in enumerate(pieces):
            pipe.update(piece)
            if i == 9:
                pipe.call(lambda h: snapshots.append(h.copy().hexdigest()))
        result = pipe.finish().hexdigest()
    assert result == hashlib.sha384(b"".join(pieces)).hexdigest()
    assert snapshots == [hashlib.sha384(b"".join(pieces[:10])).hexdigest()]
    assert live("nitroconv-hash") == []


def test_hashpipe_error_reaches_the_producer() -> None:
    class Broken:
        def update(self, data: bytes) -> None:
            raise RuntimeError("hasher broke")

    pipe = HashPipe(Broken(), depth=1)
    with pytest.raises(RuntimeError, match="hasher broke"):
        for _ in range(100):
            pipe.update(b"data" * 1000)
        pipe.finish()
    pipe.abort()
    assert live("nitroconv-hash") == []
