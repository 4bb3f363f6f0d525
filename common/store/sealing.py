"""Sealing of registry credentials at rest: AES-256-GCM under keys derived from the service's secret key.

Format: b"nc1" | key id (1 byte) | nonce (12 bytes) | ciphertext+tag. The key id lets an operator add a
new secret and keep opening what the old one sealed; the build id is bound as associated data so a
sealed blob copied onto another build does not open.
"""
from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from common.errors import SealingError
from common.registry.auth import Credentials

_MAGIC = b"nc1"
_NONCE = 12


def derive_key(secret: bytes, purpose: bytes = b"nitroconv credential sealing v1") -> bytes:
    """A 256-bit key for one purpose, so the JWT key and the sealing key never coincide."""
    if not secret:
        raise SealingError("no secret key configured")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=purpose).derive(secret)


@dataclass(frozen=True)
class Sealer:
    """Seals with the current key id; opens with any key it holds."""

    keys: Mapping[int, bytes] = field(repr=False)
    current: int = 1

    @classmethod
    def from_secrets(cls, current: bytes, previous: Mapping[int, bytes] | None = None,
                     current_id: int = 1) -> Sealer:
        keys = {kid: derive_key(s) for kid, s in (previous or {}).items()}
        keys[current_id] = derive_key(current)
        return cls(keys=keys, current=current_id)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        ct = AESGCM(self.keys[self.current]).encrypt(nonce, plaintext, associated)
        return _MAGIC + bytes([self.current]) + nonce + ct

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        if len(sealed) < len(_MAGIC) + 1 + _NONCE + 16 or not sealed.startswith(_MAGIC):
            raise SealingError("not a sealed value")
        kid = sealed[len(_MAGIC)]
        key = self.keys.get(kid)
        if key is None:
            raise SealingError(f"sealed with unknown key id {kid}")
        nonce = sealed[len(_MAGIC) + 1: len(_MAGIC) + 1 + _NONCE]
        try:
            return AESGCM(key).decrypt(nonce, sealed[len(_MAGIC) + 1 + _NONCE:], associated)
        except InvalidTag:
            raise SealingError("sealed value does not open (wrong key, wrong build, or tampered)") from None

    def seal_credentials(self, creds: Credentials, build_id: str) -> bytes:
        payload = json.dumps({"u": creds.username, "p": creds.password}, separators=(",", ":")).encode()
        return self.seal(payload, build_id.encode())

    def open_credentials(self, sealed: bytes, build_id: str) -> Credentials:
        data = json.loads(self.open(sealed, build_id.encode()))
        return Credentials(username=str(data["u"]), password=str(data["p"]))
