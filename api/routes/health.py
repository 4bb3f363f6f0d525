"""`/healthz` (Postgres and Redis reachable) and `/metrics` (Prometheus)."""
from __future__ import annotations

import os

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from api.context import settings
from api.schemas.sys import HealthSchema
from common.queue import publish as queue
from common.store import engine as database

blp = Blueprint("health", __name__, description="Liveness and metrics")


@blp.route("/healthz")
class Health(MethodView):
    @blp.response(200, HealthSchema)
    @blp.doc(security=[])
    def get(self) -> dict[str, object]:
        """200 when Postgres and Redis answer; the 503 envelope names the one that does not."""
        s = settings()
        database.ping(s.database_url)
        queue.ping(s.redis_url)
        return {"status": "ok", "checks": {"postgres": "ok", "redis": "ok"}}


@blp.route("/metrics")
class Metrics(MethodView):
    @blp.doc(security=[], responses={"200": {
        "description": "Prometheus text exposition format",
        "content": {"text/plain": {"schema": {"type": "string"}}}}})
    def get(self) -> Response:
        """Prometheus metrics of the API processes."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        # content_type, not mimetype: the constant already names its charset (mimetype would add a second).
        return Response(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
