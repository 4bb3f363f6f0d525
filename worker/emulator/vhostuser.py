"""The vhost-user wire protocol, back-end side: message framing, file descriptors, guest memory.

The frame (QEMU's docs/interop/vhost-user.rst) is a 12-byte little-endian header — request, flags,
payload size — followed by the payload; file descriptors travel as SCM_RIGHTS ancillary data with the
header. Only what a vsock back-end needs is understood here; the request handlers live in daemon.py.
"""

from __future__ import annotations

import mmap
import os
import socket
import struct
from dataclasses import dataclass

HEADER = struct.Struct("<III")
VERSION = 0x1
FLAG_VERSION_MASK = 0x3
FLAG_REPLY = 0x4
FLAG_NEED_REPLY = 0x8
# The largest payload we accept: SET_MEM_TABLE with 8 regions is 264 bytes, GET_CONFIG at most 12 + 256.
MAX_PAYLOAD = 4096
MAX_FDS = 8

# Requests (front-end -> back-end).
GET_FEATURES = 1
SET_FEATURES = 2
SET_OWNER = 3
RESET_OWNER = 4
SET_MEM_TABLE = 5
SET_LOG_BASE = 6
SET_LOG_FD = 7
SET_VRING_NUM = 8
SET_VRING_ADDR = 9
SET_VRING_BASE = 10
GET_VRING_BASE = 11
SET_VRING_KICK = 12
SET_VRING_CALL = 13
SET_VRING_ERR = 14
GET_PROTOCOL_FEATURES = 15
SET_PROTOCOL_FEATURES = 16
GET_QUEUE_NUM = 17
SET_VRING_ENABLE = 18
GET_CONFIG = 24
SET_CONFIG = 25

REQUEST_NAMES = {
    GET_FEATURES: "GET_FEATURES", SET_FEATURES: "SET_FEATURES", SET_OWNER: "SET_OWNER",
    RESET_OWNER: "RESET_OWNER", SET_MEM_TABLE: "SET_MEM_TABLE", SET_LOG_BASE: "SET_LOG_BASE",
    SET_LOG_FD: "SET_LOG_FD", SET_VRING_NUM: "SET_VRING_NUM", SET_VRING_ADDR: "SET_VRING_ADDR",
    SET_VRING_BASE: "SET_VRING_BASE", GET_VRING_BASE: "GET_VRING_BASE", SET_VRING_KICK: "SET_VRING_KICK",
    SET_VRING_CALL: "SET_VRING_CALL", SET_VRING_ERR: "SET_VRING_ERR",
    GET_PROTOCOL_FEATURES: "GET_PROTOCOL_FEATURES", SET_PROTOCOL_FEATURES: "SET_PROTOCOL_FEATURES",
    GET_QUEUE_NUM: "GET_QUEUE_NUM", SET_VRING_ENABLE: "SET_VRING_ENABLE", GET_CONFIG: "GET_CONFIG",
    SET_CONFIG: "SET_CONFIG",
}

# Virtio / vhost-user feature bits.
F_PROTOCOL_FEATURES = 1 << 30
F_VERSION_1 = 1 << 32
PROTOCOL_F_MQ = 1 << 0
PROTOCOL_F_REPLY_ACK = 1 << 3
PROTOCOL_F_CONFIG = 1 << 9

U64 = struct.Struct("<Q")
VRING_STATE = struct.Struct("<II")
VRING_ADDR = struct.Struct("<IIQQQQ")
MEM_HEADER = struct.Struct("<II")
MEM_REGION = struct.Struct("<QQQQ")
CONFIG_HEADER = struct.Struct("<III")
VRING_FD_INDEX_MASK = 0xFF
VRING_FD_INVALID = 0x100


