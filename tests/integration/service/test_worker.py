"""Submit -> real Celery worker process -> real pipeline -> real registry -> poll, and what the record says."""
from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from redis import Redis
from sqlalchemy import text

from api.schemas.builds import BuildSchema
from api.schemas.tasks import TaskSchema
from common.store.engine import session_scope
from tests.fixtures.images import push_test_image
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Workspace

from .conftest import Flow
from .helpers import convert_request, ok, wait_ended

pytestmark = pytest.mark.integration
CANARY = "canary-Pw-7f3e91"


def test_worker_converts_and_records_the_engines_pcrs(flow: Flow, registry, tmp_path: Path):
    s, client, _ = flow
    image = push_test_image(registry, f"svc/app-{uuid.uuid4().hex[:6]}", "1")
    src = f"{registry.host}/{image.repo}:1"
    tenant = flow.tenant()
    app_id = tenant.create_app()
    resp = client.post("/v1/builds/convert-app/nitro-enclaves",
                       json=convert_request(app_id, src, f"{registry.host}/svc/out:1"), headers=tenant.headers("WRITER"))
    build = wait_ended(client, tenant.headers(), ok(resp, BuildSchema, 200)["build_id"])
    conv = build["conversion"]
    assert conv["state"] == "SUCCEEDED", conv
    assert conv["progress"] == 1.0 and conv["attempts"] == 1 and conv["error"] is None
    assert conv["input_digest"] == image.digest and build["docker_info"]["docker_image_sha"] == conv["output_digest"]
    assert build["status"]["status"] == "PENDING" and build["pending_task_id"]

    # The engine run here on the same input and options gives the same measurements (reproducible).
    spec = ConvertSpec(
        input_ref=src, output_ref=f"{registry.host}/svc/reference:1", input_credentials=None,
        output_credentials=None, options=ConverterOptions(env_vars=("GREETING=hi",)), cpu_count=2, mem_size_mib=512)
    (tmp_path / "scratch").mkdir()
    host = ConversionHost(blobs_dir=s.blobs_dir, runtime_dir=s.runtime_dir, cache_dir=tmp_path / "cache",
                          insecure_registries=frozenset({registry.host}))
    direct = convert(spec, host, Progress(), Workspace(tmp_path / "scratch"))
    nitro = build["attributes"]["eif"]["nitro_enclave"]
    assert (nitro["pcr0"], nitro["pcr1"], nitro["pcr2"]) == (
        direct.measurements.pcr0, direct.measurements.pcr1, direct.measurements.pcr2)
    assert conv["eif_sha256"] == direct.eif_sha256
    # A request that said nothing of the network: the policy built is recorded explicitly, and is the engine's.
    assert conv["network"] == direct.network
    assert conv["network"]["ingress"] == [] and conv["network"]["egress"]["mode"] == "transparent"
    # The worker measured its host's kernel/cmdline/ramdisk 0 and deflated the kernel before its pool forked
    # (worker.pipeline.warm): what it built from those memos is what a fresh process builds.
    assert f"conversion memos warmed from {s.blobs_dir}" in flow.worker.log.read_text(errors="replace")

    task = ok(client.patch(f"/v1/tasks/{build['pending_task_id']}", json={"status": "APPROVED"},
                           headers=tenant.headers()), TaskSchema)
    assert task["status"]["status"] == "SUCCESS"
    build = ok(client.get(f"/v1/builds/{build['build_id']}", headers=tenant.headers()), BuildSchema)
    assert build["status"]["status"] == "WHITELISTED"


