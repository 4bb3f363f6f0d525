"""Credential sealing: round trip, binding to the build, tamper detection, key rotation."""
from __future__ import annotations

import pytest

from common.errors import SealingError
from common.store.sealing import Credentials, Sealer


def test_sealer_round_trips_credentials_without_the_password_in_clear():
    sealer = Sealer.from_secrets(b"secret-one")
    sealed = sealer.seal_credentials(Credentials("alice", "hunter2-canary"), "build-1")
    assert b"hunter2-canary" not in sealed and b"alice" not in sealed
    assert sealer.open_credentials(sealed, "build-1") == Credentials("alice", "hunter2-canary")


def test_sealer_refuses_a_blob_moved_to_another_build():
    sealer = Sealer.from_secrets(b"secret-one")
    sealed = sealer.seal_credentials(Credentials("alice", "pw"), "build-1")
    with pytest.raises(SealingError):
        sealer.open_credentials(sealed, "build-2")


def test_sealer_detects_tampering():
    sealer = Sealer.from_secrets(b"secret-one")
    sealed = bytearray(sealer.seal_credentials(Credentials("alice", "pw"), "b"))
    sealed[-1] ^= 1
    with pytest.raises(SealingError):
        sealer.open_credentials(bytes(sealed), "b")


def test_sealer_refuses_another_key():
    sealed = Sealer.from_secrets(b"secret-one").seal_credentials(Credentials("a", "p"), "b")
    with pytest.raises(SealingError):
        Sealer.from_secrets(b"secret-two").open_credentials(sealed, "b")


def test_sealer_opens_old_key_after_rotation_and_seals_with_new():
    old = Sealer.from_secrets(b"secret-one", current_id=1)
    sealed_old = old.seal_credentials(Credentials("a", "p"), "b")
    rotated = Sealer.from_secrets(b"secret-two", previous={1: b"secret-one"}, current_id=2)
    assert rotated.open_credentials(sealed_old, "b") == Credentials("a", "p")
    sealed_new = rotated.seal_credentials(Credentials("a", "p"), "b")
    assert sealed_new[3] == 2
    with pytest.raises(SealingError):
        old.open_credentials(sealed_new, "b")


def test_sealer_rejects_garbage():
    with pytest.raises(SealingError):
        Sealer.from_secrets(b"k").open(b"not sealed at all, clearly", b"")


def test_credentials_repr_hides_the_password():
    assert "pw-canary" not in repr(Credentials("a", "pw-canary"))
