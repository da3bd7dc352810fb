"""`make bench`: every performance goal of cpmgr, measured in one run on this machine, each
against a baseline measured in the same run, with PASS/FAIL per goal and a summary table.

    python bench/run.py [--quick] [--reps N] [--only LETTERS] [--budget S] [--tmp DIR]
                        [--output FILE]

Scenarios (one module each; docs/benchmarks.md says how to read them):
  a, g  ingest_bench.single_commit_lines   single-commit lines vs bare asyncio; the journal's cost
  b     ingest_bench.batch_lines           batch lines of 100 vs a bare server fed the same lines
  c     interval_bench.steady_rate         10k commits/s over 1,000 shards, interval 1 s
  d     commit_bench.backlog               10,000 dirty shards: daemon vs the official SDK
  e     stall_bench.stalls                 event-loop stalls at 100,000 shards
  f     memory_bench.memory                RSS at 100,000 shards, growth over 10 cycles
  l     lag_bench.scenario                 the cost of reading consumer lag (only with --only l)
  m     membership_bench.scenario          handoff time and heartbeat cost (only with --only m)

Every server under test runs in its own process (bench/server_proc.py), the clients in others
(bench/loadgen.py), the emulator and the SLS sink in others still, all on this machine. The
report (markdown) goes to stdout, progress to stderr. Exit status: 0 when every figure was
measured, whether its goal passed or failed; 1 if a run went wrong (an error answer, a lost or
wrong commit, a dead child), since its figures would mean nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Final

import commit_bench
import ingest_bench
import interval_bench
import lag_bench
import membership_bench
import memory_bench
import stall_bench
from harness import BenchError, Neighbours, load_average, machine_lines
from report import Goal, Section, Settings, goal_table

SCENARIOS: Final = "abcdefg"
# Run only when named with --only: not inside the default run's time budget (goal h) yet.
OPTIONAL: Final = "lm"
TIME_LIMIT: Final = 300.0  # `make bench` must finish within this (goal h)
DEFAULT_BUDGET: Final = TIME_LIMIT - 20
_REPORT_MARGIN: Final = 10.0  # kept free of scenario f's cycles for writing the report


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _noted(section: Section, neighbours: Neighbours) -> Section:
    """The section, plus how much of the machine other processes took while it ran."""
    note = f"\n\nOther processes used {neighbours.share():.0%} of the machine meanwhile."
    return Section(section.title, section.body + note, section.goals)


async def scenarios(settings: Settings, only: str, deadline: float) -> dict[str, Section]:
    """Run the chosen scenarios, memory last (it uses what is left of the time budget)."""
    found: dict[str, Section] = {}
    if "a" in only or "g" in only:
        progress("a, g: single-commit lines (daemon, bare servers, journal)")
        neighbours = Neighbours()
        a, g = await ingest_bench.single_commit_lines(settings, progress)
        found["a"], found["g"] = _noted(a, neighbours), _noted(g, neighbours)
    steps: list[tuple[str, str, Callable[[], Awaitable[Section]]]] = [
        ("b", "batch lines", lambda: ingest_bench.batch_lines(settings, progress)),
        ("c", "steady rate, interval 1 s", lambda: interval_bench.steady_rate(settings, progress)),
        ("d", "backlog to the emulator", lambda: commit_bench.backlog(settings, progress)),
        ("e", "loop stalls", lambda: stall_bench.stalls(settings, progress)),
        ("l", "consumer lag", lambda: lag_bench.scenario(settings, progress)),
        ("m", "membership", lambda: membership_bench.scenario(settings, progress)),
        (
            "f",
            "memory",
            lambda: memory_bench.memory(settings, progress, deadline=deadline),
        ),
    ]
    for letter, what, step in steps:
        if letter in only:
            progress(f"{letter}: {what}")
            neighbours = Neighbours()
            found[letter] = _noted(await step(), neighbours)
    return found


def _time_goal(seconds: float) -> Goal:
    return Goal(
        "h",
        "the whole `make bench` run (seconds)",
        f"{seconds:.0f}",
        f"< {TIME_LIMIT:.0f}",
        seconds < TIME_LIMIT,
    )


async def report(settings: Settings, only: str, budget: float) -> str:
    load_before = load_average()
    whole = Neighbours()
    started = time.monotonic()
    found = await scenarios(settings, only, started + budget - _REPORT_MARGIN)
    seconds = time.monotonic() - started
    sections = [found[letter] for letter in SCENARIOS + OPTIONAL if letter in found]
    goals = [goal for section in sections for goal in section.goals]
    if not settings.quick and only == SCENARIOS:
        goals.append(_time_goal(seconds))
    failed = sum(1 for goal in goals if not goal.passed)
    parts = [
        "## Results",
        "",
        f"- command: `{command_line()}` (`make bench` runs it without arguments)",
        *machine_lines(settings.temp_root),
        f"- load average (1/5/15 min) before: {load_before}, after: {load_average()}; other "
        f"processes used {whole.seconds():.0f} CPU-seconds during the run "
        f"({whole.share():.0%} of the machine)",
        f"- wall time: {seconds:.0f} s; throughput figures are medians of {settings.reps} "
        "interleaved repetitions",
        "",
        *[section.markdown() for section in sections],
        f"### Goals: {len(goals) - failed} of {len(goals)} met",
        "",
        goal_table(goals),
        "",
    ]
    return "\n".join(parts)


def command_line() -> str:
    return f"python bench/run.py {shlex.join(sys.argv[1:])}".strip()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check it works")
    parser.add_argument("--reps", type=int, default=3, help="repetitions of throughput runs")
    parser.add_argument(
        "--only", default=SCENARIOS, help=f"scenario letters to run ({SCENARIOS}, or {OPTIONAL})"
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds the run may take: scenario f stops its cycles to keep it (default: "
        f"{DEFAULT_BUDGET:g} for a whole run, none with --only)",
    )
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temp dir")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    if unknown := set(args.only) - set(SCENARIOS + OPTIONAL):
        parser.error(f"--only: unknown scenario(s) {''.join(sorted(unknown))}")
    return args


async def main() -> int:
    args = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="cpb", dir=args.tmp) as root:
        temp_root = Path(root)
        if args.quick:
            settings = Settings.tiny(temp_root)
        else:
            settings = Settings.full(temp_root, reps=args.reps)
        budget = args.budget
        if budget is None:
            budget = DEFAULT_BUDGET if args.only == SCENARIOS else float("inf")
        try:
            text = await report(settings, args.only, budget)
        except BenchError as exc:
            progress(f"benchmark failed: {exc}")
            return 1
    print(text)
    if args.output is not None:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(asyncio.run(main()))
    except KeyboardInterrupt:
        # Children and temp dirs are already gone: the context managers ran on the way out.
        raise SystemExit(130) from None
