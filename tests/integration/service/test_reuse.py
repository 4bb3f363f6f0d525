"""Whole-conversion reuse: a real worker, real registries, the cache on disk; hits, misses, access, mounts."""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from api.schemas.builds import BuildSchema
from common.errors import Unauthorized
from common.registry.client import Credentials
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import image_config, make_layer, push_test_image
from tests.fixtures.require import skip_or_fail
from worker.pipeline.bootcheck import QEMU
from worker.pipeline.emulatorboot import BootCheckPlan
from worker.pipeline.host import ConversionHost
from worker.pipeline.outputimage import fetch_eif
from worker.pipeline.reuse import ConversionCache, convert_reusing
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

from .conftest import Flow
from .helpers import convert_request, ok, wait_ended

pytestmark = pytest.mark.integration


def _submit_and_wait(client, tenant, body: dict) -> tuple[dict, float]:  # noqa: ANN001
    """The Build once it ended, and the seconds from submission until the API showed it ended."""
    start = time.monotonic()
    resp = client.post("/v1/builds/convert-app/nitro-enclaves", json=body, headers=tenant.headers("WRITER"))
    # Polled often: the time to SUCCEEDED of a reused conversion is a figure this module prints.
    build = wait_ended(client, tenant.headers(), ok(resp, BuildSchema, 200)["build_id"], every=0.02)
    return build, time.monotonic() - start


def _uploads_to(registry, repo: str) -> list[str]:  # noqa: ANN001
    """PUTs that completed a blob upload into `repo` (the registry's own access log)."""
    return registry.log_lines(rf'"PUT /v2/{re.escape(repo)}/blobs/uploads/')


def _mounts_into(registry, repo: str) -> list[str]:  # noqa: ANN001
    return registry.log_lines(rf'"POST /v2/{re.escape(repo)}/blobs/uploads/\?[^"]*mount=')


def test_resubmission_reuses_the_conversion_and_mounts_the_layer(flow: Flow, registry, tmp_path, capsys):
    s, client, _ = flow
    image = push_test_image(registry, f"reuse/app-{uuid.uuid4().hex[:6]}", "1")
    src = f"{registry.host}/{image.repo}:1"
    tenant = flow.tenant()
    app_id = tenant.create_app()
    out1, out2 = f"reuse/out-{uuid.uuid4().hex[:6]}", f"reuse/other-{uuid.uuid4().hex[:6]}"

    first, fresh_seconds = _submit_and_wait(client, tenant, convert_request(app_id, src, f"{registry.host}/{out1}:1"))
    assert first["conversion"]["state"] == "SUCCEEDED", first["conversion"]
    assert first["conversion"]["reused_from"] is None

    second, reuse_seconds = _submit_and_wait(client, tenant, convert_request(app_id, src, f"{registry.host}/{out2}:7"))
    c1, c2 = first["conversion"], second["conversion"]
    assert c2["state"] == "SUCCEEDED", c2
    assert c2["reused_from"] == first["build_id"]
    assert c2["output_digest"] == c1["output_digest"] and c2["eif_sha256"] == c1["eif_sha256"]
    assert second["attributes"]["eif"]["nitro_enclave"] == first["attributes"]["eif"]["nitro_enclave"]
    assert second["docker_info"]["docker_image_name"].startswith(f"{registry.host}/{out2}")
    # The layer was mounted from the first output repository: the only upload into the new one is the config's.
    assert len(_mounts_into(registry, out2)) == 1
    assert len(_uploads_to(registry, out2)) == 1  # the config only; the layer came by mount
    assert len(_uploads_to(registry, out1)) == 2  # layer and config, converted afresh
    # What was pushed under the new name is the very EIF.
    eif_sha = fetch_eif(f"{registry.host}/{out2}:7", tmp_path / "app.eif", credentials=None,
                        insecure_registries=s.insecure_registries)
    assert eif_sha == c1["eif_sha256"]
    with capsys.disabled():
        print(f"\n[reuse] submission -> SUCCEEDED: fresh {fresh_seconds:.2f}s, resubmitted {reuse_seconds:.2f}s")


