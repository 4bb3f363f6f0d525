"""Unit tests for the newc writer and reader (common/enclave/cpio.py)."""
from __future__ import annotations

import io
import os
import random
import shutil
import stat
import subprocess
from pathlib import Path

import pytest
from isal.isal_zlib import crc32

from common.enclave.cpio import (
    CHUNK_SIZE,
    FIRST_INODE,
    CpioArchive,
    CpioEntry,
    CpioHeader,
    iter_cpio,
    iter_cpio_stream,
    list_cpio,
)
from common.errors import InvalidCpio
from tests.fixtures.require import skip_or_fail

MTIME = 1492533000


def _dir(name: bytes, perm: int = 0o755) -> CpioEntry:
    return CpioEntry(name=name, mode=stat.S_IFDIR | perm, mtime=MTIME)


def _file(name: bytes, data: bytes, perm: int = 0o644, link_key: object | None = None) -> CpioEntry:
    return CpioEntry(name=name, mode=stat.S_IFREG | perm, mtime=MTIME, size=len(data), data=data, link_key=link_key)


def _opener(data: bytes):
    return lambda: io.BytesIO(data)


def _bytes(archive: CpioArchive) -> bytes:
    return b"".join(archive.chunks())


def _sample_entries() -> list[CpioEntry]:
    return [
        _dir(b"rootfs"),
        _dir(b"rootfs/etc"),
        _file(b"rootfs/etc/hostname", b"enclave\n"),
        CpioEntry(name=b"rootfs/bin/app", mode=stat.S_IFREG | 0o4755, uid=1000, gid=1001, mtime=7, size=5,
                  data=_opener(b"\x7fELF!")),
        _dir(b"rootfs/bin"),
        CpioEntry(name=b"rootfs/lib", mode=stat.S_IFLNK | 0o777, size=7, data=b"usr/lib"),
        CpioEntry(name=b"rootfs/dev/null", mode=stat.S_IFCHR | 0o666, rdevmajor=1, rdevminor=3),
        CpioEntry(name=b"rootfs/dev/sda", mode=stat.S_IFBLK | 0o660, gid=6, rdevmajor=8, rdevminor=0),
        CpioEntry(name=b"rootfs/run/fifo", mode=stat.S_IFIFO | 0o600),
        CpioEntry(name=b"rootfs/run/sock", mode=stat.S_IFSOCK | 0o755),
        _dir(b"rootfs/dev"),
        _dir(b"rootfs/run"),
        _file(b"cmd", b"/bin/app\n"),
        _file(b"env", b""),
    ]


def test_cpio_archive_round_trips_every_entry_kind() -> None:
    entries = _sample_entries()
    archive = CpioArchive(entries)

    members = list(iter_cpio(io.BytesIO(_bytes(archive))))

    expected = sorted(entries, key=lambda e: e.name)
    assert [h.name for h, _ in members] == [e.name for e in expected]
    for (header, data), entry in zip(members, expected, strict=True):
        assert (header.mode, header.uid, header.gid, header.mtime) == (entry.mode, entry.uid, entry.gid, entry.mtime)
        assert (header.rdevmajor, header.rdevminor) == (entry.rdevmajor, entry.rdevminor)
        assert (header.devmajor, header.devminor, header.check) == (3, 1, 0)
        assert header.filesize == entry.size
        content = entry.data().read() if callable(entry.data) else (entry.data or b"")
        assert data == content
        assert header.nlink == (2 if stat.S_ISDIR(entry.mode) else 1)
    assert [h.ino for h, _ in members] == list(range(FIRST_INODE, FIRST_INODE + len(entries)))


def test_cpio_archive_is_identical_for_any_input_order() -> None:
    entries = _sample_entries()
    reference = _bytes(CpioArchive(entries))
    rng = random.Random(1234)
    for _ in range(20):
        shuffled = entries[:]
        rng.shuffle(shuffled)
        assert _bytes(CpioArchive(shuffled)) == reference


def test_cpio_archive_sorts_by_name_bytes_so_parents_precede_children() -> None:
    names = [b"a/b/c", b"a-b", b"a", b"a/b", b"B", b"\xff", b"a/b-c"]
    archive = CpioArchive([_dir(n) for n in names])
    assert [h.name for h in archive.headers()] == [b"B", b"a", b"a-b", b"a/b", b"a/b-c", b"a/b/c", b"\xff"]


