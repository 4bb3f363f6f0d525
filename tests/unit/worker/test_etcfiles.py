"""The enclave's /etc/hostname, /etc/hosts and /etc/resolv.conf go into the image tree, never through a symlink."""
from __future__ import annotations

from common.enclave.network import resolve
from common.image.filetree import BytesContent, NodeKind, Tree
from worker.pipeline.etcfiles import write_etc_files

POLICY = resolve({"hostname": "web"}, exposed_ports=[], image_name="x")


def _read(tree: Tree, path: bytes) -> bytes:
    node = tree.lookup(path, follow=False)
    assert node is not None and node.kind is NodeKind.FILE and node.content is not None
    with node.content.open() as f:
        return f.read()


def test_etc_files_replace_symlinks_without_following_them() -> None:
    tree = Tree()
    tree.add_dir(b"etc")
    tree.add_file(b"run/systemd/resolve/stub-resolv.conf", BytesContent(b"nameserver 127.0.0.53\n"))
    tree.add_symlink(b"etc/resolv.conf", b"../run/systemd/resolve/stub-resolv.conf")
    tree.add_symlink(b"etc/hosts", b"/outside/the/image")
    tree.add_dir(b"etc/hostname")  # even a directory in the way
    write_etc_files(tree, POLICY)
    assert _read(tree, b"etc/resolv.conf").startswith(b"nameserver 127.0.0.1\n")
    assert _read(tree, b"run/systemd/resolve/stub-resolv.conf") == b"nameserver 127.0.0.53\n"
    assert b"127.0.1.1\tweb\n" in _read(tree, b"etc/hosts")
    assert _read(tree, b"etc/hostname") == b"web\n"
    assert tree.lookup(b"outside") is None


def test_etc_files_made_when_etc_is_missing_a_file_or_a_link_to_a_dir() -> None:
    bare = Tree()
    write_etc_files(bare, POLICY)
    assert _read(bare, b"etc/hostname") == b"web\n"

    not_a_dir = Tree()
    not_a_dir.add_file(b"etc", BytesContent(b"oops"))
    write_etc_files(not_a_dir, POLICY)
    assert _read(not_a_dir, b"etc/hostname") == b"web\n"

    linked = Tree()
    linked.add_dir(b"private/etc")
    linked.add_symlink(b"etc", b"private/etc")
    write_etc_files(linked, POLICY)
    # /etc stays the image's link; the files land in the directory it names, inside the tree.
    assert _read(linked, b"private/etc/resolv.conf").startswith(b"nameserver 127.0.0.1")
