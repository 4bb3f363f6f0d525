"""The worker processes' heap: what keeps a Celery worker's tree (main process + pool child) small.

- One malloc arena (`limit_arenas`): glibc gives each thread that allocates its own arena, up to 8 per core, and
  memory freed in one is never reused by another. A conversion's threads (compression, hashing, the streamed
  upload) each pass MiB-sized buffers through their own arena, so the process holds several arenas' worth of
  free memory at its peak. With one arena those buffers reuse the same freed space; the threads spend their
  time in ISA-L, zlib and hashlib, not in malloc, so they do not queue on its lock (bench/README.md, figure 3).
- Freezing the objects the main process made before the pool forks (`freeze_before_fork`): a pool child
  shares them copy-on-write, and a full garbage collection in either process would write to every one of them
  (the collector's bookkeeping lives in each object's header), copying nearly all of the shared pages.
- Giving the heap's free pages back after a conversion (`release`): what a child keeps resident between
  conversions otherwise stays at the last conversion's peak.
glibc only; elsewhere (musl, macOS) the malloc calls are no-ops.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
import logging

log = logging.getLogger(__name__)

_M_ARENA_MAX = -8  # glibc's malloc.h


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    # Both are glibc extensions: their absence means another libc, whose malloc we leave alone.
    return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None


def limit_arenas(count: int = 1) -> bool:
    """At most `count` malloc arenas for the threads this process (and any child it forks) starts from now on;
    threads that already allocated keep theirs. False when the libc is not glibc or refused."""
    libc = _libc()
    if libc is None:
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, count))


def release() -> bool:
    """Return the heap's free pages to the kernel (malloc_trim(0): the top of each arena and, since glibc 2.8,
    whole free pages inside them). True when some memory was released."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def freeze_before_fork() -> None:
    """Move every object tracked so far to the collector's permanent generation (never scanned again).

    Called once in the main process just before the pool forks. Garbage made before it is never collected, so a
    collection runs first; the free pages that leaves in the heap are then given back, rather than shared with
    the children and copied by whichever process allocates in them first. What the process allocates afterwards
    is collected as usual."""
    gc.collect()
    release()
    gc.freeze()
    log.debug("froze %d objects before the pool forks", gc.get_freeze_count())