def test_no_hit_without_access_to_the_input(flow: Flow, basic_registry, registry):
    s, client, _ = flow
    image = push_test_image(basic_registry, f"reuse/private-{uuid.uuid4().hex[:6]}", "1")
    src = f"{basic_registry.host}/{image.repo}:1"
    owner = flow.tenant()
    good = {"username": basic_registry.username, "password": basic_registry.password}
    first, _ = _submit_and_wait(client, owner, convert_request(owner.create_app(), src, f"{registry.host}/reuse/p1:1",
                                                        auth=good))
    assert first["conversion"]["state"] == "SUCCEEDED", first["conversion"]
    stranger = flow.tenant()
    app_id = stranger.create_app()
    for auth in ({"username": basic_registry.username, "password": "wrong-password"}, None):
        build, _ = _submit_and_wait(client, stranger, convert_request(app_id, src, f"{registry.host}/reuse/p2:1", auth=auth))
        assert build["conversion"]["state"] == "FAILED", build["conversion"]
        assert build["conversion"]["error"]["code"] == "unauthorized"
        assert build["conversion"]["reused_from"] is None and build["conversion"]["output_digest"] is None


def test_a_changed_option_is_a_miss(flow: Flow, registry):
    s, client, _ = flow
    image = push_test_image(registry, f"reuse/opt-{uuid.uuid4().hex[:6]}", "1")
    src = f"{registry.host}/{image.repo}:1"
    tenant = flow.tenant()
    app_id = tenant.create_app()
    a, _ = _submit_and_wait(client, tenant, convert_request(app_id, src, f"{registry.host}/reuse/opt-a:1"))
    b, _ = _submit_and_wait(client, tenant, convert_request(app_id, src, f"{registry.host}/reuse/opt-b:1", env="GREETING=ho"))
    assert a["conversion"]["state"] == b["conversion"]["state"] == "SUCCEEDED"
    assert b["conversion"]["reused_from"] is None
    assert a["attributes"]["eif"]["nitro_enclave"]["pcr2"] != b["attributes"]["eif"]["nitro_enclave"]["pcr2"]


# --- the engine's entry point, in this process, against the same real registry --------------------------------
@pytest.fixture
def local(flow, registry, tmp_path: Path):  # noqa: ANN001, ANN201
    s, _, _ = flow
    image = push_test_image(registry, f"reuse/local-{uuid.uuid4().hex[:6]}", "1")

    def run(output: str, *, owner: str = "", blobs_dir: Path | None = None, creds: Credentials | None = None,
            eif_out: Path | None = None):  # noqa: ANN202
        spec = ConvertSpec(input_ref=f"{registry.host}/{image.repo}:1", output_ref=f"{registry.host}/{output}:1",
                           input_credentials=creds, output_credentials=None,
                           options=ConverterOptions(env_vars=("GREETING=hi",)), cpu_count=2, mem_size_mib=512,
                           owner=owner)
        host = replace(_host(s, tmp_path), blobs_dir=blobs_dir or s.blobs_dir)
        scratch = tmp_path / f"scratch-{uuid.uuid4().hex[:6]}"
        return convert_reusing(spec, host, Progress(), Workspace(scratch, eif_out=eif_out))

    return run


def _host(s, tmp_path: Path, cache: str = "cache") -> ConversionHost:  # noqa: ANN001
    """The service's host, with this test's own cache."""
    return replace(ConversionHost.from_settings(s), cache_dir=tmp_path / cache)


def test_a_changed_blob_is_a_miss(local, flow, tmp_path: Path):
    s, _, _ = flow
    first = local("reuse/blob-a")
    assert first.reused_from is None
    assert local("reuse/blob-b").reused_from == first.output_reference
    blobs = tmp_path / "blobs"
    shutil.copytree(s.blobs_dir, blobs)
    with (blobs / "bzImage.config").open("a") as f:
        f.write("# another kernel build\n")
    again = local("reuse/blob-c", blobs_dir=blobs)
    assert again.reused_from is None and again.eif_sha256 == first.eif_sha256  # converted again, same EIF


def test_an_evicted_layer_is_a_miss_and_is_converted_again(local, flow, tmp_path: Path):
    first = local("reuse/evict-a")
    cache = ConversionCache(_host(flow.s, tmp_path))
    [record_file] = cache.dir.glob("*.json")
    record = json.loads(record_file.read_text())
    layer = cache.layer_descriptor(record)
    assert cache.blobs.get(layer) is not None
    cache.blobs.recent_seconds = 0
    cache.blobs.trim(1)  # evict everything
    assert cache.blobs.get(layer) is None
    again = local("reuse/evict-b")
    assert again.reused_from is None and again.eif_sha256 == first.eif_sha256
    assert cache.blobs.get(layer) is not None  # stored again ...
    assert local("reuse/evict-c", eif_out=tmp_path / "hit.eif").reused_from is not None  # ... so the next one hits
    assert hashlib.sha256((tmp_path / "hit.eif").read_bytes()).hexdigest() == first.eif_sha256


