"""`POST /v1/builds/{build_id}/attestation/verify`: is the enclave that produced this document that Build?"""
from __future__ import annotations

import functools
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import principal
from api.context import db, settings
from api.schemas.attestation import AttestationVerifyRequestSchema, AttestationVerifyResultSchema
from api.services import builds
from common.enclave.attestation import Expectations, build_pcrs, check, pinned_root
from common.errors import AttestationRootInvalid, BuildNotMeasured
from common.store.accounts import Role

blp = Blueprint("attestation", __name__, url_prefix="/v1/builds",
                description="Attestation: check an enclave's attestation document against a Build")


@functools.cache
def _configured_root(path: Path, sha256: str) -> x509.Certificate:
    try:
        return pinned_root(path.read_bytes(), sha256)
    except (OSError, ValueError) as exc:
        raise AttestationRootInvalid(f"NITROCONV_ATTESTATION_ROOT: {exc}") from None


def _root() -> x509.Certificate | None:
    """The deployment's root (another AWS partition's), else None: the pinned AWS Nitro Enclaves Root G1."""
    s = settings()
    return None if s.attestation_root is None else _configured_root(s.attestation_root, s.attestation_root_sha256)


@blp.route("/<uuid:build_id>/attestation/verify")
class AttestationVerify(MethodView):
    @blp.arguments(AttestationVerifyRequestSchema())
    @blp.response(200, AttestationVerifyResultSchema)
    @blp.alt_response(409, description="build_not_measured: the Build has no PCRs yet", schema="Error")
    def post(self, body: dict[str, object], build_id: uuid.UUID) -> dict[str, object]:
        """Verify a Nitro attestation document against the Build's PCRs.

        Checks the COSE_Sign1 (ES384), the payload, the certificate chain from the pinned AWS Nitro Enclaves
        Root G1 (or the deployment's NITROCONV_ATTESTATION_ROOT), the signature, then the Build's PCR0/1/2 (and PCR8 when signed), the nonce and the age. A
        document that fails is still a 200, with `verified: false` and the failed check's code.
        """
        account = principal().require(Role.READER)
        row = builds.get(db(), account, build_id)
        expected = build_pcrs({0: row.pcr0, 1: row.pcr1, 2: row.pcr2, 8: row.pcr8})
        if not expected:
            raise BuildNotMeasured("the build has no PCRs yet: its conversion has not succeeded",
                                   details={"build_id": str(build_id)})
        max_age = body["max_age_seconds"]
        expect = Expectations(pcrs=expected, nonce=body["nonce"],  # type: ignore[arg-type]
                              max_age=None if max_age is None else timedelta(seconds=max_age),  # type: ignore[arg-type]
                              allow_debug=bool(body["allow_debug"]), emulator=bool(body["emulator"]))
        report = check(body["document"], expect, now=datetime.now(UTC), root=_root())  # type: ignore[arg-type]
        return {"build_id": build_id, **report.as_dict()}
