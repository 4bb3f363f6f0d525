"""Boot check and memory sizing through the service: API -> real worker (boot check on) -> QEMU -> registry."""
from __future__ import annotations

import io
import json
import re
import shutil
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import pytest
import requests
from redis import Redis
from sqlalchemy import text

from api.app import create_app
from api.schemas.builds import BuildSchema
from common.enclave.reader import read_eif
from common.registry.manifests import MANIFEST_ACCEPT
from common.store.accounts import create_account, create_user
from common.store.engine import session_scope
from common.store.models import Membership
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import image_config, make_layer, push_test_image
from tests.fixtures.require import skip_or_fail
from tests.fixtures.service import PASSWORD, Tenant
from worker.pipeline.bootcheck import QEMU
from worker.pipeline.memory import MEM_STEP_MIB, minimum_mem_mib

from .conftest import start_worker
from .helpers import ok, submit

pytestmark = [pytest.mark.integration, pytest.mark.qemu]
GREETING = "hello from the enclave 4d1c"
MANIFEST_TYPES = ", ".join(MANIFEST_ACCEPT)  # what our registry client asks for


@dataclass
class Flow:
    client: Any
    registry: Any
    busybox: Any  # the busybox rootfs layer, pushed once per image

    def push(self, repo: str, entrypoint: list[str]) -> str:
        config = image_config([self.busybox.diff_id], cmd=(), Entrypoint=entrypoint)
        image = push_test_image(self.registry, repo, "1", [self.busybox], config=config)
        return f"{self.registry.host}/{image.repo}:1"


@pytest.fixture(scope="module")
def boot_flow(service_settings, registry) -> Iterator[Flow]:  # noqa: ANN001
    """One real worker process with the boot check on (as `make demo` runs it), on the test registry."""
    if not (service_settings.blobs_dir / "bzImage").exists():
        skip_or_fail(f"no dev blobs in {service_settings.blobs_dir} (make blobs)")
    if shutil.which(QEMU) is None:
        skip_or_fail(f"{QEMU} is not installed")
    s = replace(service_settings, insecure_registries=frozenset({registry.host}), boot_check=True,
                boot_check_timeout=120)
    Redis.from_url(s.redis_url).flushdb()  # messages of API-only tests would otherwise be consumed here
    with session_scope(s.database_url) as session:  # ...and so would their QUEUED rows, via the sweeper
        session.execute(text("UPDATE builds SET conversion_state='CANCELLED', approval_status='REJECTED' "
                             "WHERE conversion_state='QUEUED'"))
    worker = start_worker(s, f"boot{uuid.uuid4().hex[:6]}")
    try:
        yield Flow(create_app(s).test_client(), registry, make_layer(busybox_base_tar()))
    finally:
        worker.stop()


def _submit(flow: Flow, headers: dict[str, str], app_id: str, src: str, dst: str, **options: object) -> str:
    body = {"request": {"app_id": app_id, "input_image": {"name": src}, "output_image": {"name": dst}},
            "nitro_enclaves_options": {"cpu_count": 2, **options}}
    return submit(flow.client, headers, body)


