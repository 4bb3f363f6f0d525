"""Building layer tars in memory for tests: ordinary, hostile and malformed entries, names as bytes."""
from __future__ import annotations

import io
import tarfile


def _s(name: bytes | str) -> str:
    # tarfile wants str; surrogateescape carries any bytes through to the archive unchanged.
    return name.decode("utf-8", "surrogateescape") if isinstance(name, bytes) else name


class LayerTar:
    """A tar built entry by entry, in the order given (which is the point of most hostile cases)."""

    def __init__(self, fmt: int = tarfile.GNU_FORMAT) -> None:
        self._buf = io.BytesIO()
        self._tar = tarfile.open(fileobj=self._buf, mode="w", format=fmt, encoding="utf-8",
                                 errors="surrogateescape")

    def _info(self, name: bytes | str, kind: bytes, mode: int, **attrs: object) -> tarfile.TarInfo:
        info = tarfile.TarInfo(_s(name))
        info.type = kind
        info.mode = mode
        info.mtime = 1_700_000_000
        for key, value in attrs.items():
            setattr(info, key, value)
        return info

    def file(self, name: bytes | str, data: bytes = b"", mode: int = 0o644, **attrs: object) -> LayerTar:
        info = self._info(name, tarfile.REGTYPE, mode, **attrs)
        info.size = len(data)
        self._tar.addfile(info, io.BytesIO(data))
        return self

    def dir(self, name: bytes | str, mode: int = 0o755, **attrs: object) -> LayerTar:
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode, **attrs))
        return self

    def symlink(self, name: bytes | str, target: bytes | str, mode: int = 0o777, **attrs: object) -> LayerTar:
        self._tar.addfile(self._info(name, tarfile.SYMTYPE, mode, linkname=_s(target), **attrs))
        return self

    def link(self, name: bytes | str, target: bytes | str, mode: int = 0o644, **attrs: object) -> LayerTar:
        self._tar.addfile(self._info(name, tarfile.LNKTYPE, mode, linkname=_s(target), **attrs))
        return self

    def char(self, name: bytes | str, major: int, minor: int, mode: int = 0o600) -> LayerTar:
        self._tar.addfile(self._info(name, tarfile.CHRTYPE, mode, devmajor=major, devminor=minor))
        return self

    def block(self, name: bytes | str, major: int, minor: int, mode: int = 0o600) -> LayerTar:
        self._tar.addfile(self._info(name, tarfile.BLKTYPE, mode, devmajor=major, devminor=minor))
        return self

    def fifo(self, name: bytes | str, mode: int = 0o644) -> LayerTar:
        self._tar.addfile(self._info(name, tarfile.FIFOTYPE, mode))
        return self

    def whiteout(self, directory: bytes | str, name: bytes | str) -> LayerTar:
        d, n = _s(directory).rstrip("/"), _s(name)
        return self.file(f"{d}/.wh.{n}" if d else f".wh.{n}")

    def opaque(self, directory: bytes | str) -> LayerTar:
        d = _s(directory).rstrip("/")
        return self.file(f"{d}/.wh..wh..opq" if d else ".wh..wh..opq")

    def raw(self, info: tarfile.TarInfo, data: bytes = b"") -> LayerTar:
        info.size = len(data) if info.isreg() else info.size
        self._tar.addfile(info, io.BytesIO(data) if data else None)
        return self

    def bytes(self) -> bytes:
        self._tar.close()
        return self._buf.getvalue()

    def stream(self) -> io.BytesIO:
        return io.BytesIO(self.bytes())


def header_block(name: bytes, *, kind: bytes = tarfile.REGTYPE, size_field: bytes | None = None,
                 size: int = 0, extra: dict[int, bytes] | None = None) -> bytes:
    """One hand-made ustar header block, for sizes and fields tarfile refuses to write."""
    block = bytearray(512)
    block[0:len(name)] = name
    block[100:108] = b"0000644\0"
    block[108:116] = b"0000000\0"
    block[116:124] = b"0000000\0"
    block[124:136] = size_field if size_field is not None else tarfile.itn(size, 12, tarfile.GNU_FORMAT)
    block[136:148] = b"%011o\0" % 1_700_000_000
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    for offset, value in (extra or {}).items():
        block[offset:offset + len(value)] = value
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


def pax_record(key: str, value: str) -> bytes:
    """One PAX record, "<len> key=value\n", where <len> counts itself."""
    body = f" {key}={value}\n".encode()
    length = len(body) + 1
    while len(str(length).encode()) + len(body) != length:
        length += 1
    return str(length).encode() + body


def pad(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 512)


END = b"\0" * 1024
