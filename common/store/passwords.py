"""Password hashing with argon2id; the slow KDF runs only when a user signs in or is created."""
from __future__ import annotations

import functools

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError


@functools.cache
def _hasher() -> PasswordHasher:
    return PasswordHasher()  # argon2id with the library's RFC 9106 "low memory" parameters


def hash_password(password: str) -> str:
    return _hasher().hash(password)


def verify_password(stored_hash: str, password: str) -> bool:
    try:
        return _hasher().verify(stored_hash, password)
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


# Verified against when the e-mail is unknown, so a wrong e-mail costs as long as a wrong password.
@functools.cache
def dummy_hash() -> str:
    return hash_password("nitroconv-timing-equaliser")
