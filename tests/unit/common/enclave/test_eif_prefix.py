"""The writer's measured-prefix memo (common/enclave/prefix.py): kernel, cmdline and ramdisk 0 measured once per process,
the bytes still written every time, and a changed blob behind an unchanged key caught, never measured wrong."""
from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Hashable, Iterator
from pathlib import Path

import pytest

from common.enclave.measure import Measurements
from common.enclave.prefix import PREFIXES
from common.enclave.reader import CrcOfStream, read_eif
from common.enclave.writer import KnownSpan, Section, WrittenEif, write_eif
from common.errors import InvalidEif
from common.util.memo import file_identity
from tests.fixtures.eif_vector import TV1_CRC, TV1_METADATA, TV1_PCRS, TV1_SHA256
from tests.fixtures.signing import make_signer
from worker.pipeline.outputimage import write_layer


@pytest.fixture(autouse=True)
def empty_memo() -> Iterator[None]:
    PREFIXES.clear()
    yield
    PREFIXES.clear()


def keyed(data: bytes, key: Hashable) -> Section:
    return Section.of_bytes(data, key=key)


def write_tv1(kernel: bytes = b"KERNEL", ramdisk0: Section | None = None, ramdisk1: bytes = b"RAMDISK1",
              **kwargs: object) -> tuple[bytes, WrittenEif]:
    out = io.BytesIO()
    written = write_eif(out, kernel=keyed(kernel, "kernel-v1"), cmdline=b"console=ttyS0", metadata=TV1_METADATA,
                        ramdisks=[ramdisk0 or keyed(b"RAMDISK0", "boot-v1"), Section.of_bytes(ramdisk1)],
                        **kwargs)  # type: ignore[arg-type]
    return out.getvalue(), written


def crc_of(data: bytes) -> int:
    crc = CrcOfStream()
    crc.update(data)
    return crc.value


def test_prefix_memo_cold_and_warm_write_the_conformance_vector() -> None:
    cold, first = write_tv1()
    assert len(PREFIXES) == 1
    warm, second = write_tv1()
    for data, written in ((cold, first), (warm, second)):
        assert hashlib.sha256(data).hexdigest() == TV1_SHA256
        assert written.measurements == TV1_PCRS
        assert written.crc == TV1_CRC == crc_of(data)
    # The spans say where the keyed sections' bytes are: kernel at 560, cmdline, then ramdisk 0 after the metadata.
    assert second.spans == (KnownSpan(560, 6, "kernel-v1"), KnownSpan(578, 13, ("bytes", b"console=ttyS0")),
                            KnownSpan(876, 8, "boot-v1"))
    assert cold[560:566] == b"KERNEL" and cold[876:884] == b"RAMDISK0"


def test_prefix_memo_measures_the_application_ramdisk_every_time() -> None:
    write_tv1()
    _, other = write_tv1(ramdisk1=b"ANOTHER APP")
    pcr = lambda content: hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).hexdigest()  # noqa: E731
    assert other.measurements == Measurements(pcr(b"KERNELconsole=ttyS0RAMDISK0ANOTHER APP"), TV1_PCRS.pcr1,
                                              pcr(b"ANOTHER APP"))


def test_prefix_memo_is_used_only_when_the_whole_prefix_is_keyed() -> None:
    data, written = write_tv1(ramdisk0=Section.of_bytes(b"RAMDISK0"))
    assert len(PREFIXES) == 0 and written.measurements == TV1_PCRS
    assert hashlib.sha256(data).hexdigest() == TV1_SHA256


def test_prefix_memo_keeps_keys_apart() -> None:
    write_tv1()
    data, written = write_tv1(ramdisk0=keyed(b"RAMDISK9", "boot-v2"))
    assert len(PREFIXES) == 2
    assert written.measurements.pcr1 != TV1_PCRS.pcr1
    assert read_eif(io.BytesIO(data)).measurements == written.measurements


def test_prefix_memo_with_a_signer_signs_the_same_pcr0(tmp_path: Path) -> None:
    signer = make_signer(tmp_path)
    cold, first = write_tv1(signer=signer)
    warm, second = write_tv1(signer=signer)
    assert first.measurements == second.measurements and first.measurements.pcr8
    assert read_eif(io.BytesIO(warm)).measurements == second.measurements
    assert second.crc == crc_of(warm)


def test_changed_content_behind_an_unchanged_key_fails_the_written_check(tmp_path: Path) -> None:
    """Keys are file identities, which any rewrite changes; should content still change behind one, the CRC
    the writer reports is the remembered one, so the read that makes the layer refuses the file."""
    write_tv1()
    data, written = write_tv1(kernel=b"KERNEX")  # same key, other bytes
    assert written.measurements == TV1_PCRS  # measured from the memo: this is what the check must catch
    assert written.crc != crc_of(data)
    path = tmp_path / "app.eif"
    path.write_bytes(data)
    with pytest.raises(InvalidEif) as caught:
        write_layer(path, {}, tmp_path / "layer", written=written)
    assert caught.value.details["reason"] == "crc_mismatch"


def test_file_identity_changes_when_the_file_is_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "bzImage"
    path.write_bytes(b"kernel one")
    before = Section.of_file(path)
    assert before.key == ("file", file_identity(path)) and before.size == 10
    os.utime(path, ns=(1, 1))
    path.write_bytes(b"kernel two")  # same size
    assert Section.of_file(path).key != before.key
