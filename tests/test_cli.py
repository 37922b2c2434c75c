"""The stage command's own bookkeeping (`.deepzoo/stages.jsonl`, read by `make bench`)."""

from __future__ import annotations

import subprocess
import sys

from deepzoo import cli


def test_a_stage_reports_its_own_peak_memory_not_that_of_the_process_that_started_it():
    held = b"x" * (400 * 2**20)  # written, so resident: the launcher's peak, as `dvc repro` holds its own
    report = "from deepzoo import cli; print(cli.peak_rss_kib())"
    child_kib = int(subprocess.run([sys.executable, "-c", report], capture_output=True, text=True, check=True).stdout)
    assert cli.peak_rss_kib() > len(held) // 1024
    assert child_kib < 200 * 1024  # Python, pydantic and deepzoo's config; ru_maxrss would have said ≥ 400 MB
