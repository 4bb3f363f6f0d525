"""Operations of CCM's API document this service does not have the subject of: other platforms (SGX, ACI) and
compute nodes. Each answers the error envelope with a code that says why, so a CCM client gets a clear answer
instead of a bare 404 or 405."""
from __future__ import annotations

from flask.views import MethodView
from flask_smorest import Blueprint

from api.auth import principal
from api.schemas.common import ErrorSchema
from common.errors import NotFound, ValidationFailed

blp = Blueprint("unsupported", __name__, url_prefix="/v1",
                description="CCM operations for other platforms or compute nodes: error envelope only")


def _platform(platform: str) -> ValidationFailed:
    return ValidationFailed(f"this service converts for AWS Nitro Enclaves only, not {platform}",
                            code="platform_not_supported", details={"platform": platform})


def _nodes() -> NotFound:
    return NotFound("this service has no compute nodes: converted images are not deployed here",
                    code="nodes_not_supported")


@blp.route("/builds", methods=["POST"])
class CreateSgxBuild(MethodView):
    @blp.alt_response(422, schema=ErrorSchema, description="`platform_not_supported`")
    def post(self) -> None:
        """CCM's createBuild (an SGX image): not here; use POST /v1/builds/convert-app/nitro-enclaves."""
        principal()
        raise _platform("SGX")


@blp.route("/builds/convert-app/aci")
class ConvertAci(MethodView):
    @blp.alt_response(422, schema=ErrorSchema, description="`platform_not_supported`")
    def post(self) -> None:
        """CCM's ACI conversion: not here."""
        principal()
        raise _platform("ACI")


@blp.route("/builds/deployments/<uuid:build_id>")
class BuildDeployments(MethodView):
    @blp.alt_response(404, schema=ErrorSchema, description="`nodes_not_supported`")
    def get(self, build_id: object) -> None:
        """CCM's deployments of a build on compute nodes: none here."""
        principal()
        raise _nodes()


@blp.route("/apps/<uuid:app_id>/node/<uuid:node_id>/certificate")
class AppNodeCertificate(MethodView):
    @blp.alt_response(404, schema=ErrorSchema, description="`nodes_not_supported`")
    def get(self, app_id: object, node_id: object) -> None:
        """CCM's app certificate on a compute node: none here."""
        principal()
        raise _nodes()


@blp.route("/apps/<uuid:app_id>/node/<uuid:node_id>/certificate-details")
class AppNodeCertificateDetails(MethodView):
    @blp.alt_response(404, schema=ErrorSchema, description="`nodes_not_supported`")
    def get(self, app_id: object, node_id: object) -> None:
        """CCM's app certificate details on a compute node: none here."""
        principal()
        raise _nodes()


@blp.route("/nodes", methods=["GET", "POST"])
class Nodes(MethodView):
    @blp.alt_response(404, schema=ErrorSchema, description="`nodes_not_supported`")
    def get(self) -> None:
        """CCM's compute nodes: none here."""
        raise _nodes()

    @blp.alt_response(404, schema=ErrorSchema, description="`nodes_not_supported`")
    def post(self) -> None:
        """CCM's node provisioning: none here."""
        raise _nodes()
