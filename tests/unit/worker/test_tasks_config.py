"""Celery configuration derived from Settings (DESIGN.md §7, RELIABILITY.md §3); no broker needed."""
from __future__ import annotations

from common.queue.tasknames import CONVERT, SWEEP
from common.settings import Settings
from worker.celery_app import celery_config


def test_tasks_config_delivery_semantics():
    conf = celery_config(Settings())
    assert conf["task_acks_late"] is True and conf["task_reject_on_worker_lost"] is True
    assert conf["worker_prefetch_multiplier"] == 1
    assert conf["accept_content"] == ["json"] and conf["task_serializer"] == "json"
    assert conf["task_ignore_result"] is True and conf["result_extended"] is False


def test_tasks_config_time_limits_stay_below_the_visibility_timeout():
    s = Settings(soft_time_limit=100, time_limit=120, visibility_timeout=600)
    conf = celery_config(s)
    vt = conf["broker_transport_options"]["visibility_timeout"]
    assert conf["task_soft_time_limit"] < conf["task_time_limit"] < vt == 600
    assert conf["visibility_timeout"] == vt == conf["result_backend_transport_options"]["visibility_timeout"]


def test_tasks_config_schedules_the_sweeper():
    conf = celery_config(Settings(sweep_interval_seconds=7))
    entry = conf["beat_schedule"]["sweep"]
    assert entry["task"] == SWEEP and entry["schedule"] == 7.0


def test_tasks_are_registered_under_their_stable_names():
    import worker.tasks  # noqa: F401
    from worker.celery_app import app
    assert {CONVERT, SWEEP} <= set(app.tasks)


def test_tasks_config_queue_per_host_class():
    from common.queue.tasknames import MAINTENANCE, QUEUE

    conf = celery_config(Settings())
    assert QUEUE == "convert" and conf["task_default_queue"] == "convert"
    assert [q.name for q in conf["task_queues"]] == ["convert", "maintenance"]
    assert conf["task_routes"][SWEEP] == {"queue": MAINTENANCE}
    maintenance_only = celery_config(Settings.from_env({"NITROCONV_WORKER_QUEUES": "maintenance"}))
    assert [q.name for q in maintenance_only["task_queues"]] == ["maintenance"]


def test_tasks_config_worker_queues_are_parsed_strictly():
    import pytest

    from common.errors import InvalidOptions

    assert Settings.from_env({"NITROCONV_WORKER_QUEUES": " convert , convert"}).worker_queues == ("convert",)
    for bad in ("conversions", "convert,typo", ","):
        with pytest.raises(InvalidOptions, match="NITROCONV_WORKER_QUEUES"):
            Settings.from_env({"NITROCONV_WORKER_QUEUES": bad})


def test_tasks_worker_preloads_the_pipeline_before_forking():
    import subprocess
    import sys

    # A fresh interpreter: whether the worker_init handler imports every pipeline module.
    code = ("import sys; from worker import celery_app; celery_app._preload_pipeline(); "
            "print(all(m in sys.modules for m in ('worker.pipeline.convert', 'worker.pipeline.pull', "
            "'worker.pipeline.push', 'worker.pipeline.build')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_tasks_python_m_worker_is_the_worker_command_without_the_celery_group():
    import subprocess
    import sys

    # The deploy files' entry point: Celery's own `worker` command (its options), and none of the modules the
    # `celery` group imports for its other subcommands and plugins.
    out = subprocess.run([sys.executable, "-m", "worker", "--help"], capture_output=True, text=True, check=True)
    assert "--without-gossip" in out.stdout and "--concurrency" in out.stdout
    code = ("import sys; import worker.__main__; print(sorted(m for m in ('celery.bin.celery', 'prompt_toolkit', "
            "'flower', 'tornado', 'click_repl') if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
