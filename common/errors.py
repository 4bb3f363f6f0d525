"""Typed errors with stable lower_snake codes; the only place new codes are named."""
from __future__ import annotations

from collections.abc import Mapping


class NitroconvError(Exception):
    """Base error: `code` is the stable contract, `message` is for people."""

    code = "internal_error"
    retryable = False

    def __init__(self, message: str, *, code: str | None = None, details: Mapping[str, object] | None = None):
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details: dict[str, object] = dict(details or {})

    def __str__(self) -> str:
        return f"{self.code}: {self.message}"


class PermanentError(NitroconvError):
    """Retrying cannot help: bad input, hostile image, verification failure."""


class RetryableError(NitroconvError):
    """A transient fault (network, registry 5xx, 429); the caller may try again later."""

    retryable = True


# --- formats -----------------------------------------------------------------------------------
class InvalidEif(PermanentError):
    code = "invalid_eif"


class InvalidCpio(PermanentError):
    code = "invalid_cpio"


# --- images and layers -------------------------------------------------------------------------
class LimitExceeded(PermanentError):
    code = "limit_exceeded"


class InvalidLayer(PermanentError):
    code = "invalid_layer"


class NameTooLong(PermanentError):
    code = "name_too_long"


class SymlinkLoop(PermanentError):
    code = "symlink_loop"


class NoCommand(PermanentError):
    code = "no_command"


class InvalidOptions(PermanentError):
    code = "invalid_options"


# --- registry ----------------------------------------------------------------------------------
class RegistryError(PermanentError):
    code = "registry_error"


class ManifestUnknown(RegistryError):
    code = "manifest_unknown"


class BlobUnknown(RegistryError):
    code = "blob_unknown"


class Unauthorized(RegistryError):
    code = "unauthorized"


class Denied(RegistryError):
    code = "denied"


class DigestMismatch(RegistryError):
    code = "digest_mismatch"


class SizeMismatch(RegistryError):
    code = "size_mismatch"


class UnsupportedMediaType(RegistryError):
    code = "unsupported_media_type"


class NoMatchingPlatform(RegistryError):
    code = "no_matching_platform"


class InvalidReference(RegistryError):
    code = "invalid_reference"


class InvalidManifest(RegistryError):
    code = "invalid_manifest"


class RegistryUnavailable(RetryableError):
    code = "registry_unavailable"
