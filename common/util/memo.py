"""A bounded LRU map for one process's threads: what a worker keeps in memory between conversions."""
from __future__ import annotations

import collections
import os
import threading
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

V = TypeVar("V")


def file_identity(path: str | os.PathLike[str]) -> tuple[int, int, int, int, int]:
    """(device, inode, size, mtime, ctime) in ns: any rewrite or replacement of the file changes it, so what a
    process worked out from the file's bytes can be kept under it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns


class ProcessMemo(Generic[V]):
    """At most `capacity` entries and `max_weight` in all (each entry weighs `weigh(value)`); least recently
    used first out. Safe across threads; a forked child starts with a free lock whatever the parent did."""

    def __init__(self, *, capacity: int, max_weight: int | None = None,
                 weigh: Callable[[V], int] = lambda _: 0) -> None:
        self._capacity = capacity
        self._max_weight = max_weight
        self._weigh = weigh
        self._weight = 0
        self._entries: collections.OrderedDict[Hashable, V] = collections.OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0  # lookups answered, for tests and the bench
        os.register_at_fork(after_in_child=self._reset_lock)

    def _reset_lock(self) -> None:
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
                self.hits += 1
            return found

    def put(self, key: Hashable, value: V) -> None:
        weight = self._weigh(value)
        if self._max_weight is not None and weight > self._max_weight:
            return
        with self._lock:
            old = self._entries.pop(key, None)
            if old is not None:
                self._weight -= self._weigh(old)
            self._entries[key] = value
            self._weight += weight
            while len(self._entries) > self._capacity or (
                    self._max_weight is not None and self._weight > self._max_weight):
                _, evicted = self._entries.popitem(last=False)
                self._weight -= self._weigh(evicted)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._weight = 0
            self.hits = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def weight(self) -> int:
        return self._weight