def test_cpio_archive_writes_linuxkit_header_layout() -> None:
    # Golden bytes written out by hand from the newc spec and gocpio's constants (ino 721, dev 3:1).
    archive = CpioArchive([_dir(b"dev"), _file(b"init", b"hi", perm=0o755)])
    fields_dev = ["000002d1", "000041ed", "00000000", "00000000", "00000002", "58f63f08", "00000000",
                  "00000003", "00000001", "00000000", "00000000", "00000004", "00000000"]
    fields_init = ["000002d2", "000081ed", "00000000", "00000000", "00000001", "58f63f08", "00000002",
                   "00000003", "00000001", "00000000", "00000000", "00000005", "00000000"]
    fields_trailer = ["000002d3", "00000000", "00000000", "00000000", "00000001", "00000000", "00000000",
                      "00000003", "00000001", "00000000", "00000000", "0000000b", "00000000"]
    expected = (
        b"070701" + "".join(fields_dev).encode() + b"dev\0" + b"\0\0"  # 114 -> 116
        + b"070701" + "".join(fields_init).encode() + b"init\0" + b"\0"  # 115 -> 116
        + b"hi\0\0"  # data padded to 4
        + b"070701" + "".join(fields_trailer).encode() + b"TRAILER!!!\0" + b"\0\0\0"  # 121 -> 124
    )
    expected += b"\0" * (512 - len(expected) % 512)
    assert _bytes(archive) == expected
    assert archive.size == 512


@pytest.mark.parametrize("payload", [0, 1, 3, 4, 5, 397, 398, 399, 400, 401, 512, 4096])
def test_cpio_archive_size_matches_written_length_and_is_512_aligned(payload: int) -> None:
    archive = CpioArchive([_file(b"f", b"x" * payload), _dir(b"d")])
    out = io.BytesIO()
    written = archive.write_to(out)
    data = out.getvalue()
    assert archive.size == written == len(data)
    assert len(data) % 512 == 0
    trailer_at = data.rindex(b"TRAILER!!!\0")
    assert not data[trailer_at + 11:].strip(b"\0")


def test_cpio_archive_streams_large_content_in_bounded_chunks() -> None:
    big = bytes(random.Random(7).randbytes(2 * CHUNK_SIZE + 12345))
    archive = CpioArchive([_file(b"small", b"abc"),
                           CpioEntry(name=b"big", mode=stat.S_IFREG | 0o644, size=len(big), data=_opener(big))])
    chunks = list(archive.chunks())
    assert all(0 < len(c) <= CHUNK_SIZE for c in chunks)
    assert sum(map(len, chunks)) == archive.size
    members = dict((h.name, d) for h, d in iter_cpio(io.BytesIO(b"".join(chunks))))
    assert members[b"big"] == big
    assert members[b"small"] == b"abc"


@pytest.mark.parametrize("actual", [b"1234", b"123456"], ids=["short", "long"])
def test_cpio_archive_rejects_opener_of_wrong_length(actual: bytes) -> None:
    archive = CpioArchive([CpioEntry(name=b"f", mode=stat.S_IFREG | 0o644, size=5, data=_opener(actual))])
    with pytest.raises(InvalidCpio) as err:
        _bytes(archive)
    assert err.value.details["reason"] == "size_mismatch"


def test_cpio_archive_stores_hard_link_data_once_on_first_link() -> None:
    key = object()
    content = b"shared content"
    links = [_file(name, content, link_key=key) for name in (b"usr/bin/zz", b"usr/bin/aa", b"usr/bin/mm")]
    lone = _file(b"usr/bin/lone", b"x", link_key=object())  # a key used once is an ordinary file
    archive = CpioArchive([*links, lone, _dir(b"usr"), _dir(b"usr/bin")])

    members = {h.name: (h, d) for h, d in iter_cpio(io.BytesIO(_bytes(archive)))}

    first, second, third = (members[n] for n in (b"usr/bin/aa", b"usr/bin/mm", b"usr/bin/zz"))
    assert first[0].ino == second[0].ino == third[0].ino
    assert first[0].nlink == second[0].nlink == third[0].nlink == 3
    assert (first[0].filesize, first[1]) == (len(content), content)
    assert (second[0].filesize, second[1]) == (0, b"")
    assert (third[0].filesize, third[1]) == (0, b"")
    assert members[b"usr/bin/lone"][0].nlink == 1
    inodes = [h.ino for h in archive.headers()]
    assert sorted(set(inodes)) == list(range(FIRST_INODE, FIRST_INODE + 4))  # 2 dirs, 1 linked inode, lone
    assert archive.size == len(_bytes(archive))


