"""Files that appear whole or not at all: write beside the destination, fsync, then rename into place."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO


@contextmanager
def atomic_file(dest: Path) -> Iterator[IO[bytes]]:
    """Yield a temporary file next to `dest` (same filesystem, so the rename is atomic).

    On normal exit it is flushed, fsync'd and renamed over `dest`; on any exception it is removed and `dest` is
    untouched. Two writers of the same content race harmlessly: the last rename wins with identical bytes.
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name[:40]}.", suffix=".part")
    try:
        with os.fdopen(fd, "w+b") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
