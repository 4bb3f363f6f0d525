"""The step timer that feeds `nitroconv_conversion_step_seconds` (a fake clock, no exporter)."""
from __future__ import annotations

from worker import metrics


def test_metrics_step_timer_attributes_time_to_each_step(monkeypatch):
    observed: list[tuple[str, float]] = []
    monkeypatch.setattr(metrics, "observe_step", lambda step, seconds: observed.append((step, seconds)))
    now = [100.0]
    forwarded: list[tuple[str, float]] = []
    timer = metrics.StepTimer(lambda stage, progress: forwarded.append((stage, progress)), clock=lambda: now[0])
    timer("PULLING", 0.0)
    now[0] += 3
    timer("PULLING", 0.2)  # progress within a step is not a new step
    now[0] += 1
    timer("BUILDING", 0.5)
    now[0] += 2.5
    timer.finish()
    timer.finish()  # idempotent
    assert observed == [("PULLING", 4.0), ("BUILDING", 2.5)]
    assert forwarded == [("PULLING", 0.0), ("PULLING", 0.2), ("BUILDING", 0.5)]


def test_metrics_metered_engine_times_even_a_failing_engine(monkeypatch):
    observed: list[str] = []
    monkeypatch.setattr(metrics, "observe_step", lambda step, seconds: observed.append(step))

    def engine(*, on_stage, should_cancel):  # noqa: ANN001, ANN202
        on_stage("PULLING", 0.1)
        raise RuntimeError("registry down")

    try:
        metrics.MeteredEngine(engine)(on_stage=lambda *_: None, should_cancel=lambda: False)
    except RuntimeError:
        pass
    assert observed == ["PULLING"]
