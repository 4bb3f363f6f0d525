"""The boot check in the emulator through the service: API -> real celery worker (NITROCONV_BOOT_CHECK_MODE=emulator)
-> QEMU's nitro-enclave machine + our vsock backend -> the Build records the PCRs QEMU measured."""
from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import replace

import pytest
from redis import Redis
from sqlalchemy import text

from api.app import create_app
from common.store.engine import session_scope
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.emulator import emulator_plan
from tests.fixtures.images import make_layer
from tests.fixtures.require import skip_or_fail

from .conftest import start_worker
from .test_boot_check import Flow, _manifest, _poll, _submit, make_tenant_module  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.integration, pytest.mark.qemu, pytest.mark.e2e]
GREETING = "hello from the emulated service enclave 7c3e"


@pytest.fixture(scope="module")
def emulator_flow(service_settings, registry) -> Iterator[Flow]:  # noqa: ANN001
    """One real worker process with the boot check on, in the emulator only."""
    if not (service_settings.blobs_dir / "bzImage").exists():
        skip_or_fail(f"no dev blobs in {service_settings.blobs_dir} (make blobs)")
    plan = emulator_plan()
    s = replace(service_settings, insecure_registries=frozenset({registry.host}), boot_check=True,
                boot_check_timeout=180, boot_check_mode="emulator", emulator_qemu=plan.emulator_qemu)
    Redis.from_url(s.redis_url).flushdb()  # messages of API-only tests would otherwise be consumed here
    with session_scope(s.database_url) as session:  # ...and so would their QUEUED rows, via the sweeper
        session.execute(text("UPDATE builds SET conversion_state='CANCELLED', approval_status='REJECTED' "
                             "WHERE conversion_state='QUEUED'"))
    worker = start_worker(s, f"emu{uuid.uuid4().hex[:6]}")
    try:
        yield Flow(create_app(s).test_client(), registry, make_layer(busybox_base_tar()))
    finally:
        worker.stop()


def test_service_records_the_emulators_pcrs_mode_and_heartbeat_in_the_build(
        emulator_flow: Flow, make_tenant_module) -> None:  # noqa: ANN001, F811
    tenant = make_tenant_module()
    headers = tenant.headers()
    src = emulator_flow.push(f"emu/hello-{uuid.uuid4().hex[:6]}", ["/bin/echo", GREETING])
    dst = f"{emulator_flow.registry.host}/emu/hello-out-{uuid.uuid4().hex[:6]}:1"
    build = _poll(emulator_flow, headers, _submit(emulator_flow, headers, tenant.create_app(), src, dst))
    conv = build["conversion"]
    assert conv["state"] == "SUCCEEDED", (conv["error"], conv["boot_check"])
    boot = conv["boot_check"]
    assert boot["ok"] is True and boot["mode"] == "emulator" and boot["fallback_reason"] is None
    assert boot["heartbeat"] is True and boot["pcrs_match"] is True
    nitro = build["attributes"]["eif"]["nitro_enclave"]
    # What QEMU measured and the init read from its NSM, next to what the worker computed: equal.
    assert (boot["pcrs"]["PCR0"], boot["pcrs"]["PCR1"], boot["pcrs"]["PCR2"]) == \
        (nitro["pcr0"], nitro["pcr1"], nitro["pcr2"])
    assert boot["program_output"][0] == GREETING and boot["exit_status"] == 0
    assert _manifest(emulator_flow.registry, dst).status_code == 200


def test_service_emulator_check_of_a_missing_entrypoint_fails_and_pushes_nothing(
        emulator_flow: Flow, make_tenant_module) -> None:  # noqa: ANN001, F811
    tenant = make_tenant_module()
    headers = tenant.headers()
    src = emulator_flow.push(f"emu/broken-{uuid.uuid4().hex[:6]}", ["/no/such/program"])
    dst = f"{emulator_flow.registry.host}/emu/broken-out-{uuid.uuid4().hex[:6]}:1"
    build = _poll(emulator_flow, headers, _submit(emulator_flow, headers, tenant.create_app(), src, dst))
    conv = build["conversion"]
    assert conv["state"] == "FAILED" and conv["error"]["code"] == "boot_check_failed", conv
    assert conv["boot_check"]["mode"] == "emulator" and conv["boot_check"]["ok"] is False
    assert conv["boot_check"]["pcrs_match"] is True  # the image was measured right; it just cannot start
    assert _manifest(emulator_flow.registry, dst).status_code == 404
