"""The vhost-user-vsock back-end process: one front-end (QEMU), one guest, an epoll loop.

Everything runs on one thread: the vhost-user socket, the queues' kick eventfds, the host Unix
sockets and a self-pipe for signals all wake the same selector. QEMU keeps the event queue (queue 2)
to itself; the back-end sees the receive (0) and transmit (1) queues only.
"""

from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import time
from types import FrameType

from worker.emulator import vhostuser as vu
from worker.emulator.virtqueue import Chain, VirtQueue, read_chain, write_chain
from worker.emulator.vsock import HDR_SIZE, MAX_PKT_PAYLOAD, Header, RxPort, StreamMux

log = logging.getLogger("nitroconv.vsock")

RX_QUEUE = 0
TX_QUEUE = 1
NUM_QUEUES = 2
FEATURES = vu.F_VERSION_1 | vu.F_PROTOCOL_FEATURES
PROTOCOL_FEATURES = vu.PROTOCOL_F_CONFIG | vu.PROTOCOL_F_REPLY_ACK
# A reply-ack's u64: 0 is success; anything else tells the front-end the request failed.
ACK_OK = 0
ACK_FAILED = 1


class _Rx(RxPort):
    def __init__(self, backend: Backend) -> None:
        self.backend = backend
        self.chain: Chain | None = None

    def _next(self) -> Chain | None:
        b = self.backend
        q = b.queues[RX_QUEUE]
        while self.chain is None and b.mem is not None:
            try:
                self.chain = q.pop(b.mem)
                if self.chain is None or self.chain.writable_len >= HDR_SIZE:
                    break
                log.warning("receive buffer of %d bytes cannot hold a header; skipped", self.chain.writable_len)
                q.push_used(b.mem, self.chain.head, 0)
                b.rx_used = True
                self.chain = None
            except vu.GuestMemoryError as exc:
                b.break_queue(q, exc)
                self.chain = None
                break
        return self.chain

    def capacity(self) -> int:
        chain = self._next()
        return min(chain.writable_len - HDR_SIZE, MAX_PKT_PAYLOAD) if chain else 0

    def send(self, header: Header, payload: bytes) -> bool:
        chain = self._next()
        b = self.backend
        if chain is None or b.mem is None:
            return False
        try:
            written = write_chain(b.mem, chain, header.pack() + payload)
            b.queues[RX_QUEUE].push_used(b.mem, chain.head, written)
        except vu.GuestMemoryError as exc:
            b.break_queue(b.queues[RX_QUEUE], exc)
            return False
        finally:
            self.chain = None
        b.rx_used = True
        return True


