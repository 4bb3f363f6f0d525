"""Unit tests for the in-memory image tree (common/image/filetree.py)."""
from __future__ import annotations

import json
import os
import stat

import pytest

from common.errors import SymlinkLoop
from common.image.filetree import (
    MAX_SYMLINK_HOPS,
    BytesContent,
    Node,
    NodeKind,
    SpoolContent,
    Tree,
    WalkCounter,
    clean_path,
    printable,
    split_path,
)


def _paths(tree: Tree) -> list[bytes]:
    return [path for path, _ in tree.iter_sorted()]


def test_node_st_mode_combines_type_bits_and_permissions() -> None:
    node = Node.file(BytesContent(b"abc"), mode=0o104755)
    assert node.mode == 0o4755  # type bits in a header's mode never leak into `mode`
    assert node.st_mode == stat.S_IFREG | 0o4755
    assert Node.directory(mode=0o1777).st_mode == stat.S_IFDIR | 0o1777
    assert Node.symlink(b"/x").st_mode == stat.S_IFLNK | 0o777
    assert Node.device(NodeKind.CHAR, (1, 3)).st_mode == stat.S_IFCHR | 0o600
    assert Node.device(NodeKind.BLOCK, (8, 0)).st_mode == stat.S_IFBLK | 0o600
    assert Node.fifo().st_mode == stat.S_IFIFO | 0o644


def test_node_size_is_content_or_link_target() -> None:
    assert Node.file(BytesContent(b"12345")).size == 5
    assert Node.symlink(b"../target").size == 9
    assert Node.directory().size == 0
    assert Node.device(NodeKind.BLOCK, (8, 1)).size == 0


def test_node_equality_is_identity() -> None:
    a, b = Node.fifo(), Node.fifo()
    assert a != b and a == a
    assert len({a, b, a}) == 2


def test_bytes_content_reads_its_bytes() -> None:
    content = BytesContent(b"hello")
    with content.open() as f:
        assert f.read() == b"hello"
    assert content.size == 5


def test_spool_content_reads_exactly_its_region(tmp_path) -> None:
    spool = tmp_path / "s"
    spool.write_bytes(b"AAAA" + b"region" + b"BBBB")
    content = SpoolContent(spool, 4, 6)
    with content.open() as f:
        assert f.read() == b"region"
        assert f.read() == b""
    with content.open() as f:  # independent readers, each from the start
        assert f.read(3) == b"reg"
        f.seek(1)
        assert f.read() == b"egion"


def test_spool_content_short_spool_raises_instead_of_truncating(tmp_path) -> None:
    spool = tmp_path / "s"
    spool.write_bytes(b"abc")
    with SpoolContent(spool, 1, 10).open() as f, pytest.raises(OSError):
        f.read()


def test_split_and_clean_path_semantics() -> None:
    assert split_path(b"/a//./b/../c/") == [b"a", b"b", b"..", b"c"]
    assert clean_path(b"../../../../tmp/pwn") == [b"tmp", b"pwn"]
    assert clean_path(b"/../x") == [b"x"]
    assert clean_path(b"a/b/../../../c") == [b"c"]
    assert clean_path(b"./") == []


def test_printable_never_fails_and_is_json_safe() -> None:
    text = printable(b"\xff\xfe\n\x00ok" + b"x" * 1000)
    json.dumps(text)
    assert text.startswith("\\xff\\xfe\n")
    assert text.endswith("…") and len(text) <= 201


def test_tree_root_is_a_plain_directory() -> None:
    tree = Tree()
    assert tree.root.kind is NodeKind.DIR
    assert (tree.root.mode, tree.root.uid, tree.root.gid, tree.root.mtime) == (0o755, 0, 0, 0)
    assert list(tree.iter_sorted()) == []
    assert tree.lookup(b"/") is tree.root and tree.lookup(b"") is tree.root


def test_tree_iter_sorted_orders_by_whole_path_bytes() -> None:
    tree = Tree()
    for path in (b"a/c", b"a-b/z", b"b", b"\xff", b"a/c/d", b"A"):
        tree.add_dir(path)
    # b"a-b" < b"a/c" because "-" (0x2d) sorts before "/" (0x2f): a per-directory DFS gets this wrong.
    assert _paths(tree) == [b"A", b"a", b"a-b", b"a-b/z", b"a/c", b"a/c/d", b"b", b"\xff"]