def test_mounts_only_from_the_owners_repositories_and_a_declined_mount_uploads(local, flow, registry, tmp_path: Path):
    first = local("reuse/own-a", owner="acct-1")
    # Another owner reuses the conversion but must not mount from acct-1's repository (RELIABILITY §D73).
    other = local("reuse/theirs-b", owner="acct-2")
    assert other.reused_from is not None and other.reused_from.startswith("cache:")
    assert other.output_digest == first.output_digest
    assert _mounts_into(registry, "reuse/theirs-b") == [] and len(_uploads_to(registry, "reuse/theirs-b")) == 2
    # A record naming a repository that lacks the layer: the registry answers the mount with 202 and the
    # upload goes on in that session.
    cache = ConversionCache(_host(flow.s, tmp_path))
    [record_file] = cache.dir.glob("*.json")
    record = json.loads(record_file.read_text())
    empty = f"reuse/empty-{uuid.uuid4().hex[:6]}"
    record["pushes"] = [{"owner": "acct-1", "registry": registry.host, "repository": empty,
                         "reference": f"{registry.host}/{empty}:1", "build_id": None}]
    record_file.write_text(json.dumps(record))
    out = f"reuse/declined-{uuid.uuid4().hex[:6]}"
    declined = local(out, owner="acct-1", eif_out=tmp_path / "declined.eif")
    assert declined.reused_from is not None and declined.output_digest == first.output_digest
    assert len(_mounts_into(registry, out)) == 1 and len(_uploads_to(registry, out)) == 2
    mounted = registry.log_lines(rf'"POST /v2/{re.escape(out)}/blobs/uploads/\?[^"]*mount=[^"]*" 202')
    assert len(mounted) == 1


def test_the_caller_credentials_are_checked_on_every_hit(local, basic_registry, flow, tmp_path: Path):
    s, _, _ = flow
    image = push_test_image(basic_registry, f"reuse/lp-{uuid.uuid4().hex[:6]}", "1")
    spec = ConvertSpec(input_ref=f"{basic_registry.host}/{image.repo}:1", output_ref=f"{basic_registry.host}/x:1",
                       input_credentials=Credentials(basic_registry.username or "", basic_registry.password or ""),
                       output_credentials=Credentials(basic_registry.username or "", basic_registry.password or ""),
                       options=ConverterOptions(), cpu_count=2, mem_size_mib=512)
    host = _host(s, tmp_path, "c")
    assert convert_reusing(spec, host, Progress(), Workspace(tmp_path / "s1")).reused_from is None
    assert convert_reusing(spec, host, Progress(), Workspace(tmp_path / "s2")).reused_from is not None
    with pytest.raises(Unauthorized):
        convert_reusing(replace(spec, input_credentials=Credentials(basic_registry.username or "", "nope")),
                        host, Progress(), Workspace(tmp_path / "s3"))


@pytest.mark.qemu
def test_a_hit_with_the_boot_check_on_reuses_the_recorded_boot(flow, registry, tmp_path: Path):
    s, _, _ = flow
    if shutil.which(QEMU) is None:
        skip_or_fail(f"{QEMU} is not installed")
    busybox = make_layer(busybox_base_tar())
    config = image_config([busybox.diff_id], cmd=(), Entrypoint=["/bin/echo", "booted-for-reuse"])
    image = push_test_image(registry, f"reuse/boot-{uuid.uuid4().hex[:6]}", "1", [busybox], config=config)

    def run(output: str):  # noqa: ANN202
        spec = ConvertSpec(input_ref=image.ref, output_ref=f"{registry.host}/{output}:1", input_credentials=None,
                           output_credentials=None, options=ConverterOptions(), cpu_count=2, mem_size_mib=None)
        host = replace(_host(s, tmp_path), boot_check=BootCheckPlan(timeout=90.0))
        return convert_reusing(spec, host, Progress(), Workspace(tmp_path / f"s-{output.rpartition('/')[2]}"))

    first = run("reuse/boot-a")
    assert first.reused_from is None and first.boot_check is not None and first.boot_check["ok"] is True
    started = time.monotonic()
    second = run("reuse/boot-b")
    assert second.reused_from is not None and second.boot_check == first.boot_check
    assert time.monotonic() - started < float(first.boot_check["seconds"])  # it did not boot again
    assert second.mem_size_mib == first.mem_size_mib


def test_a_damaged_record_is_a_miss(local, flow, tmp_path: Path):
    first = local("reuse/damaged-a")
    [record_file] = ConversionCache(_host(flow.s, tmp_path)).dir.glob("*.json")
    record = json.loads(record_file.read_text())
    del record["measurements"]["pcr2"]
    record_file.write_text(json.dumps(record))
    again = local("reuse/damaged-b")
    assert again.reused_from is None and again.measurements == first.measurements
    assert local("reuse/damaged-c").reused_from is not None  # recorded afresh
