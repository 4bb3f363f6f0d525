"""Worker Prometheus metrics: conversions by outcome/code, seconds per step, registry bytes, queue depth.

Why multiprocess mode: conversions run in prefork children that are recycled (after the settings'
worker_max_tasks_per_child conversions, after a memory peak, at a hard time limit), so a child's
in-memory counters would die with it. Each child writes to mmapped files in a directory
owned by its worker instance (`<state_dir>/metrics/<node>`, wiped at start), and the instance's MainProcess
serves them on the settings' worker_metrics_port. Several instances on one host each get their own port (the
systemd template passes port = base + instance index): one exporter per instance keeps its files' lifetime
tied to that instance, and a scrape target per worker is what Prometheus' `up` should mean.

Nothing here sees a credential: the labels are fixed vocabularies (outcome, error code, step, queue).
"""
from __future__ import annotations

import functools
import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

from common.queue.tasknames import QUEUES
from common.settings import Settings

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"


def metrics_dir(s: Settings, node: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in node) or "worker"
    return s.state_dir / "metrics" / safe


def prepare(s: Settings, node: str) -> Path | None:
    """In the worker's MainProcess before the pool forks: a clean multiprocess dir, exported to children."""
    if not s.worker_metrics_port:
        return None
    path = metrics_dir(s, node)
    shutil.rmtree(path, ignore_errors=True)  # counters of a previous run of this instance would add up
    path.mkdir(parents=True, exist_ok=True)
    os.environ[MULTIPROC_ENV] = str(path)
    from prometheus_client import values

    # prometheus_client picks its value class at import; re-pick now that the directory is known.
    values.ValueClass = values.get_value_class()
    return path


class QueueDepthCollector:
    """`nitroconv_queue_depth{queue}`: messages waiting in Redis, read at scrape time (not per child)."""

    def __init__(self, redis_url: str) -> None:
        self.redis_url = redis_url

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily
        from redis import Redis
        from redis.exceptions import RedisError

        gauge = GaugeMetricFamily("nitroconv_queue_depth", "Messages waiting in the broker queue", labels=["queue"])
        try:
            client = Redis.from_url(self.redis_url, socket_connect_timeout=2, socket_timeout=2)
            for queue in QUEUES:
                gauge.add_metric([queue], float(cast(int, client.llen(queue))))  # sync client
        except (RedisError, OSError):
            return  # an absent series, not a misleading zero, while Redis is away
        yield gauge


def start_exporter(s: Settings) -> int:
    """Serve the instance's metrics (all children's files plus queue depth); returns the bound port."""
    from prometheus_client import CollectorRegistry, multiprocess, start_http_server

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueDepthCollector(s.redis_url))
    server, _ = start_http_server(s.worker_metrics_port, addr="0.0.0.0", registry=registry)
    return int(server.server_port)


def child_exited(pid: int) -> None:
    if os.environ.get(MULTIPROC_ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid)


_METRICS_LOCK = threading.Lock()


def _metrics() -> dict[str, Any]:
    # The pull's prefetch threads may be the first to count: functools.cache alone lets two threads both
    # build the metrics, and the second registration raises DuplicateTimeseries mid-conversion.
    with _METRICS_LOCK:
        return _build_metrics()


@functools.cache
def _build_metrics() -> dict[str, Any]:
    from prometheus_client import Counter, Histogram

    return {
        "conversions": Counter("nitroconv_conversions_total", "Conversion attempts by outcome and error code",
                               ["outcome", "code"]),
        "step": Histogram("nitroconv_conversion_step_seconds", "Seconds spent per conversion step", ["step"],
                          buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800)),
        "pulled": Counter("nitroconv_registry_pulled_bytes_total", "Blob bytes downloaded from registries"),
        "pushed": Counter("nitroconv_registry_pushed_bytes_total", "Blob bytes uploaded to registries"),
    }


def record_outcome(outcome: str, code: str | None) -> None:
    _metrics()["conversions"].labels(outcome, code or "").inc()


def observe_step(step: str, seconds: float) -> None:
    _metrics()["step"].labels(step.lower()).observe(max(seconds, 0.0))


class StepTimer:
    """Wraps an `on_stage(stage, progress)` callback: the time between stage changes goes to its step."""

    def __init__(self, on_stage: Callable[[str, float], None], clock: Callable[[], float] = time.monotonic) -> None:
        self._inner, self._clock = on_stage, clock
        self._stage: str | None = None
        self._since = clock()

    def __call__(self, stage: str, progress: float) -> None:
        if stage != self._stage:
            self.finish()
            self._stage, self._since = stage, self._clock()
        self._inner(stage, progress)

    def finish(self) -> None:
        if self._stage is not None:
            observe_step(self._stage, self._clock() - self._since)
            self._stage = None


class MeteredEngine:
    """The runner's Engine with its steps timed; delegates everything else."""

    def __init__(self, engine: Callable[..., Any]) -> None:
        self._engine = engine

    def __call__(self, *args: Any, on_stage: Callable[[str, float], None], **kwargs: Any) -> Any:
        timer = StepTimer(on_stage)
        try:
            return self._engine(*args, on_stage=timer, **kwargs)
        finally:
            timer.finish()


def instrument_registry() -> None:
    """Count blob bytes at the registry client's two transfer points (idempotent)."""
    from common.registry.client import RegistryClient

    if getattr(RegistryClient.fetch_blob, "_nitroconv_metered", False):
        return
    fetch, upload = RegistryClient.fetch_blob, RegistryClient.upload_blob

    @functools.wraps(fetch)
    def fetch_blob(self: RegistryClient, repository: str, descriptor: Any, dest: Path, **kwargs: Any) -> Path:
        path = fetch(self, repository, descriptor, dest, **kwargs)
        _metrics()["pulled"].inc(int(descriptor.size))
        return path

    @functools.wraps(upload)
    def upload_blob(self: RegistryClient, repository: str, digest: Any, size: int, *args: Any, **kwargs: Any) -> bool:
        sent = upload(self, repository, digest, size, *args, **kwargs)
        if sent:  # False: the registry already had it, nothing crossed the wire
            _metrics()["pushed"].inc(int(size))
        return sent

    fetch_blob._nitroconv_metered = True  # type: ignore[attr-defined]
    RegistryClient.fetch_blob = fetch_blob  # type: ignore[method-assign]
    RegistryClient.upload_blob = upload_blob  # type: ignore[method-assign]
