"""Unit tests for add_ccm_ca_certificates (worker/pipeline/cabundle.py) and the option checks and warnings of
converter options (common/options.py, worker/pipeline/convert.py)."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from common.errors import CaBundleNotConfigured, InvalidCaBundle, InvalidOptions
from common.image.filetree import BytesContent, NodeKind, SpoolContent, Tree
from common.options import JAVA_MODES, check_java_mode
from tests.fixtures.signing import pem_of, with_unknown_version
from worker.pipeline.cabundle import append_ca_bundle, load_ca_bundle
from worker.pipeline.spec import ConverterOptions
from worker.pipeline.stages import DEBUG_WARNING, option_warnings

DISTRO_BUNDLE = b"-----BEGIN CERTIFICATE-----\nDISTRO\n-----END CERTIFICATE-----\n"


def _ca_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "corp root")])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(dt.datetime(2024, 1, 1, tzinfo=dt.UTC))
            .not_valid_after(dt.datetime(2034, 1, 1, tzinfo=dt.UTC)).sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


def _read(tree: Tree, path: bytes) -> bytes:
    node = tree.lookup(path)
    assert node is not None and node.kind is NodeKind.FILE and node.content is not None
    with node.content.open() as f:
        return f.read()


def test_append_ca_bundle_extends_debian_store_once_through_symlink(tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    spool.write_bytes(b"xx" + DISTRO_BUNDLE + b"yy")
    tree = Tree()
    tree.add_file(b"/etc/ssl/certs/ca-certificates.crt", SpoolContent(spool, 2, len(DISTRO_BUNDLE)))
    tree.add_symlink(b"/etc/ssl/cert.pem", b"certs/ca-certificates.crt")
    ours = _ca_pem()

    changed = append_ca_bundle(tree, ours)

    assert changed == [b"/etc/ssl/certs/ca-certificates.crt"]
    assert _read(tree, b"/etc/ssl/certs/ca-certificates.crt") == DISTRO_BUNDLE + ours
    assert _read(tree, b"/etc/ssl/cert.pem") == DISTRO_BUNDLE + ours
    assert spool.read_bytes() == b"xx" + DISTRO_BUNDLE + b"yy"  # the layer's bytes are never written to


def test_append_ca_bundle_extends_rhel_store_and_adds_missing_newline() -> None:
    tree = Tree()
    tree.add_file(b"/etc/pki/tls/certs/ca-bundle.crt", BytesContent(DISTRO_BUNDLE.rstrip(b"\n")), mode=0o444)
    ours = _ca_pem()

    assert append_ca_bundle(tree, ours) == [b"/etc/pki/tls/certs/ca-bundle.crt"]

    assert _read(tree, b"/etc/pki/tls/certs/ca-bundle.crt") == DISTRO_BUNDLE + ours
    node = tree.lookup(b"/etc/pki/tls/certs/ca-bundle.crt")
    assert node is not None and node.mode == 0o444  # the image's own attributes stay
    assert tree.lookup(b"/etc/ssl/certs/ca-certificates.crt") is None


def test_append_ca_bundle_creates_store_when_image_has_none() -> None:
    tree = Tree()
    ours = _ca_pem()
    assert append_ca_bundle(tree, ours) == [b"/etc/ssl/certs/ca-certificates.crt"]
    assert _read(tree, b"/etc/ssl/certs/ca-certificates.crt") == ours


def test_append_ca_bundle_follows_symlink_only_inside_the_tree() -> None:
    tree = Tree()
    tree.add_file(b"/etc/ssl/certs/real.crt", BytesContent(DISTRO_BUNDLE))
    tree.add_symlink(b"/etc/ssl/certs/ca-certificates.crt", b"/../../etc/ssl/certs/real.crt")
    ours = _ca_pem()
    append_ca_bundle(tree, ours)
    assert _read(tree, b"/etc/ssl/certs/real.crt") == DISTRO_BUNDLE + ours


def test_load_ca_bundle_errors(tmp_path: Path) -> None:
    with pytest.raises(CaBundleNotConfigured) as err:
        load_ca_bundle(None)
    assert err.value.code == "ca_bundle_not_configured"
    with pytest.raises(InvalidCaBundle):
        load_ca_bundle(tmp_path / "missing.pem")
    empty = tmp_path / "empty.pem"
    empty.write_bytes(b"no certificates here\n")
    with pytest.raises(InvalidCaBundle) as bad:
        load_ca_bundle(empty)
    assert bad.value.code == "invalid_ca_bundle"
    odd = tmp_path / "odd.pem"
    odd.write_bytes(_ca_pem() + pem_of(with_unknown_version(x509.load_pem_x509_certificate(_ca_pem()).public_bytes(
        serialization.Encoding.DER))))
    with pytest.raises(InvalidCaBundle):
        load_ca_bundle(odd)
    good = tmp_path / "good.pem"
    good.write_bytes(_ca_pem() + _ca_pem())
    assert load_ca_bundle(good) == good.read_bytes()


def test_check_java_mode_accepts_known_values_only() -> None:
    assert check_java_mode(None) is None
    for mode in JAVA_MODES:
        assert check_java_mode(mode) == mode
    with pytest.raises(InvalidOptions) as err:
        check_java_mode("openjdk")
    assert err.value.details["field"] == "java_mode"


def test_option_warnings_warn_for_debug_builds() -> None:
    assert option_warnings(ConverterOptions()) == ()
    assert option_warnings(ConverterOptions(debug=True)) == (DEBUG_WARNING,)
    assert "all-zero PCRs" in DEBUG_WARNING
