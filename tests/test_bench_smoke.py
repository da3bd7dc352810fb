"""`make bench --quick` keeps working: every scenario runs and every goal gets its row.

It asserts that the benchmark runs and reports, never how fast anything is (the figures of a
tiny run on a shared machine mean nothing; `make bench` measures them).
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
GOALS = ["a1", "b1", "b2", "c1", "c2", "d1", "d2", "d3", "e1", "e2", "e3", "f1", "f2", "g1", "g2"]
SECTIONS = "abcdefg"
# Generous: a quick run takes 20-40 s alone, several times that on a busy machine.
TIMEOUT = 600


@pytest.mark.slow
def test_quick_bench_prints_every_goal_with_a_verdict() -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    report = done.stdout
    for letter in SECTIONS:
        assert re.search(rf"^### {letter}\. ", report, re.MULTILINE), f"section {letter} missing"
    rows = dict(re.findall(r"^\| ([a-h]\d?) \|.*\| (PASS|FAIL) \|$", report, re.MULTILINE))
    assert sorted(rows) == GOALS