def _poll(flow: Flow, headers: dict[str, str], build_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        build = ok(flow.client.get(f"/v1/builds/{build_id}", headers=headers), BuildSchema)
        if build["conversion"]["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}:
            return build
        time.sleep(0.5)
    raise AssertionError(f"conversion {build_id} did not end: {build['conversion']}")


def _manifest(registry: Any, ref: str) -> requests.Response:
    repo, _, tag = ref.split("/", 1)[1].rpartition(":")
    return requests.get(f"{registry.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}, timeout=30)


def _enclave_file(registry: Any, ref: str, name: str) -> bytes:
    """A file under /enclave/ of a converted image, read from its one layer in the registry."""
    resp = _manifest(registry, ref)
    assert resp.status_code == 200, resp.text
    repo = ref.split("/", 1)[1].rpartition(":")[0]
    (layer,) = resp.json()["layers"]
    blob = requests.get(f"{registry.url}/v2/{repo}/blobs/{layer['digest']}", timeout=60)
    assert blob.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(blob.content), mode="r:*") as tar:
        member = tar.extractfile(f"enclave/{name}")
        assert member is not None
        return member.read()


@pytest.fixture(scope="module")
def hello(boot_flow: Flow, make_tenant_module) -> tuple[dict, str, dict[str, str]]:  # noqa: ANN001
    """A printing busybox image converted with the boot check on and mem_size omitted (no app default)."""
    tenant = make_tenant_module()
    headers = tenant.headers()
    app_id = tenant.create_app()
    src = boot_flow.push(f"boot/hello-{uuid.uuid4().hex[:6]}", ["/bin/echo", GREETING])
    dst = f"{boot_flow.registry.host}/boot/hello-out-{uuid.uuid4().hex[:6]}:1"
    submitted = _submit(boot_flow, headers, app_id, src, dst)
    return _poll(boot_flow, headers, submitted), dst, headers


@pytest.fixture(scope="module")
def make_tenant_module(service_settings, flask_app):  # noqa: ANN001, ANN201
    """`make_tenant` for module-scoped fixtures (the conftest one is per test)."""
    def make() -> Tenant:
        tag = uuid.uuid4().hex[:8]
        with session_scope(service_settings.database_url) as session:
            manager = create_user(session, f"manager-{tag}@example.test", PASSWORD)
            account = create_account(session, f"acct-{tag}", manager)
            emails = {"MANAGER": manager.email}
            writer = create_user(session, f"writer-{tag}@example.test", PASSWORD)
            session.add(Membership(user_id=writer.id, account_id=account.id, role="WRITER"))
            emails["WRITER"] = writer.email
            account_id = account.id
        return Tenant(client=flask_app.test_client(), account_id=account_id, emails=emails)

    return make


def test_service_boot_check_succeeds_and_records_the_programs_output(hello) -> None:  # noqa: ANN001
    build, _, _ = hello
    conv = build["conversion"]
    assert conv["state"] == "SUCCEEDED", conv["error"]
    boot = conv["boot_check"]
    assert boot["ok"] is True, boot
    assert boot["program_output"][0] == GREETING
    assert boot["exit_status"] == 0
    assert boot["seconds"] > 0 and boot["console_tail"]


def test_service_omitted_mem_size_is_the_smallest_valid_multiple_of_256(boot_flow: Flow, hello) -> None:  # noqa: ANN001
    build, dst, _ = hello
    eif_size = build["conversion"]["eif_size"]
    used = build["mem_size"]
    assert used % MEM_STEP_MIB == 0
    assert minimum_mem_mib(eif_size) <= used < minimum_mem_mib(eif_size) + MEM_STEP_MIB
    launch = json.loads(_enclave_file(boot_flow.registry, dst, "launch.json"))
    assert launch["memory_mib"] == used and launch["cpu_count"] == build["threads"] == 2
    # The EIF's header carries the same size (bytes), written before the EIF's length was final.
    header = read_eif(io.BytesIO(_enclave_file(boot_flow.registry, dst, "app.eif")))
    assert header.default_mem == used << 20 and header.default_cpus == 2


def test_service_missing_entrypoint_fails_the_boot_check_and_pushes_nothing(
        boot_flow: Flow, make_tenant_module) -> None:  # noqa: ANN001
    tenant = make_tenant_module()
    headers = tenant.headers()
    src = boot_flow.push(f"boot/broken-{uuid.uuid4().hex[:6]}", ["/no/such/program", "--flag"])
    dst = f"{boot_flow.registry.host}/boot/broken-out-{uuid.uuid4().hex[:6]}:1"
    build = _poll(boot_flow, headers, _submit(boot_flow, headers, tenant.create_app(), src, dst, mem_size=512))
    conv = build["conversion"]
    assert conv["state"] == "FAILED" and conv["error"]["code"] == "boot_check_failed", conv
    assert build["status"]["status"] == "REJECTED"
    assert conv["boot_check"]["ok"] is False and conv["boot_check"]["reason"]
    assert "/no/such/program" in conv["error"]["message"] + " ".join(conv["boot_check"]["console_tail"])
    assert _manifest(boot_flow.registry, dst).status_code == 404


def test_service_too_small_mem_size_fails_naming_the_minimum(boot_flow: Flow, hello, make_tenant_module) -> None:  # noqa: ANN001
    done, _, _ = hello
    tenant = make_tenant_module()
    headers = tenant.headers()
    src = done["conversion"]["request"]["input_image"]["name"]
    dst = f"{boot_flow.registry.host}/boot/small-out-{uuid.uuid4().hex[:6]}:1"
    build = _poll(boot_flow, headers, _submit(boot_flow, headers, tenant.create_app(), src, dst, mem_size=8))
    conv = build["conversion"]
    assert conv["state"] == "FAILED" and conv["error"]["code"] == "mem_size_too_small", conv
    assert build["status"]["status"] == "REJECTED" and build["mem_size"] == 8
    # The same image and options make the same EIF as the successful conversion: the minimum is its 4x.
    match = re.search(r"use at least (\d+) MiB", conv["error"]["message"])
    assert match and int(match.group(1)) == minimum_mem_mib(done["conversion"]["eif_size"]), conv["error"]
    assert conv["boot_check"] is None  # refused before any boot
    assert _manifest(boot_flow.registry, dst).status_code == 404


def test_service_app_default_mem_size_applies_when_the_request_omits_it(
        boot_flow: Flow, make_tenant_module) -> None:  # noqa: ANN001
    tenant = make_tenant_module()
    headers = tenant.headers()
    app_id = tenant.create_app(default_build_settings={"nitro_enclaves": {"mem_size": 1280}})
    ref = f"{boot_flow.registry.host}/boot/absent-{uuid.uuid4().hex[:6]}:1"  # never pushed: fails at pull
    build_id = _submit(boot_flow, headers, app_id, ref, ref + "-out")
    build = _poll(boot_flow, headers, build_id)
    assert build["mem_size"] == 1280
    assert build["conversion"]["boot_check"] is None
