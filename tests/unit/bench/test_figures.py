"""The bench's verdicts, table and server timeline: pure code, no service needed."""
from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

from bench._figures import Figure, as_json, median, ratio, table
from bench._timeline import describe, durations


def test_targets_are_inclusive_in_their_direction() -> None:
    assert Figure(1, "ratio", 0.5, "×", 0.5, "at most").verdict == "met"
    assert Figure(1, "ratio", 0.51, "×", 0.5, "at most").verdict == "not met"
    assert Figure(5, "speed-up", 1.7, "×", 1.7, "at least").verdict == "met"
    assert Figure(5, "speed-up", 1.69, "×", 1.7, "at least").verdict == "not met"


def test_unmeasured_figures_are_not_verdicts_and_mark_the_run() -> None:
    failed = Figure(3, "rss", None, "MiB", 300, "at most", error="build x FAILED")
    nan = Figure(1, "ratio", float("nan"), "×", 0.5, "at most")
    skipped = Figure(3, "rss", None, "MiB", 300, "at most", skipped=True)
    assert (failed.verdict, failed.met, failed.measured) == ("n/a", None, False)
    assert (nan.verdict, nan.measured) == ("n/a", False)
    assert (skipped.verdict, skipped.measured) == ("skipped", True)
    assert Figure(1, "ratio", 2.0, "×", 0.5, "at most").measured  # a miss is still a measured figure


def test_table_lists_every_figure_with_its_target_and_notes() -> None:
    text = table([Figure(2, "again", 0.4, "s", 1.0, "at most", detail="reused_from b1"),
                  Figure(3, "rss", 412.4, "MiB", 300, "at most"),
                  Figure(5, "scale", None, "×", 1.7, "at least", error="build y FAILED")])
    lines = text.splitlines()
    assert lines[0].split() == ["#", "figure", "value", "target", "verdict"]
    assert "0.40 s" in lines[2] and "≤ 1.00 s" in lines[2] and lines[2].endswith("met")
    assert "412 MiB" in lines[3] and "≤ 300 MiB" in lines[3] and lines[3].endswith("not met")
    assert "≥ 1.70×" in lines[4] and lines[4].endswith("n/a")
    assert "  2: reused_from b1" in lines and "  5: error: build y FAILED" in lines


def test_json_carries_the_verdict() -> None:
    [row] = as_json([Figure(1, "ratio", 0.4, "×", 0.5, "at most")])
    assert (row["value"], row["target"], row["met"], row["verdict"]) == (0.4, 0.5, True, "met")


def test_ratio_and_median_refuse_missing_values() -> None:
    assert ratio(3.0, 2.0) == 1.5
    assert math.isnan(ratio(3.0, 0.0)) and math.isnan(ratio(float("nan"), 2.0))
    assert median([3.0, 1.0, 2.0]) == 2.0 and math.isnan(median([]))


def test_durations_follow_the_transitions_from_creation() -> None:
    t0 = datetime(2026, 1, 1, tzinfo=UTC)
    spans = durations(t0, [("PULLING", t0 + timedelta(seconds=0.5)), ("BUILDING", t0 + timedelta(seconds=3)),
                           ("SUCCEEDED", t0 + timedelta(seconds=4.25))])
    assert spans == [("QUEUED", 0.5), ("PULLING", 2.5), ("BUILDING", 1.25)]
    assert describe(spans) == "queued 0.50, pulling 2.50, building 1.25"
    assert durations(t0, []) == []
