"""virtio-vsock streams (virtio 1.2 §5.10) mapped to host Unix sockets.

The mapping is vhost-device-vsock's and Firecracker's:
- a guest connection to the host (CID 2, or 3 — the parent's CID on a Nitro host) port P becomes a
  connection to the Unix socket `<uds>_P`; nobody listening there: RST;
- a host program reaches the guest's port P by connecting to `<uds>` and sending `CONNECT P\\n`; once
  the guest accepts, it reads `OK <hostport>\\n` and the stream is the guest's.

Credit flow control in both directions: the back-end buffers at most BUF_ALLOC bytes per stream of
what the guest sent and the host has not read yet (advertised as buf_alloc, with fwd_cnt the bytes
written to the host so far), and sends the guest no more than the guest's own buf_alloc allows. A host
socket is only read while the guest has credit and receive buffers, so a slow guest slows the host
writer down instead of growing a queue here.
"""

from __future__ import annotations

import collections
import errno
import logging
import selectors
import socket
import struct
import time
from dataclasses import dataclass, field

log = logging.getLogger("nitroconv.vsock")

HDR = struct.Struct("<QQIIIHHIII")
HDR_SIZE = HDR.size  # 44
TYPE_STREAM = 1
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2
SHUTDOWN_BOTH = SHUTDOWN_RCV | SHUTDOWN_SEND
HOST_CIDS = (2, 3)
# What a host-initiated stream's source looks like to the guest: the parent instance's CID on Nitro.
PARENT_CID = 3
BUF_ALLOC = 256 * 1024
MAX_PKT_PAYLOAD = 64 * 1024
CREDIT_UPDATE_THRESHOLD = BUF_ALLOC // 4
CONNECT_LINE_MAX = 64
HANDSHAKE_SECONDS = 10.0
CONNECT_RETRY_SECONDS = 2.0
CLOSE_LINGER_SECONDS = 10.0
FIRST_HOST_PORT = 1 << 30


@dataclass
class Header:
    src_cid: int
    dst_cid: int
    src_port: int
    dst_port: int
    len: int
    type: int
    op: int
    flags: int
    buf_alloc: int
    fwd_cnt: int

    def pack(self) -> bytes:
        return HDR.pack(self.src_cid, self.dst_cid, self.src_port, self.dst_port, self.len, self.type, self.op,
                        self.flags, self.buf_alloc, self.fwd_cnt)

    @classmethod
    def unpack(cls, data: bytes) -> Header:
        return cls(*HDR.unpack_from(data))


# Connection states.
CONNECTING = "connecting"  # guest asked; connecting to <uds>_P (retried while its backlog is full)
HANDSHAKE = "handshake"  # host connected to <uds>; reading its CONNECT line
PENDING = "pending"  # REQUEST sent to the guest; waiting for its RESPONSE
ESTABLISHED = "established"
CLOSING = "closing"  # the guest closed; writing what is left to the host


@dataclass(eq=False)  # identity: streams live in sets and as selector data
class Stream:
    sock: socket.socket
    state: str
    guest_port: int = 0
    host_port: int = 0
    host_cid: int = PARENT_CID  # the CID the guest sees as its peer
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    tx_cnt: int = 0  # bytes sent to the guest
    fwd_cnt: int = 0  # bytes of the guest's written to the host
    last_fwd_sent: int = 0
    outbuf: bytearray = field(default_factory=bytearray)  # guest -> host, not yet written
    uncounted: int = 0  # leading outbuf bytes that are ours (the OK line), not the guest's
    line: bytearray = field(default_factory=bytearray)  # the CONNECT line being read
    guest_shut: int = 0
    host_eof: bool = False
    host_wr_shut: bool = False
    deadline: float | None = None
    events: int = 0

    @property
    def key(self) -> tuple[int, int]:
        return (self.guest_port, self.host_port)

    def credit(self) -> int:
        in_flight = (self.tx_cnt - self.peer_fwd_cnt) & 0xFFFFFFFF
        return max(0, self.peer_buf_alloc - in_flight)


class RxPort:
    """What the stream layer needs of the guest's receive queue (implemented by the daemon)."""

    def send(self, header: Header, payload: bytes) -> bool:  # pragma: no cover - interface
        """Places one packet in a receive buffer; False when the guest offered none."""
        raise NotImplementedError

    def capacity(self) -> int:  # pragma: no cover - interface
        """Payload bytes the next receive buffer holds; 0 when there is none."""
        raise NotImplementedError