def test_worker_auto_approve_and_denial(flow: Flow, registry):
    s, client, _ = flow
    image = push_test_image(registry, f"svc/auto-{uuid.uuid4().hex[:6]}", "1")
    src = f"{registry.host}/{image.repo}:1"
    tenant = flow.tenant()
    auto, manual = tenant.create_app(auto_approve=True), tenant.create_app()
    ids = [ok(client.post("/v1/builds/convert-app/nitro-enclaves",
                          json=convert_request(app, src, f"{registry.host}/svc/auto-out-{i}:1"),
                          headers=tenant.headers("WRITER")), BuildSchema, 200)["build_id"]
           for i, app in enumerate((auto, manual))]
    auto_build, manual_build = (wait_ended(client, tenant.headers(), i) for i in ids)
    assert auto_build["conversion"]["state"] == "SUCCEEDED" and auto_build["status"]["status"] == "WHITELISTED"
    assert manual_build["status"]["status"] == "PENDING"
    ok(client.patch(f"/v1/tasks/{manual_build['pending_task_id']}", json={"status": "DENIED", "denial_reason": "no"},
                    headers=tenant.headers()), TaskSchema)
    assert ok(client.get(f"/v1/builds/{ids[1]}", headers=tenant.headers()), BuildSchema)["status"]["status"] == \
        "REJECTED"


def test_worker_wrong_credentials_fail_unauthorized_and_leak_nowhere(flow: Flow, basic_registry, registry):
    s, client, worker = flow
    image = push_test_image(basic_registry, f"svc/private-{uuid.uuid4().hex[:6]}", "1")
    tenant = flow.tenant()
    app_id = tenant.create_app()
    req = convert_request(app_id, f"{basic_registry.host}/{image.repo}:1", f"{registry.host}/svc/private-out:1",
                   auth={"username": basic_registry.username, "password": CANARY})
    resp = client.post("/v1/builds/convert-app/nitro-enclaves", json=req, headers=tenant.headers("WRITER"))
    assert CANARY not in resp.get_data(as_text=True)
    build = wait_ended(client, tenant.headers(), ok(resp, BuildSchema, 200)["build_id"])
    assert build["conversion"]["state"] == "FAILED"
    assert build["conversion"]["error"]["code"] == "unauthorized"
    assert build["status"]["status"] == "REJECTED"
    # The canary is in no sink: worker log, broker, database text columns and events.
    assert CANARY not in worker.log.read_text(errors="replace")
    r = Redis.from_url(s.redis_url)
    for key in r.keys("*"):
        kind = r.type(key)
        values = (r.lrange(key, 0, -1) if kind == b"list" else r.hvals(key) if kind == b"hash" else [])
        assert all(CANARY.encode() not in v for v in values)
    with session_scope(s.database_url) as session:
        dump = session.execute(text("SELECT b::text FROM builds b")).scalars().all()
        events = session.execute(text("SELECT e::text FROM build_events e")).scalars().all()
    assert not any(CANARY in row for row in [*dump, *events])


def test_worker_records_the_requested_network_policy(flow: Flow, registry):
    _, client, _ = flow
    image = push_test_image(registry, f"svc/net-{uuid.uuid4().hex[:6]}", "1")
    tenant = flow.tenant()
    request = convert_request(tenant.create_app(), f"{registry.host}/{image.repo}:1", f"{registry.host}/svc/net:1")
    request["request"]["converter_options"]["network"] = {
        "ingress": [{"port": 8443, "proxy_protocol": True}],
        "egress": {"mode": "proxy", "allow": [{"host": "*.Example.com", "ports": [443]}], "deny": [{"cidr": "10.0.0.0/8"}]}}
    submitted = ok(client.post("/v1/builds/convert-app/nitro-enclaves", json=request, headers=tenant.headers("WRITER")),
                   BuildSchema, 200)
    egress = {"mode": "proxy", "allow": [{"host": "*.example.com", "ports": [443]}],
              "deny": [{"cidr": "10.0.0.0/8", "ports": ["1-65535"]}]}
    # Stored and echoed normalized; what only the image can say (the host name here) is filled in by the build.
    assert submitted["conversion"]["request"]["converter_options"]["network"] == {
        "ingress": [{"port": 8443, "proxy_protocol": True}], "egress": egress, "hostname": None}
    assert submitted["conversion"]["network"] is None
    build = wait_ended(client, tenant.headers(), submitted["build_id"])
    assert build["conversion"]["state"] == "SUCCEEDED", build["conversion"]
    assert build["conversion"]["network"] == {"ingress": [{"port": 8443, "proxy_protocol": True}], "egress": egress,
                                              "hostname": image.repo.rsplit("/", 1)[1]}
