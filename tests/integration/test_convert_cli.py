"""`nitroconv convert-local` as users run it: a subprocess against real registries; stdout, stderr, exit status."""
from __future__ import annotations

import json
import os
import subprocess
import uuid

import pytest

from tests.fixtures.convert_cli import (
    NITROCONV,
    PATH_ENV,
    assert_failed_with,
    convert_local,
    independent_measurements,
    manifest_status,
    push_app,
)
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import LayerBlob, make_layer

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def base_layer() -> LayerBlob:
    return make_layer(busybox_base_tar())


def test_cli_convert_local_prints_nitro_cli_measurements(registry, base_layer, blobs_dir, tmp_path) -> None:
    ref = push_app(registry, base_layer, "cli/app")
    out_repo, out_tag = "cli/app-enclave", uuid.uuid4().hex[:8]
    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/{out_repo}:{out_tag}",
                        "--insecure-registry", registry.host)
    assert run.returncode == 0, run.stderr
    pcrs = independent_measurements(run.eif.read_bytes())
    # serde_json's to_string_pretty of nitro-cli's EnclaveBuildInfo, then println!.
    assert run.stdout == (
        '{\n  "Measurements": {\n'
        '    "HashAlgorithm": "Sha384 { ... }",\n'
        f'    "PCR0": "{pcrs["PCR0"]}",\n    "PCR1": "{pcrs["PCR1"]}",\n    "PCR2": "{pcrs["PCR2"]}"\n'
        "  }\n}\n"
    )
    assert run.stderr == "", "no progress bar or chatter when stderr is not a terminal"
    assert list(run.scratch.iterdir()) == []
    assert manifest_status(registry, out_repo, out_tag) == 200


def test_cli_convert_local_unknown_image_is_manifest_unknown(registry, blobs_dir, tmp_path) -> None:
    ref = f"{registry.host}/cli/never-pushed:v1"
    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/cli/out:x",
                        "--insecure-registry", registry.host)
    assert_failed_with(run, "manifest_unknown", ref)


def test_cli_convert_local_basic_auth_wrong_then_right_credentials(
    basic_registry, registry, base_layer, blobs_dir, tmp_path
) -> None:
    ref = push_app(basic_registry, base_layer, "cli/private")
    args = ("--input", ref, "--output", f"{registry.host}/cli/private-enclave:v1",
            "--insecure-registry", basic_registry.host, registry.host)
    wrong_password = "not-" + basic_registry.password
    wrong = convert_local(tmp_path, blobs_dir, *args, env={"NITROCONV_INPUT_USER": basic_registry.username,
                                                           "NITROCONV_INPUT_PASSWORD": wrong_password})
    assert_failed_with(wrong, "unauthorized", ref)
    anonymous = convert_local(tmp_path, blobs_dir, *args)
    assert_failed_with(anonymous, "unauthorized", ref)

    right = convert_local(tmp_path, blobs_dir, *args, env={"NITROCONV_INPUT_USER": basic_registry.username,
                                                           "NITROCONV_INPUT_PASSWORD": basic_registry.password})
    assert right.returncode == 0, right.stderr
    assert set(json.loads(right.stdout)["Measurements"]) == {"HashAlgorithm", "PCR0", "PCR1", "PCR2"}
    assert list(right.scratch.iterdir()) == []
    for run in (wrong, anonymous, right):
        for secret in (wrong_password, basic_registry.password):
            assert secret not in run.stdout and secret not in run.stderr


def test_cli_convert_local_token_auth_wrong_then_right_credentials(
    token_registry, base_layer, blobs_dir, tmp_path
) -> None:
    ref = push_app(token_registry, base_layer, "cli/token")
    output = f"{token_registry.host}/cli/token-enclave:v1"
    args = ("--input", ref, "--output", output, "--insecure-registry", *sorted(token_registry.allowed_hosts))
    user, password = token_registry.username, token_registry.password
    wrong = convert_local(tmp_path, blobs_dir, *args, env={"NITROCONV_INPUT_USER": user,
                                                           "NITROCONV_INPUT_PASSWORD": "wrong-" + password})
    assert_failed_with(wrong, "unauthorized", ref)

    creds = {"NITROCONV_INPUT_USER": user, "NITROCONV_INPUT_PASSWORD": password,
             "NITROCONV_OUTPUT_USER": user, "NITROCONV_OUTPUT_PASSWORD": password}
    right = convert_local(tmp_path, blobs_dir, *args, env=creds)
    assert right.returncode == 0, right.stderr
    for run in (wrong, right):
        assert password not in run.stdout and password not in run.stderr

    # The pushed image, read back through the same token flow, holds the EIF the conversion wrote.
    fetched = tmp_path / "fetched.eif"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("NITROCONV_")}
    done = subprocess.run([str(NITROCONV), "fetch-eif", output, "--out", str(fetched), "--insecure-registry",
                           *sorted(token_registry.allowed_hosts)],
                          env={**clean, "NITROCONV_INPUT_USER": user, "NITROCONV_INPUT_PASSWORD": password},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert fetched.read_bytes() == right.eif.read_bytes()


@pytest.mark.parametrize("bad", ["BADVALUE", "=nameless"])
def test_cli_convert_local_malformed_env_is_invalid_options(registry, base_layer, blobs_dir, tmp_path, bad) -> None:
    ref = push_app(registry, base_layer, "cli/env")
    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/cli/env-enclave:v1",
                        "--insecure-registry", registry.host, "--env", "GOOD=1", bad)
    assert_failed_with(run, "invalid_options", ref)


def test_cli_convert_local_mem_size_too_small_pushes_nothing(registry, base_layer, blobs_dir, tmp_path) -> None:
    ref = push_app(registry, base_layer, "cli/mem")
    out_repo, out_tag = "cli/mem-enclave", uuid.uuid4().hex[:8]
    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/{out_repo}:{out_tag}",
                        "--insecure-registry", registry.host, "--mem-size", "1")
    assert_failed_with(run, "mem_size_too_small", ref)
    assert manifest_status(registry, out_repo, out_tag) == 404


def test_cli_convert_local_image_without_command_is_no_command(registry, base_layer, blobs_dir, tmp_path) -> None:
    ref = push_app(registry, base_layer, "cli/nocmd", Env=[PATH_ENV])
    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/cli/nocmd-enclave:v1",
                        "--insecure-registry", registry.host)
    assert_failed_with(run, "no_command", ref)
