"""Signed conversions and the remaining options, end to end through `nitroconv convert-local` and a real registry:
PCR8 in stdout, measurements.json and labels; the COSE signature; the CA bundle in the app ramdisk; the debug
warning; and each signing-identity error refused before anything is pulled or pushed."""
from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import tarfile
import uuid
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from common.enclave.cpio import iter_cpio
from common.enclave.reader import describe_eif, iter_section_data, read_eif
from common.errors import CaBundleNotConfigured
from tests.fixtures.convert_cli import (
    MANIFEST_TYPES,
    assert_failed_with,
    convert_local,
    manifest_status,
    push_app,
)
from tests.fixtures.devblobs import build_shim, runtime_target
from tests.fixtures.docker_engine import busybox_base_tar
from tests.fixtures.images import LayerBlob, PushSession, make_layer
from tests.fixtures.registries import RunningRegistry
from worker.pipeline.convert import convert
from worker.pipeline.host import ConversionHost
from worker.pipeline.outputimage import LABEL_PREFIX
from worker.pipeline.spec import ConverterOptions, ConvertSpec, Progress, Stage, Workspace
from worker.pipeline.stages import DEBUG_WARNING

pytestmark = pytest.mark.integration

NOW = dt.datetime.now(dt.UTC)


@pytest.fixture(scope="module")
def base_layer() -> LayerBlob:
    return make_layer(busybox_base_tar())


@pytest.fixture(scope="module")
def runtime() -> tuple[str, str]:
    """convert-local's option naming the exec shim's dir."""
    return "--runtime", str(build_shim(runtime_target()).parent)


def _pem_pair(directory: Path, key: object, cert_key: object | None = None, *,
              not_before: dt.datetime = NOW - dt.timedelta(days=1),
              not_after: dt.datetime = NOW + dt.timedelta(days=30)) -> tuple[Path, Path]:
    """`key` written as key.pem and a self-signed certificate for `cert_key` (default: the same key)."""
    directory.mkdir(parents=True, exist_ok=True)
    owner = cert_key or key
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nitroconv integration signer")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(owner.public_key())  # type: ignore[attr-defined]
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .sign(owner, hashes.SHA256()))  # type: ignore[arg-type]
    key_path, cert_path = directory / "key.pem", directory / "cert.pem"
    key_path.write_bytes(key.private_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def _pcr(content: bytes) -> str:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).hexdigest()


def _output_image(registry: RunningRegistry, repo: str, tag: str) -> tuple[dict[str, str], dict[str, bytes]]:
    """(labels, files under /enclave) of a pushed output image, read straight from the registry."""
    session = PushSession(registry)
    manifest = session.request("GET", f"/v2/{repo}/manifests/{tag}", repo, headers={"Accept": MANIFEST_TYPES})
    assert manifest.status_code == 200
    doc = manifest.json()
    config = session.request("GET", f"/v2/{repo}/blobs/{doc['config']['digest']}", repo).json()
    files: dict[str, bytes] = {}
    for layer in doc["layers"]:
        blob = session.request("GET", f"/v2/{repo}/blobs/{layer['digest']}", repo).content
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(blob))) as tar:
            for member in tar.getmembers():
                if member.isfile() and member.name.startswith("enclave/") and member.name.endswith(".json"):
                    files[member.name.removeprefix("enclave/")] = tar.extractfile(member).read()  # type: ignore
    return config["config"]["Labels"], files


def _ca_bundle(path: Path) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp root CA")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(NOW - dt.timedelta(days=1))
            .not_valid_after(NOW + dt.timedelta(days=365)).sign(key, hashes.SHA256()))
    data = cert.public_bytes(serialization.Encoding.PEM)
    path.write_bytes(data)
    return data


