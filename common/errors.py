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


# --- service (API, records, queue) ---------------------------------------------------------------
class Cancelled(PermanentError):
    """The conversion was cancelled by its owner; raised by the pipeline between steps."""

    code = "cancelled"


class NotFound(NitroconvError):
    code = "not_found"


class Conflict(NitroconvError):
    code = "conflict"


class InvalidTransition(Conflict):
    """A status write that the transition table does not allow, or that lost a compare-and-set."""

    code = "invalid_transition"


class IdempotencyKeyReused(Conflict):
    code = "idempotency_key_reused"


class ValidationFailed(NitroconvError):
    """A request that is well-formed JSON but semantically invalid; `details.fields` names the fields."""

    code = "validation_failed"


class Unauthenticated(NitroconvError):
    code = "unauthenticated"


class Forbidden(NitroconvError):
    code = "forbidden"


class ServiceUnavailable(RetryableError):
    code = "service_unavailable"


class DatabaseUnavailable(ServiceUnavailable):
    code = "database_unavailable"


class QueueUnavailable(ServiceUnavailable):
    code = "queue_unavailable"


class SealingError(PermanentError):
    """Sealed credentials that cannot be opened: wrong key, unknown key id, or tampered bytes."""

    code = "sealing_error"


class AttemptsExhausted(PermanentError):
    code = "attempts_exhausted"


class ConversionTimeout(PermanentError):
    code = "timeout"


# --- conversion --------------------------------------------------------------------------------
class MemoryTooSmall(InvalidOptions):
    code = "mem_size_too_small"


# --- registry client (digests, host policy, deadlines) -----------------------------------------
class InvalidDigest(RegistryError):
    """A digest string outside the grammar (`sha256:<64 hex>`, `sha512:<128 hex>`)."""

    code = "invalid_digest"


class HostNotAllowed(RegistryError):
    """A registry, token realm or redirect target refused by the host policy (SSRF guard)."""

    code = "host_not_allowed"


class RegistryTimeout(RetryableError):
    """The registry did not answer within a request timeout or the client's overall deadline."""

    code = "registry_timeout"


# --- boot check --------------------------------------------------------------------------------
class BootCheckUnavailable(PermanentError):
    """QEMU is missing or cannot run on this worker: a deployment fault, not the image's."""

    code = "boot_check_unavailable"


class BootCheckFailed(PermanentError):
    """The converted image did not reach its entrypoint under QEMU; `details.boot_check` says how far it got."""

    code = "boot_check_failed"


# --- EIF inputs ----------------------------------------------------------------------------------
class InvalidBlobs(PermanentError):
    """The kernel, cmdline, init or kernel config in the blobs dir is missing or malformed."""

    code = "invalid_blobs"


# --- layer application limits: one code, `details.limit` names which limit tripped ---------------
class TotalBytesExceeded(LimitExceeded):
    """Uncompressed bytes (tar stream, or declared file sizes) passed the image's byte limit."""


class EntryCountExceeded(LimitExceeded):
    """Tar members plus implicitly created directories passed the image's entry limit."""
