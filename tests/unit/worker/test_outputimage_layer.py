"""The output layer written in one read of the EIF: its bytes, digests and compression (worker/pipeline/outputimage.py)."""
from __future__ import annotations

import gzip
import hashlib
import io
import random
import tarfile
from pathlib import Path

import pytest
import zstandard

from common.enclave.writer import Section, WrittenEif, write_eif
from common.errors import InvalidEif
from common.image.compress import OUTPUT_COMPRESSIONS
from common.util.compression import Compression
from tests.fixtures.eif_vector import TV1_METADATA
from worker.pipeline.outputimage import OutputLayer, write_layer

FILES = {"run": b"\x7fELF launcher", "measurements.json": b'{"Measurements": {}}\n', "launch.json": b"{}\n"}


@pytest.fixture
def eif(tmp_path: Path) -> tuple[Path, WrittenEif]:
    path = tmp_path / "app.eif"
    ramdisk = random.Random(9).randbytes(2 << 20) + b"cpio-like " * 200_000
    with path.open("wb") as out:
        written = write_eif(out, kernel=Section.of_bytes(b"KERNEL"), cmdline=b"console=ttyS0",
                                   metadata=TV1_METADATA,
                                   ramdisks=[Section.of_bytes(b"RAMDISK0"), Section.of_bytes(ramdisk)])
    return path, written


def reference_tar(eif: Path) -> bytes:
    """What tarfile's stream mode writes for the same members: the layer's plain bytes must be these."""
    buf = io.BytesIO()

    def info(name: str, size: int, mode: int, kind: bytes = tarfile.REGTYPE) -> tarfile.TarInfo:
        member = tarfile.TarInfo(name)
        member.size, member.mode, member.type, member.mtime, member.uname, member.gname = size, mode, kind, 0, "", ""
        return member

    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.USTAR_FORMAT) as tar:
        tar.addfile(info("enclave", 0, 0o755, tarfile.DIRTYPE))
        with eif.open("rb") as f:
            tar.addfile(info("enclave/app.eif", eif.stat().st_size, 0o644), f)
        for name in sorted(FILES):
            tar.addfile(info(f"enclave/{name}", len(FILES[name]), 0o755 if name == "run" else 0o644),
                        io.BytesIO(FILES[name]))
    return buf.getvalue()


def decompress(layer: OutputLayer) -> bytes:
    blob = layer.path.read_bytes()
    if layer.blob.media_type.endswith("+zstd"):
        return zstandard.ZstdDecompressor().stream_reader(io.BytesIO(blob), read_across_frames=True).read()
    return gzip.decompress(blob)


@pytest.mark.parametrize("kind", OUTPUT_COMPRESSIONS)
def test_outputimage_layer_bytes_and_digests(eif: tuple[Path, WrittenEif], tmp_path: Path, kind: Compression) -> None:
    path, written = eif
    layer = write_layer(path, FILES, tmp_path / "layer", compression=kind, written=written, threads=2)
    blob = layer.path.read_bytes()
    plain = decompress(layer)
    assert plain == reference_tar(path)
    assert layer.diff_id == f"sha256:{hashlib.sha256(plain).hexdigest()}"
    assert (layer.blob.digest, layer.blob.size) == (f"sha256:{hashlib.sha256(blob).hexdigest()}", len(blob))
    assert layer.blob.media_type == f"application/vnd.oci.image.layer.v1.tar+{kind.value}"
    assert layer.eif_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("kind", OUTPUT_COMPRESSIONS)
def test_outputimage_layer_digest_does_not_depend_on_threads(eif: tuple[Path, WrittenEif], tmp_path: Path,
                                                             kind: Compression) -> None:
    path, written = eif
    digests = {write_layer(path, FILES, tmp_path / f"layer-{n}", compression=kind, written=written,
                           threads=n).blob.digest for n in (1, 2, 5)}
    assert len(digests) == 1


def test_outputimage_layer_refuses_an_eif_changed_after_writing(eif: tuple[Path, WrittenEif], tmp_path: Path) -> None:
    path, written = eif
    data = bytearray(path.read_bytes())
    data[-5000] ^= 0x40
    path.write_bytes(bytes(data))
    with pytest.raises(InvalidEif) as exc:
        write_layer(path, FILES, tmp_path / "layer", written=written)
    assert exc.value.details["reason"] == "crc_mismatch"


def test_outputimage_layer_refuses_a_short_eif(eif: tuple[Path, WrittenEif], tmp_path: Path) -> None:
    path, written = eif
    with path.open("r+b") as f:
        f.truncate(written.size - 1)
    with pytest.raises(InvalidEif) as exc:
        write_layer(path, FILES, tmp_path / "layer", written=written)
    assert exc.value.details["reason"] == "truncated"