def test_tree_iter_sorted_survives_very_deep_trees() -> None:
    tree = Tree()
    depth = 5000  # far past Python's recursion limit
    tree.add_dir(b"/".join([b"d"] * depth))
    paths = _paths(tree)
    assert len(paths) == depth
    assert paths[-1].count(b"/") == depth - 1
    assert tree.entry_count == depth


def test_tree_lookup_absolute_symlink_resolves_from_tree_root() -> None:
    tree = Tree()
    passwd = tree.add_file(b"etc/passwd", BytesContent(b"image"))
    tree.add_symlink(b"usr/localetc", b"/etc")
    assert tree.lookup(b"usr/localetc/passwd") is passwd
    assert tree.lookup(b"/usr/localetc/passwd") is passwd


def test_tree_lookup_dotdot_clamps_at_root() -> None:
    tree = Tree()
    passwd = tree.add_file(b"etc/passwd", BytesContent(b"x"))
    tree.add_symlink(b"a/b/up", b"../../../../../../../etc")
    assert tree.lookup(b"../../../etc/passwd") is passwd
    assert tree.lookup(b"a/b/up/passwd") is passwd
    assert tree.lookup(b"a/b/up/../etc/passwd") is passwd  # `..` after a link: the real parent (root)
    assert tree.lookup(b"a/..") is tree.root


def test_tree_lookup_follow_false_returns_the_link_itself() -> None:
    tree = Tree()
    target = tree.add_dir(b"real")
    link = tree.add_symlink(b"link", b"real")
    assert tree.lookup(b"link") is target
    assert tree.lookup(b"link", follow=False) is link
    assert tree.lookup(b"dangling") is None
    tree.add_symlink(b"dangling", b"/nowhere")
    assert tree.lookup(b"dangling") is None
    assert tree.lookup(b"dangling", follow=False) is not None


def test_tree_lookup_through_a_file_finds_nothing() -> None:
    tree = Tree()
    tree.add_file(b"f", BytesContent(b""))
    assert tree.lookup(b"f/x") is None


def test_tree_lookup_allows_forty_hops_and_fails_on_the_forty_first() -> None:
    tree = Tree()
    end = tree.add_dir(b"end")
    tree.add_symlink(b"l0", b"end")
    for i in range(1, MAX_SYMLINK_HOPS + 1):
        tree.add_symlink(b"l%d" % i, b"l%d" % (i - 1))
    assert tree.lookup(b"l%d" % (MAX_SYMLINK_HOPS - 1)) is end
    with pytest.raises(SymlinkLoop) as info:
        tree.lookup(b"l%d" % MAX_SYMLINK_HOPS)
    assert info.value.code == "symlink_loop"


@pytest.mark.parametrize(
    "links, path",
    [
        ({b"a": b"b", b"b": b"a"}, b"a/x"),
        ({b"dash": b"dash"}, b"dash"),
        ({b"l": b"l/x"}, b"l/y"),
        ({b"bin/sh": b"dash", b"bin/dash": b"/bin/sh"}, b"bin/sh/x"),
    ],
)
def test_tree_lookup_symlink_loop_raises(links, path) -> None:
    tree = Tree()
    for name, target in links.items():
        tree.add_symlink(name, target)
    with pytest.raises(SymlinkLoop):
        tree.lookup(path)


def test_tree_walk_counts_steps() -> None:
    tree = Tree()
    tree.add_dir(b"a/b/c")
    counter = WalkCounter()
    chain = tree.walk([b"a", b"b", b"c"], counter=counter)
    assert chain is not None and chain.path() == b"a/b/c" and chain.depth == 3
    assert counter.steps == 3


def test_tree_add_dir_over_dir_merges_attributes_and_keeps_children() -> None:
    tree = Tree()
    first = tree.add_dir(b"d", mode=0o700, uid=1)
    child = tree.add_file(b"d/keep", BytesContent(b"k"))
    merged = tree.add_dir(b"d", mode=0o1777, uid=5, gid=6, mtime=7)
    assert merged is first
    assert (first.mode, first.uid, first.gid, first.mtime) == (0o1777, 5, 6, 7)
    assert tree.lookup(b"d/keep") is child