def test_cpio_archive_takes_hard_link_data_from_any_link() -> None:
    key = object()
    entries = [
        CpioEntry(name=b"a", mode=stat.S_IFREG | 0o644, size=3, link_key=key),  # no data on the first link
        CpioEntry(name=b"b", mode=stat.S_IFREG | 0o644, size=3, data=b"abc", link_key=key),
    ]
    members = list(iter_cpio(io.BytesIO(_bytes(CpioArchive(entries)))))
    assert [(h.name, h.filesize, d) for h, d in members] == [(b"a", 3, b"abc"), (b"b", 0, b"")]


def test_cpio_archive_rejects_hard_links_that_disagree() -> None:
    key = object()
    entries = [_file(b"a", b"abc", link_key=key), _file(b"b", b"abc", perm=0o600, link_key=key)]
    with pytest.raises(InvalidCpio) as err:
        CpioArchive(entries)
    assert err.value.details["reason"] == "bad_link"


def test_cpio_archive_keeps_symlink_target_as_data() -> None:
    archive = CpioArchive([CpioEntry(name=b"etc/mtab", mode=stat.S_IFLNK | 0o777, size=12, data=b"/proc/mounts")])
    [(header, data)] = list(iter_cpio(io.BytesIO(_bytes(archive))))
    assert header.file_type == stat.S_IFLNK
    assert (header.filesize, data) == (12, b"/proc/mounts")


def test_cpio_archive_keeps_device_nodes_and_fifos_as_entries() -> None:
    entries = [
        CpioEntry(name=b"dev/console", mode=stat.S_IFCHR | 0o600, rdevmajor=5, rdevminor=1),
        CpioEntry(name=b"dev/loop0", mode=stat.S_IFBLK | 0o660, rdevmajor=7, rdevminor=0),
        CpioEntry(name=b"etc/passwd", mode=stat.S_IFIFO | 0o644),
    ]
    headers = list_cpio(io.BytesIO(_bytes(CpioArchive(entries))))
    assert [(h.name, h.file_type, h.rdevmajor, h.rdevminor, h.filesize) for h in headers] == [
        (b"dev/console", stat.S_IFCHR, 5, 1, 0),
        (b"dev/loop0", stat.S_IFBLK, 7, 0, 0),
        (b"etc/passwd", stat.S_IFIFO, 0, 0, 0),
    ]


def test_cpio_archive_round_trips_non_utf8_names() -> None:
    names = [b"\xff\xfe", b"\xff\xfe/\x80\x81 \n\t", b"caf\xe9"]
    entries = [_dir(names[0]), _file(names[1], b"latin"), CpioEntry(name=names[2], mode=stat.S_IFLNK | 0o777,
                                                                     size=2, data=b"\xc3\x28")]
    members = list(iter_cpio(io.BytesIO(_bytes(CpioArchive(entries)))))
    assert [h.name for h, _ in members] == sorted(names)
    assert dict((h.name, d) for h, d in members)[b"caf\xe9"] == b"\xc3\x28"


@pytest.mark.parametrize(
    ("entries", "reason"),
    [
        ([_dir(b"a"), _file(b"a", b"")], "duplicate_name"),
        ([_dir(b"a\0b")], "bad_name"),
        ([_dir(b"/abs")], "bad_name"),
        ([_dir(b"a/../b")], "bad_name"),
        ([_dir(b"a//b")], "bad_name"),
        ([_dir(b"a/")], "bad_name"),
        ([_dir(b"./a")], "bad_name"),
        ([_dir(b"")], "bad_name"),
        ([_file(b"TRAILER!!!", b"")], "bad_name"),
        ([_dir(b"n" * 4096)], "name_too_long"),
        ([CpioEntry(name=b"f", mode=stat.S_IFREG | 0o644, uid=1 << 32)], "field_overflow"),
        ([CpioEntry(name=b"f", mode=stat.S_IFREG | 0o644, mtime=-1)], "field_overflow"),
        ([CpioEntry(name=b"f", mode=0o644)], "bad_mode"),
        ([CpioEntry(name=b"f", mode=stat.S_IFREG | 0o644, size=4, data=b"abc")], "size_mismatch"),
        ([CpioEntry(name=b"f", mode=stat.S_IFREG | 0o644, size=4)], "size_mismatch"),
        ([CpioEntry(name=b"l", mode=stat.S_IFLNK | 0o777)], "bad_symlink"),
        ([CpioEntry(name=b"l", mode=stat.S_IFLNK | 0o777, size=3, data=b"a\0b")], "bad_symlink"),
        ([CpioEntry(name=b"d", mode=stat.S_IFDIR | 0o755, size=1, data=b"x")], "bad_data"),
        ([CpioEntry(name=b"f", mode=stat.S_IFREG | 0o644, rdevmajor=1)], "bad_rdev"),
        ([CpioEntry(name=b"d", mode=stat.S_IFDIR | 0o755, link_key=1)], "bad_link"),
    ],
)
def test_cpio_archive_rejects_invalid_entries(entries: list[CpioEntry], reason: str) -> None:
    with pytest.raises(InvalidCpio) as err:
        CpioArchive(entries)
    assert err.value.details["reason"] == reason


