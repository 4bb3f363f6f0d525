"""Split virtqueues (virtio 1.x §2.7) read and written in the guest memory the front-end shared.

Only the features the back-end offers are handled: no indirect descriptors, no event index, so the
device signals the call eventfd after using buffers unless the driver set VRING_AVAIL_F_NO_INTERRUPT.
A guest that points outside its memory or builds a looping chain breaks the queue (GuestMemoryError);
the back-end then stops using it, as a device that "needs reset" would.

The ring indexes are shared with a driver running at the same time, so each is read and written as one
16-bit access (load_u16/store_u16), never with struct's pack_into: that zeroes its target before writing
the value, and a driver polling the used index in between sees it run backwards, then takes stale ring
entries for new ones.
"""

from __future__ import annotations

import mmap
import os
import struct
import sys
from dataclasses import dataclass, field

from worker.emulator.vhostuser import GuestMemory, GuestMemoryError

DESC = struct.Struct("<QIHH")
USED_ELEM = struct.Struct("<II")
DESC_F_NEXT = 1
DESC_F_WRITE = 2
DESC_F_INDIRECT = 4
AVAIL_F_NO_INTERRUPT = 1
MAX_QUEUE_SIZE = 32768
_BIG_ENDIAN_HOST = sys.byteorder != "little"


def _le(value: int) -> int:
    """A u16 between virtio's little-endian order and the host's (the same on x86)."""
    return ((value & 0xFF) << 8) | (value >> 8) if _BIG_ENDIAN_HOST else value


def load_u16(mapping: mmap.mmap, offset: int) -> int:
    """A little-endian u16 of guest memory, in one load."""
    with memoryview(mapping) as whole, whole[offset:offset + 2] as part, part.cast("H") as word:
        return _le(int(word[0]))


def store_u16(mapping: mmap.mmap, offset: int, value: int) -> None:
    """A u16 into guest memory in one 16-bit store: a reader sees the old value or the new, nothing between."""
    with memoryview(mapping) as whole, whole[offset:offset + 2] as part, part.cast("H") as word:
        word[0] = _le(value)


@dataclass
class Chain:
    """One descriptor chain: its head index and its buffers as guest-physical (addr, len) pairs."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)


@dataclass
class VirtQueue:
    index: int
    num: int = 0
    desc_addr: int = 0  # front-end virtual addresses, as SET_VRING_ADDR gives them
    avail_addr: int = 0
    used_addr: int = 0
    last_avail: int = 0
    enabled: bool = False
    kick_fd: int | None = None
    call_fd: int | None = None
    started: bool = False
    broken: bool = False

    def ready(self) -> bool:
        return self.started and self.enabled and not self.broken and self.num > 0

    def _avail_idx(self, mem: GuestMemory) -> int:
        mapping, off = mem.user(self.avail_addr, 4)
        return load_u16(mapping, off + 2)

    def has_avail(self, mem: GuestMemory) -> bool:
        if not self.ready():
            return False
        pending = (self._avail_idx(mem) - self.last_avail) & 0xFFFF
        if pending > self.num:
            raise GuestMemoryError(f"queue {self.index}: avail index ran {pending} entries ahead of a "
                                   f"{self.num}-entry ring")
        return pending > 0

    def pop(self, mem: GuestMemory) -> Chain | None:
        """The next available chain, or None when the driver has offered nothing new."""
        if not self.has_avail(mem):
            return None
        mapping, off = mem.user(self.avail_addr, 4 + 2 * self.num)
        head = load_u16(mapping, off + 4 + 2 * (self.last_avail % self.num))
        chain = Chain(head)
        dmap, doff = mem.user(self.desc_addr, DESC.size * self.num)
        index = head
        for _ in range(self.num):
            if index >= self.num:
                raise GuestMemoryError(f"queue {self.index}: descriptor index {index} out of range")
            addr, length, flags, nxt = DESC.unpack_from(dmap, doff + DESC.size * index)
            if flags & DESC_F_INDIRECT:
                raise GuestMemoryError(f"queue {self.index}: indirect descriptor (not negotiated)")
            if flags & DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise GuestMemoryError(f"queue {self.index}: readable descriptor after a writable one")
            else:
                chain.readable.append((addr, length))
            if not flags & DESC_F_NEXT:
                break
            index = nxt
        else:
            raise GuestMemoryError(f"queue {self.index}: descriptor chain longer than the ring (a loop)")
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return chain

    def unpop(self) -> None:
        """Gives back the chain pop() returned last (nothing was used from it)."""
        self.last_avail = (self.last_avail - 1) & 0xFFFF

    def push_used(self, mem: GuestMemory, head: int, written: int) -> None:
        mapping, off = mem.user(self.used_addr, 4 + USED_ELEM.size * self.num)
        idx = load_u16(mapping, off + 2)
        # The element is not the driver's to read until the index covers it: pack_into may write it any way.
        USED_ELEM.pack_into(mapping, off + 4 + USED_ELEM.size * (idx % self.num), head, written)
        # x86 stores are not reordered with other stores; the element is in place before the index.
        store_u16(mapping, off + 2, (idx + 1) & 0xFFFF)

    def notify(self, mem: GuestMemory) -> None:
        if self.call_fd is None:
            return
        mapping, off = mem.user(self.avail_addr, 2)
        if load_u16(mapping, off) & AVAIL_F_NO_INTERRUPT:
            return
        os.eventfd_write(self.call_fd, 1)

    def close_fds(self) -> None:
        for fd in (self.kick_fd, self.call_fd):
            if fd is not None:
                os.close(fd)
        self.kick_fd = self.call_fd = None


def read_chain(mem: GuestMemory, chain: Chain, limit: int) -> bytes:
    """The chain's readable bytes, at most `limit` of them."""
    parts = []
    for addr, length in chain.readable:
        take = min(length, limit)
        if take <= 0:
            break
        mapping, off = mem.physical(addr, take)
        parts.append(mapping[off:off + take])
        limit -= take
    return b"".join(parts)


def write_chain(mem: GuestMemory, chain: Chain, data: bytes) -> int:
    """Scatters `data` over the chain's writable buffers; returns how much fitted."""
    done = 0
    view = memoryview(data)
    for addr, length in chain.writable:
        if done == len(data):
            break
        take = min(length, len(data) - done)
        mapping, off = mem.physical(addr, take)
        mapping[off:off + take] = view[done:done + take]
        done += take
    return done
