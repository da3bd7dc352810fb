"""bench/journal_bench.py runs (tiny sizes: this checks that it works, not how fast)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "journal_bench.py"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--records", "200", "--concurrency", "10", "--shards", "50"], "never sqlite"),
        (["--writer", "--records", "200", "--shards", "50", "--batch", "20"], "never log"),
        (["--compaction", "--shards", "2000"], "compaction of 2000 shards"),
    ],
)
def test_the_journal_bench_runs(tmp_path: Path, args: list[str], expected: str) -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), *args, "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert expected in done.stdout
