"""The content-addressed blob cache and layer streams that verify DiffIDs after draining."""
from __future__ import annotations

import gzip
import io
import tarfile

import pytest
import zstandard

from common.errors import DigestMismatch, InvalidDigest, InvalidLayer, LimitExceeded, UnsupportedMediaType
from common.registry.blobcache import BlobStore, open_layer
from common.registry.digest import Digest
from common.registry.manifests import OCI_LAYER, OCI_LAYER_GZIP, OCI_LAYER_ZSTD, Descriptor
from common.util.compression import Compression


def make_tar(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


TAR = make_tar({"etc/hello": b"hello\n" * 100, "bin/app": b"\x7fELF" + bytes(5000)})
DIFF_ID = Digest.of(TAR)
COMPRESSORS = {
    OCI_LAYER_GZIP: lambda b: gzip.compress(b, mtime=0),
    OCI_LAYER_ZSTD: zstandard.ZstdCompressor().compress,
    OCI_LAYER: lambda b: b,
}


def names_through_tarfile(path, media_type, diff_id, **kw) -> list[str]:
    with open_layer(path, media_type, diff_id, **kw) as stream, tarfile.open(fileobj=stream, mode="r|") as tar:
        return [m.name for m in tar]


@pytest.mark.parametrize("media_type", list(COMPRESSORS))
def test_open_layer_streams_and_verifies(tmp_path, media_type):
    path = tmp_path / "blob"
    path.write_bytes(COMPRESSORS[media_type](TAR))
    assert names_through_tarfile(path, media_type, DIFF_ID) == ["etc/hello", "bin/app"]


@pytest.mark.parametrize("media_type", list(COMPRESSORS))
def test_open_layer_wrong_diff_id_fails(tmp_path, media_type):
    path = tmp_path / "blob"
    path.write_bytes(COMPRESSORS[media_type](TAR))
    with pytest.raises(DigestMismatch) as exc:
        names_through_tarfile(path, media_type, Digest.of(b"other"))
    assert exc.value.code == "digest_mismatch"


@pytest.mark.parametrize("media_type", list(COMPRESSORS))
def test_open_layer_trailing_junk_after_tar_eof_counts(tmp_path, media_type):
    # tarfile stops at the end-of-archive blocks and never reads the junk: only draining catches it.
    path = tmp_path / "blob"
    path.write_bytes(COMPRESSORS[media_type](TAR + b"JUNK" * 3000))
    with pytest.raises(DigestMismatch):
        names_through_tarfile(path, media_type, DIFF_ID)


def test_open_layer_second_gzip_member_counts(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(TAR) + gzip.compress(b"more"))
    with pytest.raises(DigestMismatch):
        names_through_tarfile(path, OCI_LAYER_GZIP, DIFF_ID)


# mtime=0: the blobs are in the test ids, which every xdist worker must collect alike (a gzip header's time, one
# second apart between two workers, failed a CI run before any test ran).
@pytest.mark.parametrize("media_type,blob,error", [
    (OCI_LAYER_GZIP, gzip.compress(TAR, mtime=0) + b"trailing garbage", InvalidLayer),
    (OCI_LAYER_GZIP, gzip.compress(TAR, mtime=0)[:-20], InvalidLayer),
    (OCI_LAYER_ZSTD, zstandard.ZstdCompressor().compress(TAR) + b"trailing garbage", InvalidLayer),
    # python-zstandard ends a truncated frame quietly; the DiffID check is the backstop.
    (OCI_LAYER_ZSTD, zstandard.ZstdCompressor().compress(TAR)[:-20], DigestMismatch),
    (OCI_LAYER_GZIP, b"not gzip at all", InvalidLayer),
])
def test_open_layer_corrupt_compression_fails(tmp_path, media_type, blob, error):
    path = tmp_path / "blob"
    path.write_bytes(blob)
    with pytest.raises(error):
        names_through_tarfile(path, media_type, DIFF_ID)


def test_open_layer_bomb_guard(tmp_path):
    bomb = bytes(20 * 1024 * 1024)
    path = tmp_path / "blob"
    path.write_bytes(gzip.compress(bomb))
    with pytest.raises(LimitExceeded) as exc, open_layer(path, OCI_LAYER_GZIP, Digest.of(bomb), max_bytes=1 << 20) as s:
        while s.read(65536):
            pass
    assert exc.value.details["limit"] == 1 << 20


def test_open_layer_verifies_at_eof_without_context_manager(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(TAR)
    stream = open_layer(path, Compression.NONE, Digest.of(b"x"))
    try:
        with pytest.raises(DigestMismatch):
            while stream.read(4096):
                pass
    finally:
        stream.close()


def test_open_layer_does_not_verify_when_the_consumer_failed(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(TAR)
    with pytest.raises(RuntimeError, match="consumer"), open_layer(path, OCI_LAYER, Digest.of(b"x")):
        raise RuntimeError("consumer failed first")


def test_open_layer_unknown_media_type(tmp_path):
    with pytest.raises(UnsupportedMediaType):
        open_layer(tmp_path / "blob", "application/x-rar", DIFF_ID)


def test_blobstore_paths_are_validated(tmp_path):
    store = BlobStore(tmp_path)
    assert store.path(DIFF_ID) == tmp_path / "sha256" / DIFF_ID.hex
    for bad in ("sha256:../../etc/passwd", "sha256:" + "A" * 64, "../x"):
        with pytest.raises(InvalidDigest):
            store.path(bad)


def test_blobstore_add_get_verify(tmp_path):
    store = BlobStore(tmp_path)
    data = b"config bytes"
    digest = Digest.of(data)
    descriptor = Descriptor("application/vnd.oci.image.config.v1+json", digest, len(data))
    assert store.get(descriptor) is None
    path = store.add_bytes(data, digest)
    assert store.get(descriptor) == path and path.read_bytes() == data
    assert store.get(Descriptor(descriptor.media_type, digest, len(data) + 1)) is None
    assert store.verify(descriptor)
    path.write_bytes(b"config bytez")  # same size, tampered
    assert not store.verify(descriptor) and not path.exists()
    with pytest.raises(DigestMismatch):
        store.add_bytes(b"other", digest)
    assert not list(tmp_path.rglob("*.part"))
