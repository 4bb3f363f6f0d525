"""The boot check in the emulator (issue 16 part 5): converted images booted by QEMU's nitro-enclave machine.

Real everything: a busybox image pushed to the local registry, `nitroconv convert-local`, QEMU's own EIF
loader and NSM, our vsock backend (`python -m worker.emulator`), the heartbeat over vsock.
"""
from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from common.errors import BootCheckNoHeartbeat, BootCheckPcrMismatch
from tests.fixtures.convert_cli import NITROCONV, Run, convert_local, manifest_status
from tests.fixtures.devblobs import blobs_target, build_dev_blobs
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.emulator import emulator_plan
from tests.fixtures.images import LayerBlob, image_config, make_layer, push_test_image
from tests.fixtures.registries import RunningRegistry
from tests.integration.test_convert_signing import _pem_pair
from worker.emulator.session import SANDBOX, EmulatorSession, has_sandbox
from worker.pipeline import emulatorboot
from worker.pipeline.emulatorboot import BootCheckPlan, boot_eif_emulated, run_boot_check

pytestmark = [pytest.mark.e2e, pytest.mark.qemu]
GREETING = "hello from the emulated enclave 51ab"
WRONG = "0123456789abcdef" * 6


@dataclass(frozen=True)
class Converted:
    eif: Path
    measurements: dict[str, str]  # the Build's PCRs as convert-local printed them


@pytest.fixture(scope="module")
def plan() -> BootCheckPlan:
    return emulator_plan()


@pytest.fixture(scope="module")
def busybox() -> LayerBlob:
    return make_layer(busybox_base_tar())


def _convert(registry: RunningRegistry, busybox: LayerBlob, tmp_path: Path, entrypoint: list[str],
             *args: str, env: dict[str, str] | None = None) -> tuple[Run, str]:
    config = image_config([busybox.diff_id], cmd=(), Entrypoint=entrypoint)
    image = push_test_image(registry, f"emu/app-{uuid.uuid4().hex[:6]}", "v1", [busybox], config=config)
    out = f"emu/out-{uuid.uuid4().hex[:6]}"
    run = convert_local(tmp_path, build_dev_blobs(blobs_target()).dir, "--input", image.ref,
                        "--output", f"{registry.host}/{out}:1", "--insecure-registry", registry.host, *args, env=env)
    return run, out


def _emulator_env(plan: BootCheckPlan) -> dict[str, str]:
    return {"NITROCONV_EMULATOR_QEMU": str(plan.emulator_qemu)}


@pytest.fixture(scope="module")
def sample(registry: RunningRegistry, busybox: LayerBlob, plan: BootCheckPlan,
           tmp_path_factory: pytest.TempPathFactory) -> Converted:
    """The sample image converted (no boot check yet): its EIF and the measurements the conversion printed."""
    run, _ = _convert(registry, busybox, tmp_path_factory.mktemp("sample"), ["/bin/echo", GREETING])
    assert run.returncode == 0, run.stderr
    measurements = json.loads(run.stdout)["Measurements"]
    return Converted(run.eif, {k: v for k, v in measurements.items() if k.startswith("PCR")})


def test_emulator_boot_check_reports_the_builds_pcrs_heartbeat_and_program(sample: Converted,
                                                                           plan: BootCheckPlan) -> None:
    result = run_boot_check(sample.eif, plan=plan, expected=sample.measurements)
    assert result.ok, (result.reason, result.console_tail)
    assert result.mode == "emulator" and result.fallback_reason is None
    # QEMU measured the EIF itself; the init read the registers from its NSM over /dev/nsm.
    assert {k: v for k, v in (result.pcrs or {}).items() if k in sample.measurements} == sample.measurements
    assert set(sample.measurements) == {"PCR0", "PCR1", "PCR2"} and result.pcrs_match is True
    assert result.heartbeat is True
    assert result.program_output[:1] == (GREETING,) and result.exit_status == 0
    result.raise_if_failed()


