"""`/healthz` (Postgres and Redis reachable) and `/metrics` (Prometheus)."""
from __future__ import annotations

import os

from flask import Response
from flask.views import MethodView
from flask_smorest import Blueprint
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, CollectorRegistry, generate_latest, multiprocess

from api.context import settings
from api.schemas.sys import HealthSchema
from common import db as database
from common import queue

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
    @blp.doc(security=[])
    def get(self) -> Response:
        """Prometheus metrics of the API processes."""
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        return Response(generate_latest(registry), mimetype=CONTENT_TYPE_LATEST)
