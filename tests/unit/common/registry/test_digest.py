"""Digest grammar and the verifying writer/reader."""
from __future__ import annotations

import hashlib
import io

import pytest

from common.errors import DigestMismatch, InvalidDigest, SizeMismatch
from common.registry.digest import Digest, HashingReader, VerifyingWriter, verify_bytes

HEX = hashlib.sha256(b"x").hexdigest()


def test_digest_parse_accepts_sha256_and_sha512():
    assert str(Digest.parse(f"sha256:{HEX}")) == f"sha256:{HEX}"
    long = hashlib.sha512(b"x").hexdigest()
    assert Digest.parse(f"sha512:{long}").algorithm == "sha512"


@pytest.mark.parametrize("text", [
    "sha256:../../etc/passwd",
    f"sha256:{HEX.upper()}",
    f"sha256:{HEX[:-1]}",
    f"sha256:{HEX}0",
    f"md5:{HEX[:32]}",
    f"sha384:{hashlib.sha384(b'x').hexdigest()}",
    HEX,
    f"sha256:{HEX}\n",
    f"SHA256:{HEX}",
    "",
    f"sha256:{HEX[:-2]}/x",
])
def test_digest_parse_rejects_malformed(text):
    with pytest.raises(InvalidDigest) as exc:
        Digest.parse(text)
    assert exc.value.code == "invalid_digest"


def test_digest_parse_rejects_non_strings():
    with pytest.raises(InvalidDigest):
        Digest.parse(None)


def test_digest_of_and_matches():
    d = Digest.of(b"hello")
    assert d.hex == hashlib.sha256(b"hello").hexdigest()
    assert d.matches(b"hello") and not d.matches(b"hello!")
    assert Digest.of(b"hello", "sha512").hex == hashlib.sha512(b"hello").hexdigest()


def test_verify_bytes_checks_size_then_digest():
    d = Digest.of(b"abc")
    verify_bytes(b"abc", d, 3)
    with pytest.raises(SizeMismatch):
        verify_bytes(b"abcd", d, 3)
    with pytest.raises(DigestMismatch):
        verify_bytes(b"abd", d, 3)


def test_verifying_writer_stops_at_first_excess_byte():
    sink = io.BytesIO()
    writer = VerifyingWriter(sink, Digest.of(b"abc"), 3)
    writer.write(b"ab")
    with pytest.raises(SizeMismatch):
        writer.write(b"cd")
    assert sink.getvalue() == b"ab"


def test_verifying_writer_short_and_wrong_content():
    writer = VerifyingWriter(io.BytesIO(), Digest.of(b"abc"), 3)
    writer.write(b"ab")
    with pytest.raises(SizeMismatch):
        writer.verify()
    writer = VerifyingWriter(io.BytesIO(), Digest.of(b"abc"), 3)
    writer.write(b"abd")
    with pytest.raises(DigestMismatch):
        writer.verify()


def test_verifying_writer_reset_restarts_hash():
    sink = io.BytesIO()
    writer = VerifyingWriter(sink, Digest.of(b"abc"), 3)
    writer.write(b"xy")
    sink.seek(0)
    sink.truncate()
    writer.reset()
    writer.write(b"abc")
    assert writer.verify() == Digest.of(b"abc")


def test_hashing_reader_counts_and_hashes():
    reader = HashingReader(io.BytesIO(b"hello world"))
    while reader.read(3):
        pass
    assert reader.count == 11 and reader.digest() == Digest.of(b"hello world")
