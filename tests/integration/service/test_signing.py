"""Signing and the remaining options through the service: API -> a real worker with a signing identity and a CA
bundle -> registry; the Build shows PCR8 and the debug warning."""
from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
import os
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from redis import Redis
from sqlalchemy import text

from api.app import create_app
from api.schemas.builds import BuildSchema
from common.enclave.cpio import iter_cpio
from common.enclave.reader import iter_section_data, read_eif
from common.registry.manifests import MANIFEST_ACCEPT
from common.store.engine import session_scope
from tests.fixtures.devblobs import build_shim, runtime_target
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import image_config, make_layer, push_test_image
from tests.fixtures.require import skip_or_fail
from worker.pipeline.stages import DEBUG_WARNING

from .conftest import start_worker
from .helpers import ok

pytestmark = pytest.mark.integration
MANIFEST_TYPES = ", ".join(MANIFEST_ACCEPT)  # what our registry client asks for


@dataclass
class Flow:
    client: Any
    registry: Any
    cert_der: bytes
    bundle: bytes


def _self_signed(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    return key, cert.public_bytes(serialization.Encoding.PEM)


@pytest.fixture(scope="module")
def signing_flow(service_settings, registry, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:  # noqa: ANN001
    """One real worker process whose deployment has a signing key, certificate and CA bundle."""
    if not (service_settings.blobs_dir / "bzImage").exists():
        skip_or_fail(f"no dev blobs in {service_settings.blobs_dir} (make blobs)")
    keys: Path = tmp_path_factory.mktemp("signing")
    key, cert_pem = _self_signed("nitroconv service signer")
    (keys / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    (keys / "cert.pem").write_bytes(cert_pem)
    _, bundle = _self_signed("corp root CA")
    (keys / "ca.pem").write_bytes(bundle)
    s = replace(service_settings, insecure_registries=frozenset({registry.host}), signing_key=keys / "key.pem",
                signing_cert=keys / "cert.pem", ca_bundle=keys / "ca.pem")
    Redis.from_url(s.redis_url).flushdb()  # messages of API-only tests would otherwise be consumed here
    with session_scope(s.database_url) as session:  # ...and so would their QUEUED rows, via the sweeper
        session.execute(text("UPDATE builds SET conversion_state='CANCELLED', approval_status='REJECTED' "
                             "WHERE conversion_state='QUEUED'"))
    # The worker finds the exec shim through NITROCONV_RUNTIME_DIR, as a deployment's `make runtime` sets it.
    previous = os.environ.get("NITROCONV_RUNTIME_DIR")
    os.environ["NITROCONV_RUNTIME_DIR"] = str(build_shim(runtime_target()).parent)
    try:
        worker = start_worker(s, f"sign{uuid.uuid4().hex[:6]}")
    finally:
        if previous is None:
            del os.environ["NITROCONV_RUNTIME_DIR"]
        else:
            os.environ["NITROCONV_RUNTIME_DIR"] = previous
    try:
        der = x509.load_pem_x509_certificate(cert_pem).public_bytes(serialization.Encoding.DER)
        yield Flow(create_app(s).test_client(), registry, der, bundle)
    finally:
        worker.stop()


def _poll(flow: Flow, headers: dict[str, str], build_id: str, timeout: float = 300.0) -> dict:
    deadline = time.monotonic() + timeout
    build: dict = {}
    while time.monotonic() < deadline:
        build = ok(flow.client.get(f"/v1/builds/{build_id}", headers=headers), BuildSchema)
        if build["conversion"]["state"] in {"SUCCEEDED", "FAILED", "CANCELLED"}:
            return build
        time.sleep(0.5)
    raise AssertionError(f"conversion {build_id} did not end: {build.get('conversion')}")


def _enclave_files(registry: Any, ref: str) -> dict[str, bytes]:
    repo, _, tag = ref.split("/", 1)[1].rpartition(":")
    resp = requests.get(f"{registry.url}/v2/{repo}/manifests/{tag}", headers={"Accept": MANIFEST_TYPES}, timeout=30)
    assert resp.status_code == 200, resp.text
    files: dict[str, bytes] = {}
    for layer in resp.json()["layers"]:
        blob = requests.get(f"{registry.url}/v2/{repo}/blobs/{layer['digest']}", timeout=60)
        with tarfile.open(fileobj=io.BytesIO(blob.content), mode="r:*") as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("enclave/"):
                    files[member.name.removeprefix("enclave/")] = tar.extractfile(member).read()  # type: ignore
    return files


def test_service_signed_debug_build_reports_pcr8_warning_and_ca_bundle(signing_flow: Flow, make_tenant) -> None:  # noqa: ANN001
    tenant = make_tenant()
    headers = tenant.headers()
    busybox = make_layer(busybox_base_tar())
    config = image_config([busybox.diff_id], cmd=(), Entrypoint=["/bin/echo", "signed"])
    image = push_test_image(signing_flow.registry, f"sign/app-{uuid.uuid4().hex[:6]}", "1", [busybox], config=config)
    src = f"{signing_flow.registry.host}/{image.repo}:1"
    dst = f"{signing_flow.registry.host}/sign/app-out-{uuid.uuid4().hex[:6]}:1"
    body = {"app_id": tenant.create_app(), "input_image": {"name": src}, "output_image": {"name": dst},
            "cpu_count": 2, "converter_options": {"debug": True, "add_ccm_ca_certificates": True,
                                                  "java_mode": "OPENJDK"}}
    submitted = ok(signing_flow.client.post("/v1/builds/convert-app/nitro-enclaves", json=body, headers=headers),
                   BuildSchema, 200)

    build = _poll(signing_flow, headers, str(submitted["build_id"]))

    conv = build["conversion"]
    assert conv["state"] == "SUCCEEDED", conv["error"]
    expected_pcr8 = hashlib.sha384(b"\0" * 48 + hashlib.sha384(signing_flow.cert_der).digest()).hexdigest()
    assert build["attributes"]["eif"]["nitro_enclave"]["pcr8"] == expected_pcr8
    assert DEBUG_WARNING in conv["warnings"]
    assert build["advanced_settings"]["java_runtime"] == "OPENJDK"
    files = _enclave_files(signing_flow.registry, dst)
    assert json.loads(files["measurements.json"])["Measurements"]["PCR8"] == expected_pcr8
    launch = json.loads(files["launch.json"])
    assert launch["debug"] is True and launch["java_mode"] == "OPENJDK"
    info = read_eif(io.BytesIO(files["app.eif"]))
    assert info.signature is not None and info.signature.check and info.measurements.pcr8 == expected_pcr8
    archive = b"".join(iter_section_data(io.BytesIO(files["app.eif"]), info.ramdisks[1]))
    members = {header.name: data for header, data in iter_cpio(io.BytesIO(archive))}
    assert members[b"rootfs/etc/ssl/certs/ca-certificates.crt"] == signing_flow.bundle
