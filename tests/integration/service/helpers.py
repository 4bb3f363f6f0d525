"""Response checks against the API's own schemas, and a driver that walks a build as a worker would."""
from __future__ import annotations

import uuid

from marshmallow import Schema

from api.schemas.common import ErrorSchema
from common import buildstore
from common.db import session_scope
from common.settings import Settings
from common.status import ConversionState

PCRS = {"pcr0": "a" * 96, "pcr1": "b" * 96, "pcr2": "c" * 96}


def ok(resp, schema: type[Schema] | None, status: int = 200) -> dict:  # noqa: ANN001
    """Assert the status and that the body is exactly what `schema` documents."""
    assert resp.status_code == status, (resp.status_code, resp.json)
    if schema is None:
        return {}
    problems = schema().validate(resp.json)
    assert problems == {}, problems
    return resp.json


def err(resp, status: int, code: str | None = None) -> dict:  # noqa: ANN001
    assert resp.status_code == status, (resp.status_code, resp.json)
    assert ErrorSchema().validate(resp.json) == {}, resp.json
    if code is not None:
        assert resp.json["error"]["code"] == code, resp.json
    assert resp.json["error"]["request_id"]
    return resp.json["error"]


def body(app_id: str, **over: object) -> dict:
    request = {"app_id": app_id, "input_image": {"name": "127.0.0.1:5000/in:1"},
               "output_image": {"name": "127.0.0.1:5000/out:1"}, "converter_options": {}}
    request.update(over)
    return {"request": request, "nitro_enclaves_options": {"cpu_count": 2, "mem_size": 512}}


def drive_to_success(s: Settings, build_id: str) -> None:
    """What a worker records, through the real store: claim, every stage, success and task."""
    bid = uuid.UUID(build_id)
    with session_scope(s.database_url) as session:
        claim = buildstore.claim(session, bid, lease_seconds=60)
        assert claim is not None
        state = ConversionState.PULLING
        for nxt in (ConversionState.BUILDING, ConversionState.MEASURING, ConversionState.PUSHING):
            assert buildstore.transition_conversion(session, bid, state, nxt, actor="test", fence=claim.fence)
            state = nxt
        task_id = buildstore.succeed(session, bid, claim.fence, buildstore.Outcome(
            input_digest="sha256:" + "1" * 64, output_digest="sha256:" + "2" * 64, output_size=3 << 20,
            eif_size=1 << 20, eif_sha256="3" * 64, pcr8=None, exposed_ports=((8080, "tcp"),), warnings=(),
            docker_version=None, **PCRS))
        assert task_id is not None
        buildstore.auto_approve_if_enabled(session, bid, task_id)
