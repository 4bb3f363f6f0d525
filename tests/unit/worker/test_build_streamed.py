"""The EIF and its output layer made in one pass (`build_eif(consumer=)` + `LayerWriter`): the same bytes and
digests as writing the EIF and reading it back into `write_layer` (worker/pipeline/build.py, outputimage.py)."""
from __future__ import annotations

import hashlib
import io
import random
import tarfile
import threading
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
from isal.isal_zlib import crc32

from common.enclave.launch import launch_spec
from common.enclave.reader import read_eif
from common.enclave.writer import KnownSpan
from common.errors import InvalidEif
from common.image.filetree import SpoolContent, Tree
from common.image.layers import ApplyState, Limits, apply_layer
from common.util.compression import Compression
from tests.fixtures.signing import make_signer
from worker.pipeline.build import BuiltEif, EifIdentity, build_eif
from worker.pipeline.outputimage import LayerWriter, OutputLayer, write_layer

FILES = {"run": b"\x7fELF launcher", "launch.json": b"{}\n"}


@pytest.fixture
def blobs(tmp_path: Path) -> Path:
    d = tmp_path / "blobs"
    d.mkdir()
    rng = random.Random(1)
    (d / "bzImage").write_bytes(rng.randbytes(3 << 20))
    (d / "cmdline").write_bytes(b"console=ttyS0\n")
    (d / "init").write_bytes(b"\x7fELF init" + rng.randbytes(5000))
    (d / "nsm.ko").write_bytes(b"nsm" * 1000)
    return d


@pytest.fixture
def tree(tmp_path: Path) -> Tree:
    """An image applied from a layer tar as the pull does it: its files spooled, each with its CRC."""
    rng = random.Random(2)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tar:
        for name, data in [("bin/app", rng.randbytes(3 << 20)), ("etc/conf", b"key=value\n"),
                           ("usr/share/doc", b"text " * 50_000), ("empty", b"")]:
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o755, 1_700_000_000
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("bin/again")
        link.type, link.linkname = tarfile.LNKTYPE, "bin/app"
        tar.addfile(link)
    buf.seek(0)
    result = Tree()
    apply_layer(result, buf, spool_dir=tmp_path / "spool", limits=Limits(), state=ApplyState())
    return result


def _build(tree: Tree, blobs: Path, out: Path | None, consumer: Callable[[int, Sequence[KnownSpan]],
           Callable[[bytes], None]] | None, **kwargs: object) -> BuiltEif:
    return build_eif(tree, launch_spec({}, entrypoint=["/bin/app"]), EifIdentity("test", "1", None),
                     blobs_dir=blobs, out_path=out, cpu_count=2, mem_size_mib=None, consumer=consumer,
                     **kwargs)  # type: ignore[arg-type]


def _layer_consumer(path: Path, made: list[LayerWriter]) -> Callable[[int, Sequence[KnownSpan]],
                                                                     Callable[[bytes], None]]:
    def consumer(size: int, spans: Sequence[KnownSpan]) -> Callable[[bytes], None]:
        made.append(LayerWriter(path, size, compression=Compression.GZIP, spans=spans, threads=2))
        return made[0].write
    return consumer


def test_pull_records_each_spooled_files_crc(tree: Tree) -> None:
    for path in (b"bin/app", b"etc/conf", b"usr/share/doc"):
        node = tree.lookup(path)
        assert node is not None and isinstance(node.content, SpoolContent)
        with node.content.open() as f:
            assert node.content.crc == crc32(f.read())


@pytest.mark.parametrize("keep_file", [True, False], ids=["file", "no-file"])
def test_streamed_layer_equals_the_layer_read_back(tree: Tree, blobs: Path, tmp_path: Path, keep_file: bool) -> None:
    reference = _build(tree, blobs, tmp_path / "ref.eif", None)
    assert reference.path is not None and not reference.streamed
    expected = write_layer(reference.path, FILES, tmp_path / "ref.layer", written=reference.written, threads=2)

    made: list[LayerWriter] = []
    eif = _build(tree, blobs, tmp_path / "app.eif" if keep_file else None, _layer_consumer(tmp_path / "layer", made))
    assert eif.streamed and len(made) == 1
    layer: OutputLayer = made[0].finish(FILES, eif.written)
    assert (layer.blob, layer.diff_id, layer.eif_sha256) == (expected.blob, expected.diff_id, expected.eif_sha256)
    assert layer.path.read_bytes() == expected.path.read_bytes()
    assert eif.measurements == reference.measurements and eif.written == reference.written
    assert eif.size == reference.size
    if keep_file:
        assert eif.path is not None and eif.path.read_bytes() == reference.path.read_bytes()
        assert read_eif(eif.path).measurements == eif.measurements
    else:
        assert eif.path is None and not (tmp_path / "app.eif").exists()
    assert layer.eif_sha256 == hashlib.sha256(reference.path.read_bytes()).hexdigest()
    assert not [t for t in threading.enumerate() if t.name.startswith(("nitroconv-pcr", "nitroconv-gzip"))]


def test_signed_eif_is_not_streamed(tree: Tree, blobs: Path, tmp_path: Path) -> None:
    """A signed EIF's header is final only after its signature: the consumer is never asked."""
    made: list[LayerWriter] = []
    eif = _build(tree, blobs, tmp_path / "app.eif", _layer_consumer(tmp_path / "layer", made), signer=make_signer(tmp_path))
    assert not eif.streamed and made == [] and eif.measurements.pcr8
    with pytest.raises(ValueError):
        _build(tree, blobs, None, _layer_consumer(tmp_path / "layer", made), signer=make_signer(tmp_path))


def test_streamed_layer_refuses_an_eif_cut_short(tree: Tree, blobs: Path, tmp_path: Path) -> None:
    made: list[LayerWriter] = []
    eif = _build(tree, blobs, None, _layer_consumer(tmp_path / "layer", made))
    short = LayerWriter(tmp_path / "short", eif.size, threads=2)
    short.write(b"\0" * 1000)
    with pytest.raises(InvalidEif) as err:
        short.finish(FILES, eif.written)
    assert err.value.details["reason"] == "truncated"
    made[0].abort()
