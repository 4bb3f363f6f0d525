"""The output layer sent to the registry while it is being compressed, so that little of it is left to push.

The producer (`write_layer`'s compressor) hands each piece of compressed bytes to `LayerStream.write`; a
thread of its own sends them, in order, as the body of one PATCH (chunked transfer encoding, as `docker push`
sends a layer) into an upload session opened before the digest is known. `end` finishes that request once the
layer is complete; the session is closed (PUT ?digest=) only by `commit`, which the push step calls once every
check of the conversion passed; until then nothing is tagged or even complete.

Streaming is an optimisation and never a reason to fail: any failure (an HTTP error, a registry that refuses
the stream, an auth round it cannot pass, a cancel) stops it, deletes its session, and leaves the whole-file
upload of the push step to do the work as it would have anyway.
"""
from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator

from common.registry.client import BlobUpload, Credentials, RegistryClient
from common.registry.digest import Digest
from common.registry.hostpolicy import HostPolicy
from common.registry.reference import Reference
from common.util.gather import Gather

log = logging.getLogger(__name__)

THREAD_NAME = "nitroconv-layerupload"
# Pieces smaller than this are gathered into one chunk of the request body, so that a compressor that hands
# over small pieces does not cost a system call (and a chunk header) each; a gzip block is larger already.
CHUNK_BYTES = 256 << 10
# The queue only has to cover the send of one chunk, not to run ahead of it: every MiB held here is held at
# the worker's peak (bench/README.md, figure 3).
QUEUE_PIECES = 2
# How often a producer blocked on a full queue, or the sender waiting for a piece, looks whether the stream
# has stopped meanwhile.
_POLL_SECONDS = 0.1


class _Stopped(Exception):
    """Raised from the request body to abort the PATCH in flight (its connection is closed)."""


class LayerStream:
    """One streamed upload of one blob into `repository`, owning `client` (closed with the stream)."""

    def __init__(self, client: RegistryClient, repository: str, *, chunk_bytes: int = CHUNK_BYTES,
                 queue_pieces: int = QUEUE_PIECES, should_cancel: Callable[[], bool] = lambda: False) -> None:
        self._client = client
        self._repository = repository
        self._chunk_bytes = chunk_bytes
        self._should_cancel = should_cancel
        self._queue: queue.Queue[bytes | None] = queue.Queue(maxsize=queue_pieces)
        self._stopped = threading.Event()  # set on failure, cancel or abandon: later writes are dropped
        self._upload: BlobUpload | None = None
        self._received = 0  # bytes handed to write() while the stream was live
        self._ended = False
        self._closed = False
        self.failure: str | None = None  # why streaming stopped, for the log and tests
        self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
        self._thread.start()

    @property
    def live(self) -> bool:
        return not self._stopped.is_set()

    # --- producer side ----------------------------------------------------------------------------
    def write(self, data: bytes) -> None:
        """Queue one piece; blocks while the queue is full (backpressure), returns at once once stopped."""
        if not data or self._ended or self._stopped.is_set():
            return
        piece = bytes(data)
        while not self._stopped.is_set():
            try:
                self._queue.put(piece, timeout=_POLL_SECONDS)
                self._received += len(piece)
                return
            except queue.Full:
                continue

    def end(self) -> None:
        """The blob is complete: the PATCH that carries it finishes now (it is not held open until `commit`,
        which may come much later, after the base image's layers are copied, say)."""
        self._end()

    def commit(self, digest: str, size: int) -> bool:
        """Send what is left and close the session as `digest`. True when the registry now holds the blob
        through this stream; False (the session deleted) when streaming failed: upload it another way."""
        self._end()
        self._thread.join()
        upload = self._upload
        if self._stopped.is_set() or upload is None:
            self.abandon()
            return False
        if upload.offset != size or self._received != size:
            self._stop(f"sent {upload.offset} bytes of {self._received} received, the blob has {size}")
            self.abandon()
            return False
        try:
            upload.commit(Digest.parse(digest))
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the whole-file upload
            self._stop(f"closing the session failed: {exc}")
            self.abandon()
            return False
        self._upload = None  # committed: nothing to delete any more
        self.close()
        return True

    def abandon(self) -> None:
        """Stop the thread and delete the session, best effort; safe to call more than once."""
        self._stop(self.failure or "abandoned")
        self._end()
        self._thread.join()
        upload, self._upload = self._upload, None
        if upload is not None:
            upload.cancel()
        self.close()

    def close(self) -> None:
        """Release the thread and the client; an uncommitted session is abandoned first."""
        if self._closed:
            return
        if self._upload is not None or self._thread.is_alive():
            self.abandon()
            return
        self._closed = True
        self._client.close()

    # --- uploader thread --------------------------------------------------------------------------
    def _end(self) -> None:
        if self._ended:
            return
        self._ended = True
        while self._thread.is_alive():
            try:
                self._queue.put(None, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                if self._stopped.is_set():
                    self._drain()

    def _drain(self) -> None:
        try:
            while True:
                self._queue.get_nowait()
        except queue.Empty:
            pass

    def _stop(self, why: str) -> None:
        if not self._stopped.is_set():
            self.failure = why
            self._stopped.set()
            log.info("streamed layer upload to %s stopped (%s): the layer is uploaded whole at push",
                     self._repository, why)

    def _run(self) -> None:
        try:
            self._upload = upload = self._client.open_upload(self._repository)
            upload.stream(self._body())
        except Exception as exc:  # noqa: BLE001 - any failure falls back to the whole-file upload
            self._stop(str(exc) or type(exc).__name__)
        finally:
            # A producer blocked on a full queue must see the stop, not wait on a reader that is gone.
            if self._stopped.is_set():
                self._drain()

    def _body(self) -> Iterator[bytes]:
        """The PATCH's body: the queued pieces in order until the end of the blob; a stop aborts it."""
        gather = Gather(self._chunk_bytes)
        while True:
            if self._stopped.is_set():
                raise _Stopped(self.failure or "stopped")
            try:
                piece = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                continue
            if piece is None:  # the end of the blob
                yield from gather.rest()
                return
            if self._should_cancel():
                self._stop("cancelled")
                raise _Stopped("cancelled")
            yield from gather.push(piece)


def open_layer_stream(ref: Reference, *, credentials: Credentials | None, insecure_registries: frozenset[str],
                      should_cancel: Callable[[], bool] = lambda: False) -> LayerStream:
    """A stream into `ref`'s repository with a client of its own (the push step's is opened later)."""
    client = RegistryClient.for_reference(ref, credentials=credentials,
                                          policy=HostPolicy.allowing(insecure_registries))
    return LayerStream(client, ref.repository, should_cancel=should_cancel)