def test_iter_cpio_stream_skips_unread_data() -> None:
    data = b"0123456789" * 1000
    raw = _bytes(CpioArchive([_file(b"a", data), _file(b"b", b"tail")]))
    seen = []
    for header, body in iter_cpio_stream(io.BytesIO(raw), chunk_size=64):
        first = next(body, b"")  # read one chunk only, leave the rest
        seen.append((header.name, first))
    assert seen == [(b"a", data[:64]), (b"b", b"tail")]


def _header_bytes(name: bytes, *, mode: int = 0o100644, filesize: int = 0, check: int = 0) -> bytes:
    fields = [721, mode, 0, 0, 1, 0, filesize, 3, 1, 0, 0, len(name) + 1, check]
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + name + b"\0"
    return head + b"\0" * ((4 - len(head) % 4) % 4)


def test_list_cpio_accepts_archives_from_other_writers() -> None:
    # Uppercase hex and no 512-byte padding are both legal newc.
    raw = _header_bytes(b"f", filesize=2).replace(b"000081a4", b"000081A4") + b"ok\0\0" + _header_bytes(b"TRAILER!!!")
    assert [(h.name, h.mode) for h in list_cpio(io.BytesIO(raw))] == [(b"f", 0o100644)]


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda raw: b"070707" + raw[6:], "bad_magic"),
        (lambda raw: b"070702" + raw[6:], "bad_magic"),
        (lambda raw: raw[:6] + b"0x0002d1" + raw[14:], "bad_header"),
        (lambda raw: raw[:6] + b" 00002d1" + raw[14:], "bad_header"),
        (lambda raw: raw[:102] + b"00000001" + raw[110:], "bad_header"),  # check field
        (lambda raw: raw[:94] + b"00000000" + raw[102:], "bad_name"),  # namesize 0
        (lambda raw: raw[:114] + b"\0\1" + raw[116:], "bad_padding"),  # name padding
        (lambda raw: raw[:118] + b"\0\1" + raw[120:], "bad_padding"),  # data padding
        (lambda raw: raw[:200], "truncated"),  # inside the trailer
        (lambda raw: raw[:117], "truncated"),  # inside the data
        (lambda raw: raw[:120], "truncated"),  # no trailer at all
        (lambda raw: raw + b"\0\0garbage", "trailing_data"),
    ],
)
def test_iter_cpio_rejects_malformed_archives(mutate, reason: str) -> None:
    # "abc" header: 110 + 4 name bytes + 2 padding; data "ok" at 116 + 2 padding; trailer at 120.
    raw = _header_bytes(b"abc", filesize=2) + b"ok\0\0" + _header_bytes(b"TRAILER!!!")
    assert list_cpio(io.BytesIO(raw))[0].name == b"abc"
    with pytest.raises(InvalidCpio) as err:
        list(iter_cpio(io.BytesIO(mutate(raw))))
    assert err.value.details["reason"] == reason


def test_iter_cpio_rejects_name_without_single_nul() -> None:
    raw = bytearray(_header_bytes(b"ab") + _header_bytes(b"TRAILER!!!"))
    raw[110 + 1] = 0  # "a\0\0": the NUL is not only at the end
    with pytest.raises(InvalidCpio) as err:
        list_cpio(io.BytesIO(bytes(raw)))
    assert err.value.details["reason"] == "bad_name"


