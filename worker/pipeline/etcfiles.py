"""The enclave's /etc/hostname, /etc/hosts and /etc/resolv.conf, written into the image tree before the ramdisk."""
from __future__ import annotations

from collections.abc import Mapping

from common.enclave.network import etc_files
from common.image.filetree import BytesContent, NodeKind, Tree

# The files the converter creates get the ramdisk's fixed time (common.enclave.ramdisk.GENERATED_MTIME).
_MTIME = 1492533000


def write_etc_files(tree: Tree, policy: Mapping[str, object]) -> None:
    """Put the policy's /etc files into `tree`, each replacing whatever the image has there.

    A symlink at one of these names is replaced, never followed: images often link /etc/resolv.conf to
    /run/systemd/resolve/stub-resolv.conf or to a path outside the image, and writing through the link would
    put the file elsewhere (or nowhere). A non-directory /etc is replaced by a directory.
    """
    etc = tree.lookup(b"etc")
    if etc is None or etc.kind is not NodeKind.DIR:
        tree.remove(b"etc")
        tree.add_dir(b"etc", mode=0o755, mtime=_MTIME)
    for path, data in etc_files(policy).items():
        existing = tree.lookup(path.encode(), follow=False)
        if existing is not None and existing.kind is NodeKind.DIR:
            tree.remove(path.encode())
        tree.add_file(path.encode(), BytesContent(data), mode=0o644, mtime=_MTIME)
