"""What every scenario hands back: its section of the report and its goal rows (PASS/FAIL).

A goal compares a figure measured in this run with its target, mostly as a ratio
against a baseline measured in the same run, so a slow or busy machine moves both sides.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness import table


@dataclass(frozen=True)
class Settings:
    """The sizes of one run: `make bench` (full) or `--quick` (tiny, to check it works)."""

    quick: bool
    reps: int  # interleaved repetitions of each throughput run
    temp_root: Path
    ingest_lines: int  # single-commit lines per client and run
    batch_lines: int  # batch lines per client and run
    run_seconds: float  # cap on each throughput run
    rate: float  # commits/s, all clients together (scenario c)
    rate_shards: int  # shards they spread over
    rate_seconds: float
    commit_shards: int  # dirty shards committed to the emulator (scenario d)
    sdk_seconds: float  # how long the official SDK's loop runs
    big_shards: int  # shards of the stall and memory scenarios
    memory_cycles: int

    @classmethod
    def full(cls, temp_root: Path, reps: int = 3) -> Settings:
        return cls(
            quick=False,
            reps=reps,
            temp_root=temp_root,
            ingest_lines=25_000,
            batch_lines=400,
            run_seconds=3.0,
            rate=10_000,
            rate_shards=1_000,
            rate_seconds=6.0,
            commit_shards=10_000,
            sdk_seconds=3.0,
            big_shards=100_000,
            memory_cycles=10,
        )

    @classmethod
    def tiny(cls, temp_root: Path) -> Settings:
        return cls(
            quick=True,
            reps=1,
            temp_root=temp_root,
            ingest_lines=1_000,
            batch_lines=20,
            run_seconds=1.0,
            rate=1_000,
            rate_shards=100,
            rate_seconds=2.0,
            commit_shards=100,
            sdk_seconds=0.3,
            big_shards=1_000,
            memory_cycles=2,
        )


@dataclass(frozen=True)
class Goal:
    """One "Done when" point: what was measured, the target, and whether it was met."""

    key: str
    what: str
    measured: str
    target: str
    passed: bool

    @property
    def verdict(self) -> str:
        return "PASS" if self.passed else "FAIL"


def at_least(key: str, what: str, value: float, target: float, fmt: str = ".2f") -> Goal:
    return Goal(key, what, f"{value:{fmt}}", f">= {target:{fmt}}", value >= target)


def at_most(key: str, what: str, value: float, target: float, fmt: str = ".2f") -> Goal:
    return Goal(key, what, f"{value:{fmt}}", f"<= {target:{fmt}}", value <= target)


@dataclass(frozen=True)
class Section:
    """A scenario's part of the report: a title, its tables and notes, its goals."""

    title: str
    body: str
    goals: tuple[Goal, ...] = field(default_factory=tuple)

    def markdown(self) -> str:
        return f"### {self.title}\n\n{self.body}\n"


def goal_table(goals: Sequence[Goal]) -> str:
    rows = [[g.key, g.what, g.measured, g.target, g.verdict] for g in goals]
    return table(["goal", "what", "measured", "target", "verdict"], rows, left=5)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f}"