class Backend:
    def __init__(self, vhost_socket: str, uds: str, guest_cid: int) -> None:
        self.vhost_path = vhost_socket
        self.uds = uds
        self.guest_cid = guest_cid
        self.selector = selectors.DefaultSelector()
        self.queues = [VirtQueue(i) for i in range(NUM_QUEUES)]
        self.mem: vu.GuestMemory | None = None
        self.features = 0
        self.protocol_features = 0
        self.frontend: socket.socket | None = None
        self.listener: socket.socket | None = None
        self.uds_listener: socket.socket | None = None
        self.rx = _Rx(self)
        self.rx_used = False
        self.mux = StreamMux(guest_cid, uds, self.selector, self.rx)
        self.stop_signal: int | None = None
        self.wake_r, self.wake_w = socket.socketpair()

    # ---- set-up and tear-down ------------------------------------------------------------------

    def _listen(self, path: str) -> socket.socket:
        """A listening Unix socket that appears at `path` only once it accepts (bound aside, renamed)."""
        if os.path.exists(path) and not os.path.isdir(path):
            import stat

            if stat.S_ISSOCK(os.lstat(path).st_mode):
                os.unlink(path)  # a stale socket of an earlier run
        tmp = f"{path}.{os.getpid()}.tmp"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            if os.path.lexists(tmp):
                os.unlink(tmp)
            sock.bind(tmp)
            sock.listen(64)
            os.rename(tmp, path)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock

    def start(self) -> None:
        self.wake_r.setblocking(False)
        self.wake_w.setblocking(False)
        signal.set_wakeup_fd(self.wake_w.fileno(), warn_on_full_buffer=False)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, self._on_signal)
        self.selector.register(self.wake_r, selectors.EVENT_READ, "wake")
        self.uds_listener = self._listen(self.uds)
        self.selector.register(self.uds_listener, selectors.EVENT_READ, "uds")
        self.listener = self._listen(self.vhost_path)
        self.selector.register(self.listener, selectors.EVENT_READ, "listener")
        log.info("listening: vhost-user %s, host sockets %s[_PORT], guest CID %d", self.vhost_path, self.uds,
                 self.guest_cid)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_signal = signum

    def close(self) -> None:
        self.mux.close_all()
        for q in self.queues:
            q.close_fds()
        if self.mem is not None:
            self.mem.close()
            self.mem = None
        for sock, path in ((self.listener, self.vhost_path), (self.uds_listener, self.uds)):
            if sock is not None:
                sock.close()
                try:
                    os.unlink(path)
                except FileNotFoundError:
                    pass
        if self.frontend is not None:
            self.frontend.close()
        self.selector.close()
        signal.set_wakeup_fd(-1)
        self.wake_r.close()
        self.wake_w.close()

    # ---- the loop ------------------------------------------------------------------------------

    def run(self) -> int:
        """Serves until the front-end disconnects (0), a signal (0) or a protocol error (1)."""
        try:
            while self.stop_signal is None:
                timeout = None
                deadline = self.mux.next_deadline()
                if deadline is not None:
                    timeout = max(0.0, deadline - time.monotonic())
                if self.mux.has_connecting():
                    timeout = 0.02 if timeout is None else min(timeout, 0.02)
                for key, mask in self.selector.select(timeout):
                    tag = key.data
                    if tag == "wake":
                        try:
                            while self.wake_r.recv(64):
                                pass
                        except BlockingIOError:
                            pass
                    elif tag == "listener":
                        self._accept_frontend()
                    elif tag == "frontend":
                        self._frontend_message()
                    elif tag == "uds":
                        self.mux.accept_host(self.uds_listener)  # type: ignore[arg-type]
                    elif isinstance(tag, VirtQueue):
                        self._kicked(tag)
                    else:
                        self.mux.ready(tag, mask)
                    self._signal_rx()
                self.mux.tick(time.monotonic())
                self._signal_rx()
            log.info("stopping on %s", signal.Signals(self.stop_signal).name)
            return 0
        except vu.Disconnected:
            log.info("the front-end disconnected; exiting")
            return 0
        except vu.ProtocolError as exc:
            log.error("%s: %s", exc.code, exc)
            return 1
        finally:
            self.close()

    def _signal_rx(self) -> None:
        if self.rx_used and self.mem is not None:
            self.rx_used = False
            try:
                self.queues[RX_QUEUE].notify(self.mem)
            except vu.GuestMemoryError as exc:
                self.break_queue(self.queues[RX_QUEUE], exc)

    def _accept_frontend(self) -> None:
        assert self.listener is not None
        try:
            sock, _ = self.listener.accept()
        except BlockingIOError:
            return
        # One front-end per process: stop listening, so a second QEMU fails loudly at connect.
        self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        os.unlink(self.vhost_path)
        sock.setblocking(True)
        self.frontend = sock
        self.selector.register(sock, selectors.EVENT_READ, "frontend")
        log.info("front-end connected")

    def break_queue(self, q: VirtQueue, exc: Exception) -> None:
        log.error("queue %d disabled: %s", q.index, exc)
        q.broken = True

    # ---- the queues ----------------------------------------------------------------------------

    def _kicked(self, q: VirtQueue) -> None:
        if q.kick_fd is None:
            return
        try:
            os.eventfd_read(q.kick_fd)
        except BlockingIOError:
            return
        if q.index == TX_QUEUE:
            self._process_tx()
        else:
            self.mux.rx_kicked()

    def _process_tx(self) -> None:
        q = self.queues[TX_QUEUE]
        mem = self.mem
        if mem is None:
            return
        used = False
        try:
            while True:
                chain = q.pop(mem)
                if chain is None:
                    break
                data = read_chain(mem, chain, HDR_SIZE + MAX_PKT_PAYLOAD)
                q.push_used(mem, chain.head, 0)
                used = True
                if len(data) < HDR_SIZE:
                    log.warning("transmit buffer of %d bytes holds no packet header; dropped", len(data))
                    continue
                header = Header.unpack(data)
                payload = data[HDR_SIZE:HDR_SIZE + header.len]
                if len(payload) != header.len:
                    log.warning("packet claims %d payload bytes, carries %d; dropped", header.len, len(payload))
                    continue
                self.mux.from_guest(header, payload)
            if used:
                q.notify(mem)
        except vu.GuestMemoryError as exc:
            self.break_queue(q, exc)

    def _start_queue(self, q: VirtQueue) -> None:
        if q.kick_fd is not None and not q.started and self.mem is not None:
            try:
                # Validate the ring addresses now, so a bad one is reported at start, not first use.
                self.mem.user(q.desc_addr, 16 * q.num)
                self.mem.user(q.avail_addr, 6 + 2 * q.num)
                self.mem.user(q.used_addr, 6 + 8 * q.num)
            except vu.GuestMemoryError as exc:
                self.break_queue(q, exc)
                return
            q.started = True
            q.broken = False
            self.selector.register(q.kick_fd, selectors.EVENT_READ, q)
            log.debug("queue %d started (%d entries)", q.index, q.num)

    def _stop_queue(self, q: VirtQueue) -> None:
        if q.started and q.kick_fd is not None:
            self.selector.unregister(q.kick_fd)
        q.started = False

    # ---- vhost-user requests -------------------------------------------------------------------

    def _frontend_message(self) -> None:
        assert self.frontend is not None
        msg = vu.recv_message(self.frontend)
        try:
            reply = self._handle(msg)
            ok = True
        except _Refused as exc:
            log.warning("refused %s: %s", msg.name, exc)
            reply, ok = None, False
        finally:
            msg.close_fds()
        if reply is not None:
            vu.send_reply(self.frontend, msg.request, reply)
        elif msg.need_reply and self.protocol_features & vu.PROTOCOL_F_REPLY_ACK:
            vu.send_reply(self.frontend, msg.request, vu.U64.pack(ACK_OK if ok else ACK_FAILED))
        elif not ok:
            # Without a reply-ack the front-end cannot learn of the failure: end the session.
            raise vu.ProtocolError("vhost_user_request_refused", f"{msg.name} refused and no way to say so")

    def _queue_of(self, index: int) -> VirtQueue:
        if index >= NUM_QUEUES:
            raise _Refused(f"queue {index} does not exist (a vsock back-end has {NUM_QUEUES})")
        return self.queues[index]

    def _handle(self, msg: vu.Message) -> bytes | None:
        r = msg.request
        if r == vu.GET_FEATURES:
            return vu.U64.pack(FEATURES)
        if r == vu.SET_FEATURES:
            (features,) = vu.unpack(msg, vu.U64)
            if features & ~FEATURES:
                raise _Refused(f"features {features & ~FEATURES:#x} were never offered")
            self.features = features
            if not features & vu.F_PROTOCOL_FEATURES:
                for q in self.queues:  # rings start enabled without protocol features
                    q.enabled = True
            return None
        if r == vu.GET_PROTOCOL_FEATURES:
            return vu.U64.pack(PROTOCOL_FEATURES)
        if r == vu.SET_PROTOCOL_FEATURES:
            (features,) = vu.unpack(msg, vu.U64)
            if features & ~PROTOCOL_FEATURES:
                raise _Refused(f"protocol features {features & ~PROTOCOL_FEATURES:#x} were never offered")
            self.protocol_features = features
            return None
        if r in (vu.SET_OWNER, vu.RESET_OWNER):
            if r == vu.RESET_OWNER:
                self._reset()
            return None
        if r == vu.GET_QUEUE_NUM:
            return vu.U64.pack(NUM_QUEUES)
        if r == vu.SET_MEM_TABLE:
            mem = vu.GuestMemory.from_message(msg)
            if self.mem is not None:
                self.mem.close()
            self.mem = mem
            for q in self.queues:
                self._start_queue(q)
            log.debug("guest memory: %d region(s), %d MiB", len(mem.regions),
                      sum(reg.size for reg in mem.regions) >> 20)
            return None
        if r == vu.SET_VRING_NUM:
            index, num = vu.unpack(msg, vu.VRING_STATE)
            q = self._queue_of(index)
            if not 0 < num <= 32768 or num & (num - 1):
                raise _Refused(f"queue size {num} is not a power of two up to 32768")
            q.num = num
            return None
        if r == vu.SET_VRING_ADDR:
            index, flags, desc, used, avail, _log = vu.unpack(msg, vu.VRING_ADDR)
            q = self._queue_of(index)
            if flags & 1:
                raise _Refused("dirty-page logging was never offered")
            q.desc_addr, q.used_addr, q.avail_addr = desc, used, avail
            return None
        if r == vu.SET_VRING_BASE:
            index, base = vu.unpack(msg, vu.VRING_STATE)
            self._queue_of(index).last_avail = base & 0xFFFF
            return None
        if r == vu.GET_VRING_BASE:
            index, _ = vu.unpack(msg, vu.VRING_STATE)
            q = self._queue_of(index)
            self._stop_queue(q)
            if index == RX_QUEUE and self.rx.chain is not None:
                q.unpop()  # a buffer taken but not used goes back with the base
                self.rx.chain = None
            base = q.last_avail
            q.close_fds()
            return vu.VRING_STATE.pack(index, base)
        if r in (vu.SET_VRING_KICK, vu.SET_VRING_CALL, vu.SET_VRING_ERR):
            (value,) = vu.unpack(msg, vu.U64)
            q = self._queue_of(value & vu.VRING_FD_INDEX_MASK)
            fd = None if value & vu.VRING_FD_INVALID else msg.take_fd()
            if fd is None and not value & vu.VRING_FD_INVALID:
                raise vu.ProtocolError("vhost_user_malformed_message", f"{msg.name} without a file descriptor")
            if r == vu.SET_VRING_ERR:
                if fd is not None:
                    os.close(fd)  # nothing is reported through it
                return None
            if r == vu.SET_VRING_CALL:
                if q.call_fd is not None:
                    os.close(q.call_fd)
                q.call_fd = fd
                return None
            self._stop_queue(q)
            if q.kick_fd is not None:
                os.close(q.kick_fd)
            q.kick_fd = fd
            if fd is None:
                raise _Refused("polling mode (no kick eventfd) is not supported")
            os.set_blocking(fd, False)
            self._start_queue(q)
            return None
        if r == vu.SET_VRING_ENABLE:
            index, enable = vu.unpack(msg, vu.VRING_STATE)
            q = self._queue_of(index)
            q.enabled = bool(enable)
            if q.enabled:  # buffers may have been offered while disabled
                if index == TX_QUEUE:
                    self._process_tx()
                else:
                    self.mux.rx_kicked()
            return None
        if r == vu.GET_CONFIG:
            offset, size, flags = vu.unpack(msg, vu.CONFIG_HEADER)
            config = vu.U64.pack(self.guest_cid)
            if offset + size > len(config):
                raise _Refused(f"config bytes {offset}..{offset + size} are beyond the vsock config's 8")
            return vu.CONFIG_HEADER.pack(offset, size, flags) + config[offset:offset + size]
        if r == vu.SET_CONFIG:
            raise _Refused("the vsock config (the guest CID) is read-only")
        raise vu.ProtocolError("vhost_user_unsupported_request", f"{msg.name} is not supported by this back-end")

    def _reset(self) -> None:
        for q in self.queues:
            self._stop_queue(q)
            q.close_fds()
        self.queues = [VirtQueue(i) for i in range(NUM_QUEUES)]
        self.rx.chain = None
        self.mux.close_all()


class _Refused(Exception):
    """A well-formed request this back-end will not carry out: answered with a failed reply-ack."""