def test_cpio_header_type_bits() -> None:
    header = CpioHeader(name=b"x", ino=1, mode=stat.S_IFLNK | 0o777, uid=0, gid=0, nlink=1, mtime=0, filesize=0,
                        devmajor=3, devminor=1, rdevmajor=0, rdevminor=0, check=0)
    assert header.file_type == stat.S_IFLNK


def test_cpio_archive_is_listed_and_extracted_by_gnu_cpio(tmp_path: Path) -> None:
    if shutil.which("cpio") is None:
        skip_or_fail("GNU cpio is not installed")
    key = object()
    entries = [
        _dir(b"etc"),
        _file(b"etc/hostname", b"enclave\n"),
        _file(b"etc/one", b"linked", link_key=key),
        _file(b"etc/two", b"linked", link_key=key),
        CpioEntry(name=b"etc/link", mode=stat.S_IFLNK | 0o777, size=8, data=b"hostname"),
        CpioEntry(name=b"bin/tool", mode=stat.S_IFREG | 0o750, mtime=MTIME, size=4, data=_opener(b"tool")),
        _dir(b"bin"),
    ]
    archive_path = tmp_path / "archive.cpio"
    with archive_path.open("wb") as out:
        CpioArchive(entries).write_to(out)

    listing = subprocess.run(["cpio", "-t", "--quiet", "-F", str(archive_path)], check=True, capture_output=True)
    assert listing.stdout.split(b"\n")[:-1] == sorted(e.name for e in entries)

    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["cpio", "-i", "-d", "-m", "--quiet", "--no-absolute-filenames", "-F", str(archive_path)],
                   cwd=root, check=True, capture_output=True)
    assert (root / "etc/hostname").read_bytes() == b"enclave\n"
    assert os.readlink(root / "etc/link") == "hostname"
    one, two = os.stat(root / "etc/one"), os.stat(root / "etc/two")
    assert one.st_ino == two.st_ino and one.st_nlink == 2
    assert (root / "etc/two").read_bytes() == b"linked"
    tool = os.stat(root / "bin/tool")
    assert (stat.S_IMODE(tool.st_mode), int(tool.st_mtime)) == (0o750, MTIME)
    assert (root / "bin/tool").read_bytes() == b"tool"


# --- the CRC known before the bytes -------------------------------------------------------------------------


def _crc_entries(with_crcs: bool) -> list[CpioEntry]:
    rng = random.Random(11)
    big, small, linked = rng.randbytes((1 << 20) + 5), b"hello\n", rng.randbytes(999)

    def opener(data: bytes):  # type: ignore[no-untyped-def]
        return lambda: io.BytesIO(data)

    def crc(data: bytes) -> int | None:
        return crc32(data) if with_crcs else None

    return [
        CpioEntry(name=b"dir", mode=stat.S_IFDIR | 0o755),
        CpioEntry(name=b"dir/big", mode=stat.S_IFREG | 0o644, size=len(big), data=opener(big), crc=crc(big)),
        CpioEntry(name=b"dir/small", mode=stat.S_IFREG | 0o600, size=len(small), data=small),
        CpioEntry(name=b"dir/streamed", mode=stat.S_IFREG | 0o600, size=len(small), data=opener(small),
                  crc=crc(small)),
        CpioEntry(name=b"link", mode=stat.S_IFLNK | 0o777, size=3, data=b"dir"),
        # Hard links: the second carries the data and its CRC; the archive stores them on the first.
        CpioEntry(name=b"a", mode=stat.S_IFREG | 0o644, size=len(linked), data=None, link_key="x"),
        CpioEntry(name=b"b", mode=stat.S_IFREG | 0o644, size=len(linked), data=opener(linked), link_key="x",
                  crc=crc(linked)),
        CpioEntry(name=b"empty", mode=stat.S_IFREG | 0o644),
    ]


@pytest.mark.parametrize("with_crcs", [True, False], ids=["entry-crcs", "read"])
def test_cpio_crc32_equals_the_crc_of_its_bytes(with_crcs: bool) -> None:
    archive = CpioArchive(_crc_entries(with_crcs))
    assert archive.crc32() == crc32(b"".join(archive.chunks()))


def test_cpio_crc32_takes_the_entrys_crc_without_reading() -> None:
    def unreadable():  # type: ignore[no-untyped-def]
        raise AssertionError("content read for its CRC although the entry gave it")

    archive = CpioArchive([CpioEntry(name=b"f", mode=stat.S_IFREG | 0o644, size=4, data=unreadable, crc=123)])
    archive.crc32()