def _seccomp_mode(pid: int, wait: float = 30.0) -> str:
    """The process's `Seccomp:` mode (2: a filter) once QEMU has installed its sandbox, or the last one seen."""
    mode = "?"
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            break
        mode = next((line.split()[1] for line in status.splitlines() if line.startswith("Seccomp:")), "?")
        if mode == "2":
            break
        time.sleep(0.05)
    return mode


def test_the_boot_check_runs_the_emulator_under_qemus_seccomp_sandbox(
        sample: Converted, plan: BootCheckPlan, monkeypatch: pytest.MonkeyPatch) -> None:
    # The build `make emulator` made has seccomp (the boot check would refuse it otherwise).
    assert has_sandbox(str(plan.emulator_qemu))
    seen: list[tuple[list[str], str]] = []

    class Watched(EmulatorSession):
        """The boot check's own session, the QEMU it started looked at from outside."""

        def start(self) -> subprocess.Popen[bytes]:
            proc = super().start()
            seen.append((list(proc.args), _seccomp_mode(proc.pid)))  # type: ignore[arg-type]
            return proc

    monkeypatch.setattr(emulatorboot, "EmulatorSession", Watched)
    result = run_boot_check(sample.eif, plan=plan, expected=sample.measurements)
    assert result.ok and result.mode == "emulator", (result.reason, result.console_tail)
    [(argv, mode)] = seen
    assert argv[argv.index("-sandbox") + 1] == SANDBOX
    assert mode == "2", "QEMU runs under a seccomp filter"


def test_a_wrong_expected_pcr_fails_with_the_pcr_mismatch_code(sample: Converted, plan: BootCheckPlan) -> None:
    result = run_boot_check(sample.eif, plan=plan, expected={**sample.measurements, "PCR2": WRONG})
    assert not result.ok and result.error_code == "boot_check_pcr_mismatch" and result.pcrs_match is False
    assert result.reason == ("PCRs differ from the Build's: PCR2 measured by the emulator is "
                             f"{sample.measurements['PCR2']}, the Build's is {WRONG}")
    assert result.heartbeat is True and result.program_output[:1] == (GREETING,)  # everything else was fine
    with pytest.raises(BootCheckPcrMismatch) as info:
        result.raise_if_failed()
    assert info.value.details["boot_check"]["pcrs"]["PCR2"] == sample.measurements["PCR2"]


