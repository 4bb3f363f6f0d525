"""Celery configuration derived from Settings (DESIGN.md §7, RELIABILITY.md §3); no broker needed."""
from __future__ import annotations

from common.settings import Settings
from common.tasknames import CONVERT, SWEEP
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