def test_tree_add_file_over_dir_and_dir_over_symlink_replace() -> None:
    tree = Tree()
    tree.add_file(b"d/x", BytesContent(b""))
    f = tree.add_file(b"d", BytesContent(b"now a file"))
    assert tree.lookup(b"d") is f and tree.lookup(b"d/x") is None
    tree.add_dir(b"target")
    tree.add_symlink(b"s", b"target")
    d = tree.add_dir(b"s")
    assert tree.lookup(b"s", follow=False) is d and d.kind is NodeKind.DIR


def test_tree_add_writes_through_symlinked_parent_inside_root() -> None:
    tree = Tree()
    tree.add_symlink(b"localetc", b"/etc")
    node = tree.add_file(b"localetc/unbroken", BytesContent(b"x"))
    assert tree.lookup(b"etc/unbroken") is node
    assert tree.lookup(b"etc").kind is NodeKind.DIR


def test_tree_add_without_parents_requires_them() -> None:
    tree = Tree()
    with pytest.raises(FileNotFoundError):
        tree.add_dir(b"a/b", parents=False)
    tree.add_file(b"f", BytesContent(b""))
    with pytest.raises(NotADirectoryError):
        tree.add_dir(b"f/b")


@pytest.mark.parametrize("path", [b"", b"/", b".", b"a/.."])
def test_tree_add_never_replaces_the_root(path) -> None:
    tree = Tree()
    with pytest.raises(ValueError):
        tree.add_symlink(path, b"/elsewhere")
    assert tree.root.kind is NodeKind.DIR


def test_tree_add_hardlink_is_the_same_node() -> None:
    tree = Tree()
    f = tree.add_file(b"bin/busybox", BytesContent(b"elf"), mode=0o755)
    assert tree.add_hardlink(b"bin/sh", b"/bin/busybox") is f
    assert tree.lookup(b"bin/sh") is f
    tree.add_dir(b"dir")
    with pytest.raises(IsADirectoryError):
        tree.add_hardlink(b"x", b"dir")
    with pytest.raises(FileNotFoundError):
        tree.add_hardlink(b"x", b"missing")


def test_tree_remove_unlinks_one_name() -> None:
    tree = Tree()
    f = tree.add_file(b"a/f", BytesContent(b""))
    tree.add_hardlink(b"a/g", b"a/f")
    assert tree.remove(b"a/f") is True
    assert tree.remove(b"a/f") is False
    assert tree.remove(b"nowhere/x") is False
    assert tree.lookup(b"a/g") is f
    with pytest.raises(ValueError):
        tree.remove(b"/")


def test_tree_entry_count_and_total_bytes_count_hard_links_once_for_bytes() -> None:
    tree = Tree()
    tree.add_file(b"a", BytesContent(b"12345"))
    tree.add_hardlink(b"b", b"a")
    tree.add_file(b"d/c", BytesContent(b"123"))
    tree.add_symlink(b"s", b"a")
    assert tree.entry_count == 5  # a, b, d, d/c, s
    assert tree.total_bytes == 8


def test_tree_names_are_bytes_and_kept_exactly() -> None:
    tree = Tree()
    names = [b"\xff\xfe", b"new\nline", b"Case", b"case", b"caf\xc3\xa9", b"cafe\xcc\x81"]
    for name in names:
        tree.add_file(name, BytesContent(name))
    assert _paths(tree) == sorted(names)
    for name in names:
        node = tree.lookup(name)
        assert node is not None and node.content is not None
        with node.content.open() as f:
            assert f.read() == name


def test_tree_never_touches_the_host(tmp_path) -> None:
    before = sorted(os.listdir(tmp_path))
    tree = Tree()
    tree.add_symlink(b"escape", str(tmp_path).encode())
    tree.add_file(b"escape/pwn", BytesContent(b"x"))
    tree.add_file(str(tmp_path).encode() + b"/pwn2", BytesContent(b"x"))
    assert sorted(os.listdir(tmp_path)) == before
    assert tree.lookup(str(tmp_path).encode() + b"/pwn") is not None  # in the tree's own copy of that path
