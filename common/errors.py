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


class ResourceLimit(PermanentError):
    """The worker host ran out of disk (ENOSPC, EDQUOT) or memory mid-conversion. Not retried: the same
    image on the same class of host would exhaust it again, and a retry storm starves other builds."""

    code = "resource_limit"


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


class BootCheckNoSandbox(BootCheckUnavailable):
    """The emulator's QEMU refuses `-sandbox` (built without seccomp); the images it boots are untrusted, so it is
    not run at all (`auto` boots plain QEMU instead, which has the sandbox)."""

    code = "boot_check_no_sandbox"


class BootCheckFailed(PermanentError):
    """The converted image did not reach its entrypoint under QEMU; `details.boot_check` says how far it got."""

    code = "boot_check_failed"


class BootCheckPcrMismatch(BootCheckFailed):
    """The PCRs the emulator's NSM measured (as the init read them) differ from the Build's, or are missing."""

    code = "boot_check_pcr_mismatch"


class BootCheckNoHeartbeat(BootCheckFailed):
    """The enclave never sent the parent its "enclave ready" heartbeat on vsock port 9000."""

    code = "boot_check_no_heartbeat"


# --- EIF inputs ----------------------------------------------------------------------------------
class InvalidBlobs(PermanentError):
    """The kernel, cmdline, init or kernel config in the blobs dir is missing or malformed."""

    code = "invalid_blobs"


# --- layer application limits: one code, `details.limit` names which limit tripped ---------------
class TotalBytesExceeded(LimitExceeded):
    """Uncompressed bytes (tar stream, or declared file sizes) passed the image's byte limit."""


class EntryCountExceeded(LimitExceeded):
    """Tar members plus implicitly created directories passed the image's entry limit."""


# --- EIF signing (checked before the build starts) ------------------------------------------------
class SigningError(PermanentError):
    """The deployment's signing key or certificate cannot sign EIFs."""

    code = "signing_error"


class InvalidSigningMaterial(SigningError):
    """A signing key or certificate file that is missing, unreadable, not PEM, encrypted, or only half configured."""

    code = "invalid_signing_material"


class SigningCertificateExpired(SigningError):
    code = "signing_certificate_expired"


class SigningCertificateNotYetValid(SigningError):
    code = "signing_certificate_not_yet_valid"


class SigningKeyMismatch(SigningError):
    """The private key's public half is not the certificate's public key."""

    code = "signing_key_mismatch"


class SigningKeyUnsupported(SigningError):
    """Not an EC key (e.g. RSA or Ed25519): nitro-cli signs and verifies ECDSA only."""

    code = "signing_key_unsupported"


class SigningCurveUnsupported(SigningError):
    """An EC key on a curve other than P-256, P-384 or P-521 (no COSE ES256/384/512 algorithm)."""

    code = "signing_curve_unsupported"


# --- converter options -----------------------------------------------------------------------------
class CaBundleNotConfigured(InvalidOptions):
    """add_ccm_ca_certificates was asked for but the service has no NITROCONV_CA_BUNDLE."""

    code = "ca_bundle_not_configured"


class InvalidCaBundle(PermanentError):
    """NITROCONV_CA_BUNDLE is unreadable or holds no PEM certificate."""

    code = "invalid_ca_bundle"


# --- API abuse limits (RELIABILITY.md §E): both answer 429 with Retry-After -------------------------
class TooManyRequests(RetryableError):
    code = "too_many_requests"


class RateLimited(TooManyRequests):
    """The caller sent more requests in the current window than the per-caller limit allows."""

    code = "rate_limited"


class QuotaExceeded(TooManyRequests):
    """The account already has as many unfinished conversions as its quota allows."""

    code = "quota_exceeded"


# --- the CLI client (`nitroconv` service commands); each maps to a documented exit status ----------
class ServiceUnreachable(RetryableError):
    """The client could not reach the service at all (refused, DNS, TLS, timeout): exit status 3."""

    code = "unreachable"


class WaitTimedOut(NitroconvError):
    """`--wait` gave up before the conversion ended (it may still end later): exit status 4."""

    code = "wait_timed_out"


class EifCheckFailed(PermanentError):
    """`nitroconv verify`: the EIF parses but its CRC, signature or an expected PCR does not match."""

    code = "eif_check_failed"


# --- attestation documents (common/enclave/attestation.py): every failed check has its own code ------------
class AttestationFailed(PermanentError):
    """A Nitro attestation document that does not prove what was expected; subclasses name the check."""

    code = "attestation_failed"


class MalformedDocument(AttestationFailed):
    """Not a COSE_Sign1 over an attestation payload of the documented shape (a field missing, mistyped, null
    where required, out of its size range, or unknown; truncated or trailing CBOR)."""

    code = "malformed_document"


class DocumentTooLarge(MalformedDocument):
    """Larger than any document the NSM issues: refused before it is decoded."""

    code = "document_too_large"


class UnsupportedAlgorithm(AttestationFailed):
    """The COSE protected header names an algorithm other than ES384 (-35)."""

    code = "unsupported_algorithm"


class UnsupportedDigest(AttestationFailed):
    """The payload's `digest` is not "SHA384"."""

    code = "unsupported_digest"


class UnsignedDocument(AttestationFailed):
    """An all-zero signature: what an emulated NSM (QEMU) issues. Only the emulator mode accepts it."""

    code = "unsigned_document"


class UntrustedChain(AttestationFailed):
    """The certificates do not chain from the pinned root to the document's certificate."""

    code = "untrusted_chain"


class InvalidCertificate(AttestationFailed):
    """A certificate that does not parse, or whose basic constraints, key usage or key type forbid its place."""

    code = "invalid_certificate"


class CertificateExpired(AttestationFailed):
    code = "expired"


class CertificateNotYetValid(AttestationFailed):
    code = "not_yet_valid"


class BadSignature(AttestationFailed):
    """The COSE_Sign1 signature does not verify with the document certificate's P-384 key."""

    code = "bad_signature"


class DebugEnclave(AttestationFailed):
    """PCR0, PCR1 and PCR2 are all zero: a debug-mode enclave, whose measurements prove nothing."""

    code = "debug_enclave"


class PcrMismatch(AttestationFailed):
    code = "pcr_mismatch"


class NonceMismatch(AttestationFailed):
    code = "nonce_mismatch"


class StaleDocument(AttestationFailed):
    """The document's timestamp is older than the caller's maximum age."""

    code = "stale_document"


class TimestampInFuture(AttestationFailed):
    """The document's timestamp is ahead of the verifier's clock by more than the allowed skew."""

    code = "timestamp_in_future"


class BuildNotMeasured(Conflict):
    """An attestation cannot be checked against a Build that has no PCRs yet (its conversion has not succeeded)."""

    code = "build_not_measured"


class AttestationRootInvalid(PermanentError):
    """NITROCONV_ATTESTATION_ROOT is unreadable, not a PEM certificate, or does not hash to its pin: a deployment
    fault, so every verification answers it until it is fixed."""

    code = "attestation_root_invalid"


class EmulatorUnavailable(PermanentError):
    """`run-local` cannot run the enclave emulator here (QEMU with the nitro-enclave machine, the vsock back-end)."""

    code = "emulator_unavailable"


class EmulatorNoSandbox(EmulatorUnavailable):
    """The emulator's QEMU refuses `-sandbox` (no seccomp built in) and the session requires it."""

    code = "emulator_no_sandbox"
