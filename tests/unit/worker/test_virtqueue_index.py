"""The vsock back-end's used ring as a driver polling it at the same time sees it (worker/emulator/virtqueue.py).

A driver (the guest kernel behind QEMU, or tests/fixtures/vhost_frontend.py) reads the used index while the
device writes it. Every value it reads must be the old index or the new one: an index seen running backwards
makes the driver take the ring's stale entries for new ones (in the vsock harness: a KeyError on a head it had
already taken back, about one run in twenty of tests/integration/test_vsock_backend.py).
"""
from __future__ import annotations

import mmap
import os
import struct
import time

from worker.emulator.vhostuser import GuestMemory, Region
from worker.emulator.virtqueue import VirtQueue, load_u16, store_u16

NUM = 256
UVA = 0x7F00_0000_0000
AVAIL = 0x1000
USED = 0x2000
PUSHES = 40_000
ROUNDS = 6


def _queue() -> tuple[mmap.mmap, GuestMemory, VirtQueue]:
    ram = mmap.mmap(-1, 0x10000)  # anonymous and shared: a forked child writes what the parent reads
    mem = GuestMemory([Region(0, len(ram), UVA, ram, 0)])
    q = VirtQueue(1, num=NUM, desc_addr=UVA, avail_addr=UVA + AVAIL, used_addr=UVA + USED, enabled=True,
                  started=True)
    return ram, mem, q


def _backwards_reads() -> tuple[int, int]:
    """A device process pushing PUSHES used buffers while we poll the index: (reads that saw it go back, reads)."""
    ram, mem, q = _queue()
    pid = os.fork()
    if pid == 0:  # the device: returns buffers as fast as it can
        try:
            for i in range(PUSHES):
                q.push_used(mem, i % NUM, 44)
        finally:
            os._exit(0)
    last = seen = backwards = 0
    deadline = time.monotonic() + 120
    while last != PUSHES and time.monotonic() < deadline:  # PUSHES < 2^16: the index does not wrap here
        idx = struct.unpack_from("<H", ram, USED + 2)[0]
        seen += 1
        if idx < last:
            backwards += 1
        else:
            last = idx
    os.waitpid(pid, 0)
    assert last == PUSHES, "the device's pushes never all showed"
    return backwards, seen


def test_a_polling_driver_never_sees_the_used_index_go_back() -> None:
    # Whether the two processes interleave depends on the machine's other load: several rounds, so an index
    # written in two steps is caught (struct.pack_into's was, in most single rounds).
    for _ in range(ROUNDS):
        backwards, seen = _backwards_reads()
        assert backwards == 0, f"{backwards} of {seen} reads saw the used index go back"


def test_the_index_helpers_are_little_endian_u16() -> None:
    ram = mmap.mmap(-1, 16)
    store_u16(ram, 2, 0x1234)
    assert ram[2:4] == b"\x34\x12" and load_u16(ram, 2) == 0x1234
    ram[6:8] = b"\xff\xfe"
    assert load_u16(ram, 6) == 0xFEFF
    ram.close()  # every view of the helpers is released: an exported buffer would make close() fail