def test_cli_boot_check_prints_the_emulators_pcrs_and_fails_a_tampered_expectation(
        sample: Converted, plan: BootCheckPlan) -> None:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}, **_emulator_env(plan)}
    ok = subprocess.run([str(NITROCONV), "boot-check", str(sample.eif), "--mode", "emulator", "--timeout", "180"],
                        env=env, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    shown = json.loads(ok.stdout)
    assert shown["mode"] == "emulator" and shown["heartbeat"] is True and shown["pcrs_match"] is True
    assert {k: shown["pcrs"][k] for k in sample.measurements} == sample.measurements

    bad = subprocess.run([str(NITROCONV), "boot-check", str(sample.eif), "--mode", "emulator", "--timeout", "180",
                          "--expect-pcr", f"0={WRONG}"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert json.loads(bad.stdout)["pcrs_match"] is False
    assert bad.stderr.startswith("nitroconv: boot_check_pcr_mismatch: boot check failed: PCRs differ from the "
                                 f"Build's: PCR0 measured by the emulator is {sample.measurements['PCR0']}, "
                                 f"the Build's is {WRONG}"), bad.stderr


def test_a_missing_entrypoint_fails_the_emulator_check_and_pushes_nothing(
        registry: RunningRegistry, busybox: LayerBlob, plan: BootCheckPlan, tmp_path: Path) -> None:
    run, out = _convert(registry, busybox, tmp_path, ["/no/such/program"], "--boot-check", "--boot-check-mode",
                        "emulator", env=_emulator_env(plan))
    assert run.returncode == 1
    stderr = run.stderr
    assert stderr.startswith("nitroconv: boot_check_failed: boot check failed: "), stderr
    assert "/no/such/program" in stderr and "mode emulator; heartbeat received" in stderr
    assert manifest_status(registry, out, "1") == 404


def test_convert_local_boot_check_in_the_emulator_then_pushes(
        registry: RunningRegistry, busybox: LayerBlob, plan: BootCheckPlan, tmp_path: Path) -> None:
    run, out = _convert(registry, busybox, tmp_path, ["/bin/echo", GREETING], "--boot-check",
                        env={**_emulator_env(plan), "NITROCONV_BOOT_CHECK_MODE": "emulator"})
    stderr = run.stderr
    assert run.returncode == 0, stderr
    measurements = json.loads(run.stdout)["Measurements"]
    assert "boot check ok in " in stderr and "  mode emulator; heartbeat received" in stderr.splitlines()
    for name in ("PCR0", "PCR1", "PCR2"):
        assert f"  {name} {measurements[name]} (emulator)" in stderr.splitlines()
    assert manifest_status(registry, out, "1") == 200


def test_a_signed_eifs_pcr8_is_measured_by_the_emulator(
        registry: RunningRegistry, busybox: LayerBlob, plan: BootCheckPlan, tmp_path: Path) -> None:
    key, cert = _pem_pair(tmp_path / "signer", ec.generate_private_key(ec.SECP384R1()))
    run, _ = _convert(registry, busybox, tmp_path, ["/bin/echo", GREETING], "--signing-key", str(key),
                      "--signing-cert", str(cert))
    assert run.returncode == 0, run.stderr
    measurements = json.loads(run.stdout)["Measurements"]
    expected = {k: v for k, v in measurements.items() if k.startswith("PCR")}
    assert "PCR8" in expected
    result = run_boot_check(run.eif, plan=plan, expected=expected)
    assert result.ok, (result.reason, result.console_tail)
    assert (result.pcrs or {}).get("PCR8") == expected["PCR8"]
    wrong = run_boot_check(run.eif, plan=plan, expected={**expected, "PCR8": WRONG})
    assert wrong.error_code == "boot_check_pcr_mismatch" and "PCR8 measured by the emulator" in wrong.reason


def test_auto_mode_without_the_emulator_falls_back_to_plain_and_says_so(sample: Converted, plan: BootCheckPlan,
                                                                        tmp_path: Path) -> None:
    absent = replace(plan, mode="auto", emulator_qemu=tmp_path / "no-emulator")
    result = run_boot_check(sample.eif, plan=absent, expected=sample.measurements)
    assert result.ok and result.mode == "plain" and result.pcrs is None and result.heartbeat is None
    assert result.fallback_reason is not None and "no emulator at" in result.fallback_reason
    assert result.to_json()["fallback_reason"] == result.fallback_reason


def test_a_parent_that_never_answers_the_heartbeat_fails_with_the_heartbeat_code(
        sample: Converted, plan: BootCheckPlan) -> None:
    result = boot_eif_emulated(sample.eif, expected=sample.measurements, timeout=plan.timeout,
                               qemu=str(plan.emulator_qemu), answer_heartbeat=False)
    # The enclave found nobody on port 9000, said so and carried on to its entrypoint; the check does not.
    assert not result.ok and result.error_code == "boot_check_no_heartbeat" and result.heartbeat is False
    assert result.pcrs_match is True and result.program_output[:1] == (GREETING,)
    assert any(line.startswith("nitroconv-init: heartbeat ") and "failed" in line for line in result.console_tail)
    with pytest.raises(BootCheckNoHeartbeat):
        result.raise_if_failed()


def test_the_programs_exit_status_is_recorded_and_does_not_fail_the_check(
        registry: RunningRegistry, busybox: LayerBlob, plan: BootCheckPlan, tmp_path: Path) -> None:
    run, _ = _convert(registry, busybox, tmp_path, ["/bin/sh", "-c", "echo leaving; exit 3"])
    assert run.returncode == 0, run.stderr
    expected = {k: v for k, v in json.loads(run.stdout)["Measurements"].items() if k.startswith("PCR")}
    result = run_boot_check(run.eif, plan=plan, expected=expected)
    assert result.ok and result.exit_status == 3 and result.program_output[:1] == ("leaving",)
    assert result.reason.startswith("entrypoint exec'd; exited with status 3")
