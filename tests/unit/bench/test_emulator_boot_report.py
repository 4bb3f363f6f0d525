"""bench/emulator_boot.py's table: pure, no emulator needed."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))  # the bench imports its helpers flat

from bench.emulator_boot import ImageBoot, report  # noqa: E402


def test_report_shows_each_image_and_what_the_check_adds() -> None:
    ok = ImageBoot("sample", eif_mib=12.4, convert_seconds=1.5, boot_seconds=9.25, exec_seconds=7.5,
                   convert_checked_seconds=11.0, ok=True, boot_cpu_seconds=6.25)
    failed = ImageBoot("realistic", error="boot check failed (boot_check_pcr_mismatch): PCRs differ")
    lines = report([ok, failed]).splitlines()
    assert ok.adds_seconds == 9.5
    assert lines[1].split() == ["sample", "12Mi", "9.25s", "6.25s", "7.50s", "1.50s", "11.00s", "+9.50s"]
    assert lines[2].split(None, 1) == ["realistic", "FAILED: boot check failed (boot_check_pcr_mismatch): PCRs differ"]
