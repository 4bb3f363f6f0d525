"""Schemas of `POST /v1/builds/{build_id}/attestation/verify`: a Nitro attestation document in, what matched out."""
from __future__ import annotations

import base64
import binascii
import math

from marshmallow import Schema, ValidationError, fields, validate

from common.enclave.attestation import DEFAULT_MAX_AGE, MAX_DOCUMENT_BYTES, MAX_NONCE_BYTES, STEPS

# Twice the base64 of the largest document the verifier reads: a larger one is a bad request, one in between is
# answered `verified: false` with document_too_large. A day is the longest maximum age (a document is minutes old).
_MAX_DOCUMENT_CHARS = 2 * 4 * math.ceil(MAX_DOCUMENT_BYTES / 3)
_MAX_AGE_LIMIT = 86400


class _EncodedBytes(fields.Field[bytes]):
    """Bytes sent as a JSON string, refused past `max_chars` before decoding; documented as a string."""

    def __init__(self, *, max_chars: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.max_chars = max_chars

    def _decode(self, text: str) -> bytes:
        raise NotImplementedError

    def _deserialize(self, value: object, attr: str | None, data: object, **kwargs: object) -> bytes:
        if not isinstance(value, str):
            raise ValidationError("not a string")
        if len(value) > self.max_chars:
            raise ValidationError(f"longer than {self.max_chars} characters")
        return self._decode(value)

    def _encode(self, value: bytes) -> str:
        raise NotImplementedError

    def _serialize(self, value: bytes | None, attr: str | None, obj: object, **kwargs: object) -> str | None:
        return None if value is None else self._encode(value)


class Base64Bytes(_EncodedBytes):
    """Standard base64 (RFC 4648 §4, padded)."""

    def _encode(self, value: bytes) -> str:
        return base64.b64encode(value).decode("ascii")

    def _decode(self, text: str) -> bytes:
        try:
            return base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("not standard base64") from None


class HexBytes(_EncodedBytes):
    def _encode(self, value: bytes) -> str:
        return value.hex()

    def _decode(self, text: str) -> bytes:
        try:
            return bytes.fromhex(text)
        except ValueError:
            raise ValidationError("not hexadecimal") from None


class AttestationVerifyRequestSchema(Schema):
    document = Base64Bytes(required=True, max_chars=_MAX_DOCUMENT_CHARS, validate=validate.Length(min=1), metadata={
        "type": "string", "format": "byte",
        "description": "the attestation document (the COSE_Sign1 bytes the NSM returned), base64"})
    nonce = HexBytes(load_default=None, allow_none=True, max_chars=2 * MAX_NONCE_BYTES,
                     metadata={"type": "string", "description": "the nonce the document must carry (hex); omitted: not checked"})
    max_age_seconds = fields.Integer(
        load_default=int(DEFAULT_MAX_AGE.total_seconds()), allow_none=True,
        validate=validate.Range(min=1, max=_MAX_AGE_LIMIT),
        metadata={"description": "refuse documents older than this (default 300); null: not checked"})
    allow_debug = fields.Boolean(load_default=False, metadata={
        "description": "accept a debug-mode enclave (all-zero PCRs); its PCRs are then not compared"})
    emulator = fields.Boolean(load_default=False, metadata={
        "description": "EMULATOR MODE: accept an emulated NSM's unsigned document, skipping ONLY the signature "
                       "and certificate chain checks (the answer says so)"})


class PcrResultSchema(Schema):
    index = fields.Integer(required=True)
    expected = fields.String(required=True)
    actual = fields.String(required=True, allow_none=True)
    matched = fields.Boolean(required=True)


class AttestationErrorSchema(Schema):
    code = fields.String(required=True, metadata={"description": (
        "malformed_document, document_too_large, unsupported_algorithm, unsupported_digest, unsigned_document, "
        "untrusted_chain, invalid_certificate, expired, not_yet_valid, bad_signature, debug_enclave, "
        "pcr_mismatch, nonce_mismatch, stale_document, timestamp_in_future")})
    message = fields.String(required=True)
    details = fields.Dict(required=True, keys=fields.String(), values=fields.Raw())


class AttestedDocumentSchema(Schema):
    module_id = fields.String(required=True)
    timestamp = fields.String(required=True, metadata={"description": "RFC 3339, UTC"})
    digest = fields.String(required=True)
    pcrs = fields.Dict(required=True, keys=fields.String(), values=fields.String(),
                       metadata={"description": "index → hex, as the document claims them"})
    public_key = fields.String(required=True, allow_none=True, metadata={"description": "base64"})
    user_data = fields.String(required=True, allow_none=True, metadata={"description": "base64"})
    nonce = fields.String(required=True, allow_none=True, metadata={"description": "hex"})
    certificates = fields.Integer(required=True)


class AttestationVerifyResultSchema(Schema):
    build_id = fields.UUID(required=True)
    verified = fields.Boolean(required=True, metadata={"description": "true only when every requested check passed"})
    mode = fields.String(required=True, validate=validate.OneOf(("aws", "emulator")))
    error = fields.Nested(AttestationErrorSchema, required=True, allow_none=True,
                          metadata={"description": "the first check that failed"})
    checks = fields.Dict(required=True, keys=fields.String(validate=validate.OneOf(STEPS)), values=fields.String(),
                         metadata={"description": "each step: passed, failed, not_reached, not_requested, "
                                                  "skipped_emulator or skipped_debug"})
    pcrs = fields.List(fields.Nested(PcrResultSchema), required=True,
                       metadata={"description": "the Build's PCRs against the document's"})
    debug_enclave = fields.Boolean(required=True)
    age_seconds = fields.Float(required=True, allow_none=True)
    warnings = fields.List(fields.String(), required=True)
    document = fields.Nested(AttestedDocumentSchema, required=True, allow_none=True,
                             metadata={"description": "the payload as claimed (trusted only when verified)"})
