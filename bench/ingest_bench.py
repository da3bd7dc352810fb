"""Scenarios a, b and g: ingest throughput of the daemon against the bare asyncio servers of
bench/baseline.py, for single-commit lines and for batch lines of 100, and what the journal
costs. Every server runs alone in its own process (bench/server_proc.py), started fresh for
each run; the targets of one comparison run once per repetition, interleaved, so a
disturbance of the machine hits all of them alike."""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Iterator
from contextlib import AbstractAsyncContextManager, contextmanager
from pathlib import Path
from typing import Final

from harness import BenchError, Load, LoadShape, median, spread, table
from report import Goal, Section, Settings, at_least
from targets import Server, daemon_config, running_bare, running_daemon, sample, scrape

Starter = Callable[[Path], AbstractAsyncContextManager[Server]]

CLIENTS: Final = 4
SINGLE_SHARDS: Final = 16  # per client
BATCH: Final = 100
BATCH_SHARDS: Final = 1_000  # per client
DAEMON: Final = "cpmgr daemon (no journal)"
STREAMS: Final = "bare asyncio streams"
PROTOCOL: Final = "bare asyncio Protocol"
NEVER: Final = "cpmgr daemon, fsync: never"
ALWAYS: Final = "cpmgr daemon, fsync: always"


def daemon(fsync: str | None = None) -> Starter:
    """The daemon with an idle committer; with a journal in `fsync` mode unless None."""

    def start(run_dir: Path) -> AbstractAsyncContextManager[Server]:
        state = run_dir / "state" if fsync else None
        config = daemon_config(run_dir / "s", state_dir=state, fsync=fsync or "batch")
        return running_daemon(run_dir, config)

    return start


def bare(kind: str) -> Starter:
    return lambda run_dir: running_bare(run_dir, kind)


@contextmanager
def run_dir(root: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="r", dir=root) as name:
        yield Path(name)


async def measure(start: Starter, shape: LoadShape, settings: Settings) -> Load:
    """One run against a fresh server; checks the daemon counted every checkpoint. The server
    is not drained afterwards (leaving the block terminates it): its committer has nowhere to
    send what it holds, and a drain would only cost time."""
    with run_dir(settings.temp_root) as directory:
        async with start(directory) as server:
            load = await server.load(shape)
            if server.http is not None:
                text = await scrape(server.http)
                received = sample(text, 'cpmgr_checkpoints_received_total{group="bench"}')
                if received != load.checkpoints:
                    raise BenchError(f"the daemon counted {received} of {load.checkpoints}")
    return load


Progress = Callable[[str], None]


async def compare(
    targets: dict[str, Starter], shape: LoadShape, settings: Settings, progress: Progress
) -> dict[str, list[Load]]:
    runs: dict[str, list[Load]] = {name: [] for name in targets}
    for rep in range(settings.reps):
        for name, start in targets.items():
            load = await measure(start, shape, settings)
            runs[name].append(load)
            progress(f"  rep {rep + 1}: {name}: {load.checkpoint_rate:,.0f} checkpoints/s")
    return runs


def rate(loads: list[Load]) -> float:
    """Median checkpoints/s of the repetitions."""
    return median([load.checkpoint_rate for load in loads])


def rate_table(runs: dict[str, list[Load]], reference: str) -> str:
    ref = rate(runs[reference])
    header = ["server", "checkpoints/s (median)", "min-max", f"vs {reference}"]
    header += ["server CPU µs/line", "lines/run"]
    rows = [
        [
            name,
            f"{rate(loads):,.0f}",
            spread([load.checkpoint_rate for load in loads]),
            f"{rate(loads) / ref:.2f}",
            f"{median([load.cpu_us_per_line for load in loads]):.1f}",
            f"{median([float(load.ok) for load in loads]):,.0f}",
        ]
        for name, loads in runs.items()
    ]
    return table(header, rows)


async def single_commit_lines(settings: Settings, progress: Progress) -> tuple[Section, Section]:
    """Scenarios a and g share their runs: the daemon without a journal is the reference of g
    and the subject of a."""
    shape = LoadShape(
        clients=CLIENTS,
        lines=settings.ingest_lines,
        shards=SINGLE_SHARDS,
        duration=settings.run_seconds,
    )
    targets = {
        DAEMON: daemon(),
        STREAMS: bare("streams"),
        PROTOCOL: bare("protocol"),
        NEVER: daemon("never"),
        ALWAYS: daemon("always"),
    }
    runs = await compare(targets, shape, settings, progress)
    ingest = {name: runs[name] for name in (DAEMON, STREAMS, PROTOCOL)}
    journal = {name: runs[name] for name in (DAEMON, NEVER, ALWAYS)}
    none = rate(runs[DAEMON])
    a = Section(
        f"a. Single-commit lines: {CLIENTS} clients, windows of {shape.window}, "
        f"{CLIENTS * SINGLE_SHARDS} shards",
        rate_table(ingest, STREAMS),
        (at_least("a1", "single-commit ingest vs bare streams", none / rate(runs[STREAMS]), 1.0),),
    )
    g = Section(
        "g. The journal's cost, same load (`state.fsync`)",
        rate_table(journal, DAEMON),
        (
            at_least("g1", "`fsync: always` vs no journal", rate(runs[ALWAYS]) / none, 0.7),
            at_least("g2", "`fsync: never` vs no journal", rate(runs[NEVER]) / none, 0.85),
        ),
    )
    return a, g


async def batch_lines(settings: Settings, progress: Progress) -> Section:
    shape = LoadShape(
        clients=CLIENTS,
        lines=settings.batch_lines,
        shards=BATCH_SHARDS,
        batch=BATCH,
        window=16,
        duration=settings.run_seconds,
    )
    runs = await compare({DAEMON: daemon(), STREAMS: bare("streams")}, shape, settings, progress)
    daemon_rate, streams_rate = rate(runs[DAEMON]), rate(runs[STREAMS])
    goals: tuple[Goal, ...] = (
        at_least("b1", "batch lines: daemon checkpoints/s", daemon_rate, 300_000, ",.0f"),
        at_least("b2", "batch lines: daemon vs bare streams", daemon_rate / streams_rate, 0.3),
    )
    return Section(
        f"b. Batch lines of {BATCH} checkpoints: {CLIENTS} clients, windows of {shape.window} "
        f"lines, {CLIENTS * BATCH_SHARDS:,} shards",
        rate_table(runs, STREAMS),
        goals,
    )
