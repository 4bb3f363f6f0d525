"""The Celery application of the workers and beat, configured from Settings per DESIGN.md §7 / RELIABILITY.md §3."""
from __future__ import annotations

import gc
import importlib
import logging
import pkgutil

from celery import Celery
from celery.signals import (
    celeryd_after_setup,
    setup_logging,
    task_postrun,
    worker_init,
    worker_process_init,
    worker_process_shutdown,
)
from kombu import Exchange, Queue

from common import logs
from common.queue.publish import broker_transport_options
from common.queue.tasknames import MAINTENANCE, QUEUE, SWEEP
from common.settings import Settings, get_settings
from common.store import engine as db
from worker import heap

MAINTENANCE_QUEUE = MAINTENANCE


def celery_config(s: Settings) -> dict[str, object]:
    """Every Celery setting we rely on, derived from Settings (tested without a broker)."""
    transport = broker_transport_options(s.visibility_timeout)
    return {
        "broker_url": s.redis_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "result_backend_transport_options": {"visibility_timeout": s.visibility_timeout},
        "visibility_timeout": s.visibility_timeout,
        # Delivery: a task runs at least once; the Postgres CAS claim makes the second run a no-op.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        # Recycled by count and by memory (Celery takes KiB): a long conversion's heap does not stay with the child.
        "worker_max_tasks_per_child": s.worker_max_tasks_per_child,
        "worker_max_memory_per_child": s.worker_max_memory_per_child_mib * 1024,
        "worker_soft_shutdown_timeout": float(s.soft_shutdown_timeout),
        "worker_enable_soft_shutdown_on_idle": True,
        "task_soft_time_limit": s.soft_time_limit,
        "task_time_limit": s.time_limit,
        # Serialization: JSON only, so a forged pickle on the broker cannot execute code.
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_extended": False,
        # Routing: conversions (`convert`, Nitro hosts) and the sweeper (`maintenance`) on separate queues;
        # a worker started without -Q consumes the settings' worker_queues.
        "task_default_queue": QUEUE,
        "task_queues": [Queue(name, Exchange(name), routing_key=name) for name in s.worker_queues],
        "task_create_missing_queues": True,
        "task_routes": {SWEEP: {"queue": MAINTENANCE_QUEUE}},
        "beat_schedule": {
            "sweep": {"task": SWEEP, "schedule": float(s.sweep_interval_seconds),
                      "options": {"queue": MAINTENANCE_QUEUE, "expires": float(s.sweep_interval_seconds)}},
        },
        # Flower is event-driven; task arguments are build ids only, so events leak nothing.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }


app = Celery("nitroconv", include=["worker.tasks", "worker.lifecycle"])
# Lazy: the environment is read when Celery first needs configuration, not at import time.
app.add_defaults(lambda: celery_config(get_settings()))


@worker_init.connect
def _one_malloc_arena(**_: object) -> None:
    # First of the worker_init handlers, before Celery or a conversion starts a thread; pool children inherit it.
    heap.limit_arenas(1)


@worker_process_init.connect
def _fresh_connections(**_: object) -> None:
    # A forked pool child must never reuse a connection pool the parent may have opened.
    db.engine_for.cache_clear()
    db.session_factory.cache_clear()
    if get_settings().worker_metrics_port:
        from worker import metrics

        metrics.instrument_registry()


@setup_logging.connect
def _logging(loglevel: int | str | None = None, **_: object) -> None:
    # Connected, so Celery leaves logging to us: one handler, JSON or text, with the build_id context.
    logs.configure(get_settings().log_format, level=loglevel or logging.INFO)


@worker_init.connect
def _preload_pipeline(**_: object) -> None:
    # In the main process, before the pool forks: a child (and each replacement of a recycled child) then
    # inherits the pipeline already imported instead of importing it on its first task.
    import worker.pipeline

    for module in pkgutil.iter_modules(worker.pipeline.__path__, "worker.pipeline."):
        importlib.import_module(module.name)
    # The database driver too: SQLAlchemy imports it at the first connection, which the main process makes only
    # once the pool has forked (reaping at start), so each process would hold a copy of its own.
    import psycopg2.extras  # noqa: F401


@celeryd_after_setup.connect
def _warm_memos(instance: object = None, **_: object) -> None:
    # Also before the pool forks (Celery sends this just before its bootsteps start), and after logging is set
    # up; only where conversions run (a maintenance-only worker never builds an EIF).
    queues = getattr(getattr(getattr(instance, "app", None), "amqp", None), "queues", None)
    consumed = getattr(queues, "consume_from", None) or queues or {}
    if QUEUE in consumed:
        from worker.pipeline.warm import warm

        s = get_settings()
        warm(s.blobs_dir)
        # Its default depends on the host (the emulator installed or not): say which it is.
        logging.getLogger(__name__).info("boot check of each EIF: %s (mode %s, emulator %s)",
                                         "on" if s.boot_check else "off", s.boot_check_mode, s.emulator_qemu)
    # The last thing before the fork: what the main process holds now stays shared with its children.
    heap.freeze_before_fork()


@task_postrun.connect
def _release_heap(**_: object) -> None:
    # In the pool child after each task: its cyclic garbage and free heap pages go, so an idle child does not
    # keep the last conversion's peak resident until the next one.
    gc.collect()
    heap.release()


@worker_init.connect
def _metrics_exporter(sender: object = None, **_: object) -> None:
    s = get_settings()
    if not s.worker_metrics_port:
        return
    from worker import metrics

    metrics.prepare(s, str(getattr(sender, "hostname", None) or "worker"))  # before the pool forks
    port = metrics.start_exporter(s)
    logging.getLogger(__name__).info("metrics on port %d", port)


@worker_process_shutdown.connect
def _metrics_child_exit(pid: int | None = None, **_: object) -> None:
    if pid is not None:
        from worker import metrics

        metrics.child_exited(pid)
