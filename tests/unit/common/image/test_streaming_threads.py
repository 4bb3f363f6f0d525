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


class Recorder:
    """A hasher that keeps what it was given, piece by piece."""

    def __init__(self) -> None:
        self.pieces: list[bytes] = []

    def update(self, data: bytes) -> None:
        self.pieces.append(bytes(data))


def test_hashpipe_gathers_small_pieces_and_keeps_the_order() -> None:
    rng = random.Random(7)
    small = [rng.randbytes(rng.randrange(1, 300)) for _ in range(400)]
    large = rng.randbytes(5000)
    seen_at_call: list[int] = []
    recorder = Recorder()
    pipe = HashPipe(recorder, gather=1000)
    for piece in small[:200]:
        pipe.update(piece)
    pipe.update(large)  # what was gathered goes first, then the large piece as it is
    pipe.call(lambda r: seen_at_call.append(sum(map(len, r.pieces))))
    for piece in small[200:]:
        pipe.update(piece)
    pipe.finish()  # hands over the rest
    sent = b"".join(small[:200]) + large + b"".join(small[200:])
    assert b"".join(recorder.pieces) == sent
    assert seen_at_call == [len(b"".join(small[:200])) + len(large)]
    assert large in recorder.pieces
    # Every piece but the ones cut short by the large piece, the call and the finish holds 1000 bytes or more.
    assert sum(len(p) < 1000 for p in recorder.pieces) <= 3
    assert len(recorder.pieces) < 80
    assert live("nitroconv-hash") == []


def test_hashpipe_hands_over_what_it_gathered_when_its_block_ends() -> None:
    recorder = Recorder()
    with HashPipe(recorder, gather=1 << 20) as pipe:
        pipe.update(b"a" * 10)
        pipe.update(b"b" * 10)
    assert recorder.pieces == [b"a" * 10 + b"b" * 10]

    recorder = Recorder()
    with pytest.raises(KeyError), HashPipe(recorder, gather=1 << 20) as pipe:
        pipe.update(b"dropped")
        raise KeyError("the producer failed")
    assert recorder.pieces == []  # a failed producer's partial piece is not passed on
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