class ProtocolError(Exception):
    """The front-end sent something the protocol does not allow. `code` is a stable lower_snake code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Disconnected(Exception):
    """The front-end closed its end of the socket."""


@dataclass
class Message:
    request: int
    flags: int
    payload: bytes
    fds: list[int]

    @property
    def name(self) -> str:
        return REQUEST_NAMES.get(self.request, f"request {self.request}")

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & FLAG_NEED_REPLY)

    def take_fd(self) -> int | None:
        return self.fds.pop(0) if self.fds else None

    def close_fds(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise ProtocolError("vhost_user_truncated_message", "the front-end closed the socket mid-message")
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_message(sock: socket.socket) -> Message:
    """One framed message (blocking). Raises Disconnected on a clean EOF before a header."""
    try:
        data, fds, msg_flags, _ = socket.recv_fds(sock, HEADER.size, MAX_FDS, socket.MSG_CMSG_CLOEXEC)
    except ConnectionResetError as exc:
        raise Disconnected() from exc
    if not data:
        for fd in fds:
            os.close(fd)
        raise Disconnected()
    fds = list(fds)
    try:
        if msg_flags & socket.MSG_CTRUNC:
            raise ProtocolError("vhost_user_malformed_message", f"more than {MAX_FDS} file descriptors in a message")
        if len(data) < HEADER.size:
            data += _recv_exact(sock, HEADER.size - len(data))
        request, flags, size = HEADER.unpack(data)
        if flags & FLAG_VERSION_MASK != VERSION:
            raise ProtocolError("vhost_user_malformed_message", f"unsupported protocol version in flags {flags:#x}")
        if flags & FLAG_REPLY:
            raise ProtocolError("vhost_user_malformed_message", "a reply where a request was expected")
        if size > MAX_PAYLOAD:
            raise ProtocolError("vhost_user_malformed_message", f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
        payload = _recv_exact(sock, size) if size else b""
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return Message(request, flags, payload, fds)


def send_reply(sock: socket.socket, request: int, payload: bytes) -> None:
    sock.sendall(HEADER.pack(request, VERSION | FLAG_REPLY, len(payload)) + payload)


def unpack(msg: Message, layout: struct.Struct) -> tuple[int, ...]:
    """The payload as `layout`; a payload shorter than it is malformed (longer ones are tolerated:
    the spec lets payloads grow)."""
    if len(msg.payload) < layout.size:
        raise ProtocolError("vhost_user_malformed_message",
                            f"{msg.name}: payload of {len(msg.payload)} bytes, expected {layout.size}")
    return layout.unpack_from(msg.payload)


@dataclass
class Region:
    guest_phys_addr: int
    size: int
    user_addr: int
    mapping: mmap.mmap
    base: int  # offset of the region's first byte in `mapping`


class GuestMemory:
    """The guest's RAM as SET_MEM_TABLE shared it: regions mmapped from the front-end's fds.

    Addresses come in two kinds: vring addresses are the front-end's own virtual addresses
    (`user_addr`), descriptor buffers are guest-physical. Both are translated to (mapping, offset).
    """

    def __init__(self, regions: list[Region]) -> None:
        self.regions = regions

    @classmethod
    def from_message(cls, msg: Message) -> GuestMemory:
        count, _ = unpack(msg, MEM_HEADER)
        if count == 0 or count > MAX_FDS:
            raise ProtocolError("vhost_user_malformed_message", f"SET_MEM_TABLE with {count} regions")
        if len(msg.payload) < MEM_HEADER.size + count * MEM_REGION.size:
            raise ProtocolError("vhost_user_malformed_message", "SET_MEM_TABLE: payload shorter than its regions")
        if len(msg.fds) != count:
            raise ProtocolError("vhost_user_malformed_message",
                                f"SET_MEM_TABLE: {count} regions but {len(msg.fds)} file descriptors")
        regions: list[Region] = []
        try:
            for i in range(count):
                gpa, size, uva, offset = MEM_REGION.unpack_from(msg.payload, MEM_HEADER.size + i * MEM_REGION.size)
                fd = msg.fds[i]
                if size == 0:
                    raise ProtocolError("vhost_user_malformed_message", "SET_MEM_TABLE: an empty region")
                # mmap's offset must be page aligned; map from the aligned start below it.
                aligned = offset - offset % mmap.ALLOCATIONGRANULARITY
                try:
                    mapping = mmap.mmap(fd, size + offset - aligned, mmap.MAP_SHARED,
                                        mmap.PROT_READ | mmap.PROT_WRITE, offset=aligned)
                except (OSError, ValueError) as exc:
                    raise ProtocolError("vhost_user_bad_memory_region",
                                        f"cannot map guest memory region {i}: {exc}") from exc
                regions.append(Region(gpa, size, uva, mapping, offset - aligned))
        except BaseException:
            for region in regions:
                region.mapping.close()
            raise
        finally:
            msg.close_fds()
        return cls(regions)

    def close(self) -> None:
        for region in self.regions:
            region.mapping.close()
        self.regions = []

    def _find(self, addr: int, length: int, physical: bool) -> tuple[mmap.mmap, int]:
        for region in self.regions:
            start = region.guest_phys_addr if physical else region.user_addr
            if start <= addr and addr + length <= start + region.size:
                return region.mapping, region.base + addr - start
        kind = "guest-physical" if physical else "front-end virtual"
        raise GuestMemoryError(f"{kind} range {addr:#x}+{length:#x} is outside guest memory")

    def user(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        return self._find(addr, length, physical=False)

    def physical(self, addr: int, length: int) -> tuple[mmap.mmap, int]:
        return self._find(addr, length, physical=True)


class GuestMemoryError(Exception):
    """The guest pointed outside its memory: the queue is broken until the device is reset."""
