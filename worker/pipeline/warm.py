"""Warm a worker before its pool forks: what every EIF of this host shares is measured and deflated once.

Every EIF starts with this host's kernel, cmdline and bootstrap ramdisk (common.enclave.prefix) and every output
layer holds that kernel at the same offset (common.image.compress.KnownRange). A pool child keeps both for
its life, but each child (and each replacement of a recycled one) would pay for them on its first
conversion; built once in the main process, they are inherited by every child instead.
"""
from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from common.enclave.launch import launch_spec
from common.image.filetree import Tree
from worker.pipeline.build import EifIdentity, build_eif
from worker.pipeline.outputimage import write_layer

log = logging.getLogger(__name__)


def warm(blobs_dir: Path) -> bool:
    """Build and lay out a throwaway EIF of an empty image; False (logged) when the blobs are not usable."""
    started = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="nitroconv-warm-") as scratch:
            eif = Path(scratch) / "app.eif"
            built = build_eif(Tree(), launch_spec({}, entrypoint=["/warm"]), EifIdentity("warm", "0", None),
                              blobs_dir=blobs_dir, out_path=eif, cpu_count=1, mem_size_mib=None)
            write_layer(eif, {}, Path(scratch) / "layer", written=built.written)
    except Exception as exc:  # noqa: BLE001 - a conversion will report the same problem with its build
        log.warning("could not warm the conversion memos from %s: %s", blobs_dir, exc)
        return False
    log.info("conversion memos warmed from %s in %.2f s", blobs_dir, time.monotonic() - started)
    return True
