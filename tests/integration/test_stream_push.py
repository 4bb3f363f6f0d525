"""The output layer streamed to a real registry while it is compressed (worker.pipeline.streamupload).

Streaming must be invisible in what is pushed (the same digests as a whole-file upload), must fall back to
the whole-file upload on any registry failure, must send nothing when the boot check is on, and a cancel
or an abandoned stream must leave neither a thread nor an upload session behind.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

import pytest

from common.enclave.reader import CrcOfStream
from common.enclave.writer import WrittenEif
from common.errors import BootCheckFailed, InvalidEif
from common.registry.digest import Digest
from tests.fixtures.devblobs import blobs_target, build_dev_blobs, build_shim, runtime_target
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.hostile import HostileRegistry, Reply
from tests.fixtures.images import OCI_MANIFEST, PushSession, image_config, make_layer, push_test_image
from tests.fixtures.registries import RunningRegistry, client_for
from worker.pipeline.convert import convert
from worker.pipeline.emulatorboot import BootCheckPlan
from worker.pipeline.host import ConversionHost
from worker.pipeline.outputimage import write_layer
from worker.pipeline.spec import ConverterOptions, ConvertResult, ConvertSpec, Progress, Workspace
from worker.pipeline.streamupload import THREAD_NAME, LayerStream

pytestmark = pytest.mark.integration


def _stream_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == THREAD_NAME and t.is_alive()]


def _pieces(total: int, piece: int = 100_000) -> list[bytes]:
    data = os.urandom(total)
    return [data[i:i + piece] for i in range(0, total, piece)]


def _session_gone(front: HostileRegistry, registry: RunningRegistry, repo: str) -> bool:
    """The session the stream opened was DELETEd and the registry no longer knows it."""
    deletes = [s for s in front.seen if s.method == "DELETE" and "/blobs/uploads/" in s.path]
    if len(deletes) != 1:
        return False
    status = PushSession(registry).request("GET", deletes[0].path, repo)
    return status.status_code == 404


# --- the stream alone -------------------------------------------------------------------------------
def test_stream_sends_the_blob_as_one_streamed_patch(registry, hostile_front, repo_name) -> None:
    front = hostile_front(registry.host)
    pieces = _pieces(1_000_000)
    blob = b"".join(pieces)
    stream = LayerStream(client_for(registry, host=front.host), repo_name, chunk_bytes=256 * 1024, queue_pieces=2)
    for piece in pieces:
        stream.write(piece)
    stream.end()
    deadline = time.monotonic() + 30
    while _stream_threads() and time.monotonic() < deadline:
        time.sleep(0.01)
    # end() alone finished the request: nothing is held open until the commit, which may come much later.
    assert not _stream_threads() and stream.live, stream.failure
    assert stream.commit(f"sha256:{hashlib.sha256(blob).hexdigest()}", len(blob)), stream.failure
    # One request whose body went as it came, like `docker push` sends a layer: chunked, no range, no length.
    patches = [s for s in front.seen if s.method == "PATCH"]
    assert [(p.header("Transfer-Encoding"), p.header("Content-Range"), p.header("Content-Length"))
            for p in patches] == [("chunked", None, None)]
    assert [s.method for s in front.seen] == ["POST", "PATCH", "PUT"]
    assert front.connections() == 1
    with client_for(registry) as client:
        assert client.blob_exists(repo_name, Digest.of(blob))
    assert not _stream_threads()


def test_stream_refused_stops_and_deletes_the_session(registry, hostile_front, repo_name) -> None:
    front = hostile_front(registry.host)
    front.on("PATCH", "/blobs/uploads/", lambda seen, fwd: Reply(500, {}, b"boom"))
    pieces = _pieces(600_000)
    blob = b"".join(pieces)
    stream = LayerStream(client_for(registry, host=front.host), repo_name, chunk_bytes=200_000, queue_pieces=2)
    for piece in pieces:  # must not block or raise once the stream has stopped
        stream.write(piece)
    assert not stream.commit(str(Digest.of(blob)), len(blob))
    assert stream.failure is not None and "500" in stream.failure
    assert front.count("PUT", "/blobs/uploads/") == 0  # never closed: nothing was committed
    assert _session_gone(front, registry, repo_name)
    with client_for(registry) as client:
        assert not client.blob_exists(repo_name, Digest.of(blob))
    assert not _stream_threads()


def test_stream_cancelled_mid_stream_leaves_no_thread_and_no_session(registry, hostile_front, repo_name) -> None:
    front = hostile_front(registry.host)
    cancel = threading.Event()
    stream = LayerStream(client_for(registry, host=front.host), repo_name, chunk_bytes=100_000, queue_pieces=2,
                         should_cancel=cancel.is_set)
    pieces = _pieces(2_000_000)
    for i, piece in enumerate(pieces):
        if i == 3:
            deadline = time.monotonic() + 30
            while front.count("PATCH") < 1 and time.monotonic() < deadline:  # mid-stream: the body is on its way
                time.sleep(0.01)
            assert front.count("PATCH") == 1
            cancel.set()
        stream.write(piece)
    deadline = time.monotonic() + 30
    while stream.live and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.failure == "cancelled"
    stream.close()
    assert not _stream_threads()
    assert front.count("PUT") == 0
    assert _session_gone(front, registry, repo_name)


# --- through convert() ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def input_ref(registry: RunningRegistry) -> str:
    layer = make_layer(busybox_base_tar())
    return push_test_image(registry, "stream/app", "v1", [layer],
                           config=image_config([layer.diff_id], cmd=["/bin/echo", "hi"])).ref


def _convert(registry: RunningRegistry, front: HostileRegistry, input_ref: str, output: str, tmp: Path, *,
             stream_push: bool = True, boot_check: bool = False, entrypoint: tuple[str, ...] = ()
             ) -> ConvertResult:
    spec = ConvertSpec(input_ref=input_ref, output_ref=output, input_credentials=None, output_credentials=None,
                       options=ConverterOptions(entrypoint=entrypoint), cpu_count=2, mem_size_mib=None)
    host = ConversionHost(blobs_dir=build_dev_blobs(blobs_target()).dir, runtime_dir=build_shim(runtime_target()).parent,
                          cache_dir=tmp / "cache", insecure_registries=frozenset({registry.host, front.host}),
                          boot_check=BootCheckPlan() if boot_check else None, stream_push=stream_push)
    return convert(spec, host, Progress(), Workspace(tmp / "scratch"))


def _layer_digest(registry: RunningRegistry, repo: str, tag: str) -> str:
    manifest = PushSession(registry).request("GET", f"/v2/{repo}/manifests/{tag}", repo,
                                             headers={"Accept": OCI_MANIFEST})
    assert manifest.status_code == 200
    return str(json.loads(manifest.content)["layers"][-1]["digest"])


def _uploads(front: HostileRegistry, repo: str) -> list[str]:
    return [s.method for s in front.seen if f"/v2/{repo}/blobs/uploads/" in s.path]


def test_convert_streamed_pushes_the_same_image_as_a_whole_file_upload(registry, hostile_front, input_ref,
                                                                       tmp_path) -> None:
    front = hostile_front(registry.host)
    streamed = _convert(registry, front, input_ref, f"{front.host}/stream/streamed:v1", tmp_path / "a")
    whole = _convert(registry, front, input_ref, f"{front.host}/stream/whole:v1", tmp_path / "b", stream_push=False)
    assert streamed.output_digest == whole.output_digest
    assert streamed.layer_blob == whole.layer_blob
    assert _layer_digest(registry, "stream/streamed", "v1") == whole.layer_blob.digest  # type: ignore[union-attr]
    # The streamed layer went up in one PATCH and a bodiless PUT; the config is the only whole-file upload.
    streamed_puts = [s for s in front.seen if s.method == "PUT" and "/v2/stream/streamed/blobs/uploads/" in s.path]
    assert sorted(int(s.header("Content-Length") or 0) for s in streamed_puts)[0] == 0
    assert front.count("PATCH", "/v2/stream/streamed/") == 1
    assert front.count("PATCH", "/v2/stream/whole/") == 0
    assert not _stream_threads()


def test_convert_patch_failure_falls_back_and_pushes_the_same_digest(registry, hostile_front, input_ref,
                                                                     tmp_path) -> None:
    front = hostile_front(registry.host)
    front.on("PATCH", "/v2/stream/fallback/blobs/uploads/", lambda seen, fwd: Reply(503, {}, b"no chunks"))
    fell_back = _convert(registry, front, input_ref, f"{front.host}/stream/fallback:v1", tmp_path / "a")
    reference = _convert(registry, front, input_ref, f"{front.host}/stream/reference:v1", tmp_path / "b",
                         stream_push=False)
    assert fell_back.output_digest == reference.output_digest
    assert _layer_digest(registry, "stream/fallback", "v1") == reference.layer_blob.digest  # type: ignore[union-attr]
    assert front.count("PATCH", "/v2/stream/fallback/") == 1  # the first refusal stopped the stream
    assert front.count("DELETE", "/v2/stream/fallback/blobs/uploads/") == 1
    assert not _stream_threads()


@pytest.mark.qemu
def test_convert_failing_boot_check_sends_nothing_of_the_layer(registry, hostile_front, input_ref,
                                                               tmp_path) -> None:
    front = hostile_front(registry.host)
    missing = ("/no/such/program",)
    with pytest.raises(BootCheckFailed):
        _convert(registry, front, input_ref, f"{front.host}/stream/bootfail:v1", tmp_path / "a", boot_check=True,
                 entrypoint=missing)
    assert _uploads(front, "stream/bootfail") == []
    # The same conversion without the boot check names the layer the failed one would have pushed.
    same = _convert(registry, front, input_ref, f"{front.host}/stream/bootref:v1", tmp_path / "b",
                    entrypoint=missing)
    assert same.layer_blob is not None
    head = PushSession(registry).request("HEAD", f"/v2/stream/bootfail/blobs/{same.layer_blob.digest}",
                                         "stream/bootfail")
    assert head.status_code == 404


def test_stream_of_a_layer_failing_its_crc_check_is_never_committed(registry, hostile_front, repo_name,
                                                                     tmp_path) -> None:
    front = hostile_front(registry.host)
    eif = tmp_path / "app.eif"
    eif.write_bytes(os.urandom(3_000_000))
    crc = CrcOfStream()
    crc.update(eif.read_bytes())
    torn = WrittenEif(measurements=None, header=b"", size=3_000_000, crc=crc.value ^ 1)  # type: ignore[arg-type]
    stream = LayerStream(client_for(registry, host=front.host), repo_name, chunk_bytes=256 * 1024)
    try:  # as convert() holds it: closed whatever happens
        with pytest.raises(InvalidEif):
            write_layer(eif, {"run": b"#!/bin/sh\n"}, tmp_path / "layer.blob", written=torn, sink=stream.write)
        deadline = time.monotonic() + 30
        while front.count("PATCH") < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert front.count("PATCH") == 1  # the layer's bytes were on their way to the registry
    finally:
        stream.close()
    assert front.count("PUT") == 0
    assert _session_gone(front, registry, repo_name)
    with client_for(registry) as client:
        assert not client.blob_exists(repo_name, Digest.of((tmp_path / "layer.blob").read_bytes()))
    assert not _stream_threads()