class StreamMux:
    def __init__(self, guest_cid: int, uds: str, selector: selectors.BaseSelector, rx: RxPort) -> None:
        self.guest_cid = guest_cid
        self.uds = uds
        self.selector = selector
        self.rx = rx
        self.streams: dict[tuple[int, int], Stream] = {}
        self.handshakes: set[Stream] = set()
        self.control: collections.deque[Header] = collections.deque()
        self.rx_starved = False
        self.next_host_port = FIRST_HOST_PORT

    # ---- packets to the guest ------------------------------------------------------------------

    def _header(self, s: Stream, op: int, length: int = 0, flags: int = 0) -> Header:
        s.last_fwd_sent = s.fwd_cnt
        return Header(s.host_cid, self.guest_cid, s.host_port, s.guest_port, length, TYPE_STREAM, op, flags,
                      BUF_ALLOC, s.fwd_cnt & 0xFFFFFFFF)

    def _queue(self, header: Header) -> None:
        self.control.append(header)
        self.flush_control()

    def _rst_reply(self, pkt: Header) -> None:
        self._queue(Header(pkt.dst_cid, pkt.src_cid, pkt.dst_port, pkt.src_port, 0, TYPE_STREAM, OP_RST, 0, 0, 0))

    def flush_control(self) -> None:
        """Sends queued control packets while the guest has receive buffers."""
        while self.control:
            if not self.rx.send(self.control[0], b""):
                self._starve()
                return
            self.control.popleft()

    def _starve(self) -> None:
        if not self.rx_starved:
            self.rx_starved = True
            for s in self.streams.values():
                self._update(s)

    def rx_kicked(self) -> None:
        """The guest added receive buffers: send what waited, then read the host sockets again."""
        self.rx_starved = False
        self.flush_control()
        if not self.rx_starved:
            for s in list(self.streams.values()):
                self._flush_line(s)
                self._update(s)

    # ---- selector interest ---------------------------------------------------------------------

    def _update(self, s: Stream) -> None:
        want = 0
        if s.state == HANDSHAKE:
            want = selectors.EVENT_READ
        elif (s.state == ESTABLISHED and not s.line and not s.host_eof and not s.guest_shut & SHUTDOWN_RCV
              and not self.rx_starved and not self.control and s.credit() > 0):
            want = selectors.EVENT_READ
        if s.outbuf and s.state in (ESTABLISHED, CLOSING):
            want |= selectors.EVENT_WRITE
        if want == s.events:
            return
        if s.events and want:
            self.selector.modify(s.sock, want, s)
        elif want:
            self.selector.register(s.sock, want, s)
        else:
            self.selector.unregister(s.sock)
        s.events = want

    def _close(self, s: Stream, rst: bool) -> None:
        if s.events:
            self.selector.unregister(s.sock)
            s.events = 0
        s.sock.close()
        if self.streams.get(s.key) is s:
            del self.streams[s.key]
        self.handshakes.discard(s)
        if rst and s.state != HANDSHAKE:
            self._queue(self._header(s, OP_RST))
        log.debug("stream guest:%d <-> host:%d closed%s", s.guest_port, s.host_port, " (RST)" if rst else "")

    def close_all(self) -> None:
        for s in list(self.streams.values()) + list(self.handshakes):
            self._close(s, rst=True)

    # ---- from the guest --------------------------------------------------------------------------

    def from_guest(self, pkt: Header, payload: bytes) -> None:
        if pkt.src_cid != self.guest_cid:
            log.warning("dropped a packet from CID %d (the guest is CID %d)", pkt.src_cid, self.guest_cid)
            return
        key = (pkt.src_port, pkt.dst_port)
        s = self.streams.get(key)
        if pkt.type != TYPE_STREAM:
            if pkt.op != OP_RST:
                self._rst_reply(pkt)
            return
        if s is None:
            if pkt.op == OP_REQUEST:
                self._guest_connect(pkt)
            elif pkt.op != OP_RST:
                self._rst_reply(pkt)
            return
        s.peer_buf_alloc = pkt.buf_alloc
        s.peer_fwd_cnt = pkt.fwd_cnt
        op = pkt.op
        if op == OP_RST:
            self._close(s, rst=False)
            return
        if op == OP_RESPONSE and s.state == PENDING:
            s.state = ESTABLISHED
            s.deadline = None
            ok = f"OK {s.host_port}\n".encode()
            s.outbuf[:0] = ok
            s.uncounted = len(ok)
            log.debug("guest accepted host stream to port %d", s.guest_port)
            self._write_host(s)
        elif op == OP_RW and s.state == ESTABLISHED and not s.guest_shut & SHUTDOWN_SEND:
            if len(s.outbuf) - s.uncounted + len(payload) > BUF_ALLOC:
                log.warning("guest port %d sent beyond its credit; resetting the stream", s.guest_port)
                self._close(s, rst=True)
                return
            s.outbuf += payload
            self._write_host(s)
        elif op == OP_CREDIT_UPDATE and s.state in (ESTABLISHED, CLOSING):
            pass
        elif op == OP_CREDIT_REQUEST and s.state in (ESTABLISHED, CLOSING):
            self._queue(self._header(s, OP_CREDIT_UPDATE))
        elif op == OP_SHUTDOWN and s.state in (ESTABLISHED, CLOSING):
            s.guest_shut |= pkt.flags & SHUTDOWN_BOTH
            self._after_guest_shutdown(s)
        else:
            log.warning("unexpected op %d from guest port %d in state %s; resetting", op, s.guest_port, s.state)
            self._close(s, rst=True)
            return
        if s.key in self.streams:
            self._flush_line(s)
            self._update(s)

    def _guest_connect(self, pkt: Header) -> None:
        if pkt.dst_cid not in HOST_CIDS:
            log.info("guest port %d asked for CID %d port %d: only the host is reachable; refused",
                     pkt.src_port, pkt.dst_cid, pkt.dst_port)
            self._rst_reply(pkt)
            return
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError as exc:  # out of file descriptors: refuse this one, keep the others
            log.warning("guest port %d -> host port %d refused: %s", pkt.src_port, pkt.dst_port, exc)
            self._rst_reply(pkt)
            return
        s = Stream(sock, CONNECTING, guest_port=pkt.src_port, host_port=pkt.dst_port, host_cid=pkt.dst_cid,
                   peer_buf_alloc=pkt.buf_alloc, peer_fwd_cnt=pkt.fwd_cnt)
        s.deadline = time.monotonic() + CONNECT_RETRY_SECONDS
        self.streams[s.key] = s
        self._try_connect(s)

    def _try_connect(self, s: Stream) -> None:
        path = f"{self.uds}_{s.host_port}"
        try:
            s.sock.connect(path)
        except BlockingIOError:
            return  # the listener's backlog is full: retried by tick() until the deadline
        except OSError as exc:
            log.info("guest port %d -> host port %d refused: %s", s.guest_port, s.host_port,
                     exc.strerror or exc)
            self._close(s, rst=True)
            return
        s.state = ESTABLISHED
        s.deadline = None
        log.debug("guest port %d connected to %s", s.guest_port, path)
        self._queue(self._header(s, OP_RESPONSE))
        self._update(s)

    def _after_guest_shutdown(self, s: Stream) -> None:
        if s.guest_shut & SHUTDOWN_SEND and not s.outbuf:
            self._shut_host_write(s)
        if s.guest_shut == SHUTDOWN_BOTH or (s.guest_shut & SHUTDOWN_SEND and s.host_eof):
            if s.outbuf:
                s.state = CLOSING
                s.deadline = time.monotonic() + CLOSE_LINGER_SECONDS
            else:
                self._close(s, rst=True)

    def _shut_host_write(self, s: Stream) -> None:
        if not s.host_wr_shut:
            s.host_wr_shut = True
            try:
                s.sock.shutdown(socket.SHUT_WR)
            except OSError:
                pass

    # ---- the host side -------------------------------------------------------------------------

    def _write_host(self, s: Stream) -> None:
        while s.outbuf:
            try:
                n = s.sock.send(s.outbuf)
            except BlockingIOError:
                break
            except OSError as exc:
                log.info("host side of guest port %d failed: %s", s.guest_port, exc.strerror or exc)
                self._close(s, rst=True)
                return
            del s.outbuf[:n]
            mine = min(n, s.uncounted)
            s.uncounted -= mine
            s.fwd_cnt += n - mine
        if s.state == ESTABLISHED and (s.fwd_cnt - s.last_fwd_sent >= CREDIT_UPDATE_THRESHOLD):
            self._queue(self._header(s, OP_CREDIT_UPDATE))
        if not s.outbuf:
            if s.state == CLOSING:
                self._close(s, rst=True)
                return
            if s.guest_shut & SHUTDOWN_SEND:
                self._shut_host_write(s)
        self._update(s)

    def _read_host(self, s: Stream) -> None:
        capacity = self.rx.capacity()
        if capacity <= 0:
            self._starve()
            return
        room = min(s.credit(), capacity, MAX_PKT_PAYLOAD)
        if room <= 0:
            self._update(s)
            return
        try:
            data = s.sock.recv(room)
        except BlockingIOError:
            return
        except OSError as exc:
            log.info("host side of guest port %d failed: %s", s.guest_port, exc.strerror or exc)
            self._close(s, rst=True)
            return
        if not data:
            s.host_eof = True
            if s.guest_shut & SHUTDOWN_SEND and not s.outbuf:
                self._close(s, rst=True)
                return
            self._queue(self._header(s, OP_SHUTDOWN, flags=SHUTDOWN_SEND))
            self._update(s)
            return
        header = self._header(s, OP_RW, len(data))
        if not self.rx.send(header, data):  # capacity() said there was room; cannot happen
            raise RuntimeError("receive buffer vanished")
        s.tx_cnt = (s.tx_cnt + len(data)) & 0xFFFFFFFF
        self._update(s)

    def accept_host(self, listener: socket.socket) -> None:
        try:
            sock, _ = listener.accept()
        except (BlockingIOError, ConnectionAbortedError):
            return
        except OSError as exc:  # out of file descriptors: the connection waits in the backlog
            log.warning("cannot accept a host connection: %s", exc)
            return
        sock.setblocking(False)
        s = Stream(sock, HANDSHAKE, deadline=time.monotonic() + HANDSHAKE_SECONDS)
        self.handshakes.add(s)
        self._update(s)

    def _read_connect_line(self, s: Stream) -> None:
        try:
            data = s.sock.recv(CONNECT_LINE_MAX - len(s.line))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(s, rst=False)
            return
        s.line += data
        end = s.line.find(b"\n")
        if end < 0:
            if len(s.line) >= CONNECT_LINE_MAX:
                log.info("host connection refused: no CONNECT line in %d bytes", CONNECT_LINE_MAX)
                self._close(s, rst=False)
            return
        words = bytes(s.line[:end]).decode("ascii", "replace").split()
        rest = bytes(s.line[end + 1:])
        if len(words) != 2 or words[0] != "CONNECT" or not words[1].isdigit() or int(words[1]) > 0xFFFFFFFF:
            log.info("host connection refused: expected 'CONNECT <port>'")
            self._close(s, rst=False)
            return
        self.handshakes.discard(s)
        s.guest_port = int(words[1])
        s.host_port = self._free_host_port(s.guest_port)
        s.state = PENDING
        s.deadline = time.monotonic() + HANDSHAKE_SECONDS
        s.line = bytearray(rest)  # bytes sent ahead of OK: the guest gets them once connected
        self.streams[s.key] = s
        self._update(s)
        self._queue(self._header(s, OP_REQUEST))

    def _free_host_port(self, guest_port: int) -> int:
        while True:
            port = self.next_host_port
            self.next_host_port = FIRST_HOST_PORT if port >= 0xFFFFFFFE else port + 1
            if (guest_port, port) not in self.streams:
                return port

    def ready(self, s: Stream, mask: int) -> None:
        if s.sock.fileno() == -1:
            return  # closed by an earlier event of the same round
        if s.state == HANDSHAKE:
            self._read_connect_line(s)
            return
        if mask & selectors.EVENT_WRITE:
            self._write_host(s)
        if s.key in self.streams and mask & selectors.EVENT_READ and s.events & selectors.EVENT_READ:
            self._read_host(s)

    def _flush_line(self, s: Stream) -> None:
        """Bytes the host sent right behind its CONNECT line go to the guest before anything else."""
        if not s.line or s.state != ESTABLISHED or self.control:
            return
        room = min(s.credit(), self.rx.capacity(), len(s.line))
        if room <= 0:
            return
        data = bytes(s.line[:room])
        if self.rx.send(self._header(s, OP_RW, len(data)), data):
            del s.line[:room]
            s.tx_cnt = (s.tx_cnt + len(data)) & 0xFFFFFFFF

    # ---- time ----------------------------------------------------------------------------------

    def next_deadline(self) -> float | None:
        deadlines = [s.deadline for s in self.streams.values() if s.deadline is not None]
        deadlines += [s.deadline for s in self.handshakes if s.deadline is not None]
        return min(deadlines) if deadlines else None

    def tick(self, now: float) -> None:
        for s in list(self.streams.values()) + list(self.handshakes):
            if s.state == CONNECTING and s.key in self.streams:
                if s.deadline is not None and now >= s.deadline:
                    log.info("guest port %d -> host port %d: the listener's backlog stayed full",
                             s.guest_port, s.host_port)
                    self._close(s, rst=True)
                else:
                    self._try_connect(s)
            elif s.deadline is not None and now >= s.deadline:
                log.info("stream guest:%d host:%d timed out in state %s", s.guest_port, s.host_port, s.state)
                self._close(s, rst=s.state != HANDSHAKE)

    def has_connecting(self) -> bool:
        return any(s.state == CONNECTING for s in self.streams.values())


def errno_name(exc: OSError) -> str:
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))