def test_convert_signing_cli_signed_debug_build_with_ca_bundle(
    registry: RunningRegistry, base_layer: LayerBlob, blobs_dir: Path, runtime: tuple[str, str], tmp_path: Path
) -> None:
    key_path, cert_path = _pem_pair(tmp_path / "id", ec.generate_private_key(ec.SECP384R1()))
    bundle = _ca_bundle(tmp_path / "corp.pem")
    ref = push_app(registry, base_layer, "signing/app")
    out_repo, out_tag = "signing/app-enclave", uuid.uuid4().hex[:8]

    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/{out_repo}:{out_tag}",
                        "--insecure-registry", registry.host, *runtime, "--signing-key", str(key_path),
                        "--signing-cert", str(cert_path), "--ca-bundle", str(tmp_path / "corp.pem"), "--debug")

    assert run.returncode == 0, run.stderr
    der = x509.load_pem_x509_certificate(cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    expected_pcr8 = _pcr(der)
    printed = json.loads(run.stdout)["Measurements"]
    assert printed["PCR8"] == expected_pcr8
    assert f"nitroconv: warning: {DEBUG_WARNING}" in run.stderr.splitlines()

    info = read_eif(run.eif)
    assert info.measurements.pcr8 == expected_pcr8 and printed["PCR0"] == info.measurements.pcr0
    assert info.signature is not None and info.signature.check
    assert info.signing_certificate == cert_path.read_bytes()
    described = describe_eif(run.eif)
    assert described["SignatureCheck"] is True and described["IsSigned"] is True

    labels, files = _output_image(registry, out_repo, out_tag)
    assert labels[LABEL_PREFIX + "pcr8"] == expected_pcr8
    assert json.loads(files["measurements.json"])["Measurements"]["PCR8"] == expected_pcr8
    assert json.loads(files["launch.json"])["debug"] is True

    # busybox has no trust store of its own, so the service's bundle becomes the Debian-path one.
    archive = b"".join(iter_section_data(run.eif, info.ramdisks[1]))
    members = {header.name: data for header, data in iter_cpio(io.BytesIO(archive))}
    assert members[b"rootfs/etc/ssl/certs/ca-certificates.crt"] == bundle


def test_convert_signing_cli_unsigned_build_has_no_pcr8(
    registry: RunningRegistry, base_layer: LayerBlob, blobs_dir: Path, runtime: tuple[str, str], tmp_path: Path
) -> None:
    ref = push_app(registry, base_layer, "signing/plain")
    out_repo, out_tag = "signing/plain-enclave", uuid.uuid4().hex[:8]
    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/{out_repo}:{out_tag}",
                        "--insecure-registry", registry.host, *runtime)
    assert run.returncode == 0, run.stderr
    assert "PCR8" not in json.loads(run.stdout)["Measurements"]
    assert DEBUG_WARNING not in run.stderr
    labels, files = _output_image(registry, out_repo, out_tag)
    assert LABEL_PREFIX + "pcr8" not in labels and LABEL_PREFIX + "pcr0" in labels
    assert "PCR8" not in json.loads(files["measurements.json"])["Measurements"]
    assert not read_eif(run.eif).is_signed


def _expired(d: Path) -> tuple[Path, Path]:
    return _pem_pair(d, ec.generate_private_key(ec.SECP256R1()), not_before=NOW - dt.timedelta(days=60),
                     not_after=NOW - dt.timedelta(days=1))


def _future(d: Path) -> tuple[Path, Path]:
    return _pem_pair(d, ec.generate_private_key(ec.SECP256R1()), not_before=NOW + dt.timedelta(days=1),
                     not_after=NOW + dt.timedelta(days=60))


def _mismatch(d: Path) -> tuple[Path, Path]:
    return _pem_pair(d, ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1()))


def _rsa(d: Path) -> tuple[Path, Path]:
    return _pem_pair(d, rsa.generate_private_key(public_exponent=65537, key_size=2048))


@pytest.mark.parametrize(("make", "code"), [
    (_expired, "signing_certificate_expired"),
    (_future, "signing_certificate_not_yet_valid"),
    (_mismatch, "signing_key_mismatch"),
    (_rsa, "signing_key_unsupported"),
], ids=["expired", "not-yet-valid", "mismatch", "rsa"])
def test_convert_signing_cli_bad_identity_fails_before_pull(
    registry: RunningRegistry, blobs_dir: Path, runtime: tuple[str, str], tmp_path: Path, make: object, code: str
) -> None:
    key_path, cert_path = make(tmp_path / "id")  # type: ignore[operator]
    # Never pushed: a failure before PULLING cannot even notice, so the error must name the identity.
    ref = f"{registry.host}/signing/never-pushed:v1"
    out_repo, out_tag = "signing/bad-enclave", uuid.uuid4().hex[:8]
    run = convert_local(tmp_path, blobs_dir, "--input", ref, "--output", f"{registry.host}/{out_repo}:{out_tag}",
                        "--insecure-registry", registry.host, *runtime, "--signing-key", str(key_path),
                        "--signing-cert", str(cert_path))
    assert_failed_with(run, code, ref)
    assert manifest_status(registry, out_repo, out_tag) == 404


def test_convert_signing_ca_option_without_bundle_fails_before_pull(
    registry: RunningRegistry, blobs_dir: Path, tmp_path: Path
) -> None:
    stages: list[object] = []
    spec = ConvertSpec(input_ref=f"{registry.host}/signing/never-pushed:v1",
                       output_ref=f"{registry.host}/signing/ca-enclave:v1", input_credentials=None,
                       output_credentials=None, options=ConverterOptions(add_ccm_ca_certificates=True),
                       cpu_count=2, mem_size_mib=None)
    host = ConversionHost(blobs_dir=blobs_dir, runtime_dir=build_shim(runtime_target()).parent,
                          cache_dir=tmp_path / "cache", insecure_registries=frozenset({registry.host}))

    def on_stage(stage: Stage, progress: float) -> None:
        stages.append(stage)

    with pytest.raises(CaBundleNotConfigured):
        convert(spec, host, Progress(on_stage), Workspace(tmp_path / "scratch"))
    assert stages == []
