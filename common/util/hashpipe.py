"""Hashing in a background thread, fed in order: hashlib releases the GIL on large buffers, so a hash can run
on another core while the caller produces the next chunk."""
from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from common.util.gather import Gather


class Hasher(Protocol):
    def update(self, data: bytes, /) -> None: ...


_STOP = object()
# Chunks queued ahead of the hashing thread: enough to ride out a slow update, and every chunk held here is
# memory the worker holds at its peak (a layer's write passes each 1 MiB block through three pipes).
DEFAULT_DEPTH = 2


class HashPipe:
    """Owns `hasher` until `finish()`: `update()` queues data (bounded; with `gather`, pieces smaller than that
    are joined first and handed over once they add up to it), `call()` queues a function run on the hasher
    between updates (say, a snapshot with `copy()`), both in call order.

    Use as a context manager or call `finish()`/`abort()`: either ends the thread. An exception raised in
    the thread is raised again by the next `update()`, `call()` or `finish()`.
    """

    def __init__(self, hasher: Hasher, *, name: str = "nitroconv-hash", depth: int = DEFAULT_DEPTH,
                 gather: int = 0) -> None:
        self._hasher = hasher
        self._queue: queue.Queue[object] = queue.Queue(maxsize=depth)
        # Pieces smaller than `gather` are joined into one item of about that size: a queue item is a hand-off
        # between two threads (a wake-up, and the GIL changing hands), too dear to pay per small file.
        self._gather = Gather(gather) if gather else None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP:
                return
            if self._error is not None:
                continue  # keep draining so a blocked producer is released
            try:
                if isinstance(item, bytes | bytearray | memoryview):
                    self._hasher.update(item)
                else:
                    item(self._hasher)  # type: ignore[operator]
            except BaseException as exc:  # handed to the producer's thread
                self._error = exc

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if not self._thread.is_alive():
            raise RuntimeError("hash pipe is closed")

    def update(self, data: bytes) -> None:
        self._check()
        if self._gather is None:
            self._queue.put(data)
            return
        for piece in self._gather.push(data):
            self._queue.put(piece)

    def _put_held(self) -> None:
        if self._gather is not None:
            for piece in self._gather.rest():
                self._queue.put(piece)

    def call(self, fn: Callable[[Any], None]) -> None:
        self._check()
        self._put_held()
        self._queue.put(fn)

    def finish(self) -> Any:
        """Wait for everything queued to be hashed; returns the hasher."""
        if self._thread.is_alive():
            self._put_held()
        self._stop()
        if self._error is not None:
            raise self._error
        return self._hasher

    def abort(self) -> None:
        """Stop without caring for the result (on an error path)."""
        self._stop()

    def _stop(self) -> None:
        if self._thread.is_alive():
            self._queue.put(_STOP)
            self._thread.join()

    def __enter__(self) -> HashPipe:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is None and self._thread.is_alive():
            self._put_held()
        self._stop()


class Writes:
    """A file as a `HashPipe` hasher: each update is a write, so the pipe's thread does the file's writes (the
    kernel's copy releases the GIL) while the producer goes on."""

    def __init__(self, out: Any) -> None:
        self._out = out

    def update(self, data: bytes, /) -> None:
        self._out.write(data)

    def write(self, data: bytes, /) -> int:
        self._out.write(data)
        return len(data)
