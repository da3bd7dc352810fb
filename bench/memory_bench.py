"""Scenario f: the daemon's resident memory with 100,000 shards tracked and committed, and
whether it grows over 10 cycles of 100,000.

A fresh daemon process (no journal, so only the daemon's own memory counts) is given a new value
for every shard, then a `flush` commits them all to bench/sink.py; that is one cycle. RSS is read
from /proc (the daemon's process and any child it runs) after each step. The cycles stop early
when the run's time budget is spent: the growth goal then fails and says how many cycles fit
(`python bench/run.py --only f` runs it alone, with time for all of them).

Growth is counted from the end of the second cycle: the first is the warm-up. Before it no
shard has a committed value, so no shard ever holds a committed value and a newer pending one
at once, as every shard does in every later cycle (the steady state); the allocator keeps the
memory of that first steady-state peak (docs/benchmarks.md, "Why growth counts from the second
cycle").
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from harness import BenchError, table
from ingest_bench import run_dir
from report import Goal, Section, Settings, at_most
from stall_bench import check_committed, sink_state
from targets import daemon_config, feed_shape, running_daemon, sink_process

MB: Final = 1e6
RSS_LIMIT: Final = 150 * MB
# Allocator noise between two identical cycles; a leak of even 100 B per shard and cycle
# (10 MB at 100,000 shards) shows above it.
GROWTH_LIMIT: Final = 5 * MB
# Cycles before the steady state: growth is counted from the end of the next one.
WARMUP_CYCLES: Final = 1


@dataclass(frozen=True)
class Cycle:
    tracked: int  # RSS with every shard's new value pending
    committed: int  # RSS once the flush committed them all
    seconds: float


async def cycles(
    settings: Settings, deadline: float, progress: Callable[[str], None]
) -> tuple[int, int, list[Cycle]]:
    """RSS at start, peak RSS, and each cycle's figures."""
    shards = settings.big_shards
    done: list[Cycle] = []
    with run_dir(settings.temp_root) as directory:
        async with sink_process(directory / "sink.log") as sink:
            config = daemon_config(directory / "s", endpoint=sink.url)
            async with running_daemon(directory, config) as server:
                idle = server.rss_bytes()
                while len(done) < settings.memory_cycles and (
                    not done or time.monotonic() < deadline
                ):
                    started = time.monotonic()
                    calls = (await sink_state(sink))["calls"]
                    await server.load(feed_shape(shards, len(done)))
                    tracked = server.rss_bytes()
                    if await server.flush(timeout=900) != shards:
                        raise BenchError("a flush did not commit every shard")
                    await check_committed(sink, calls, shards, len(done))
                    done.append(Cycle(tracked, server.rss_bytes(), time.monotonic() - started))
                    progress(f"  cycle {len(done)}: RSS {done[-1].committed / MB:.0f} MB")
                peak = server.peak_rss_bytes()
                await server.stop()
    return idle, peak, done


async def memory(
    settings: Settings, progress: Callable[[str], None], *, deadline: float
) -> Section:
    idle, peak, done = await cycles(settings, deadline, progress)
    n = f"{settings.big_shards:,}"
    rows = [
        [str(i), f"{c.tracked / MB:.1f}", f"{c.committed / MB:.1f}", f"{c.seconds:.1f}"]
        for i, c in enumerate(done, 1)
    ]
    body = table(["cycle", f"RSS MB, {n} pending", "RSS MB, all committed", "seconds"], rows)
    body += (
        f"\n\nRSS of the idle daemon before the first cycle: {idle / MB:.1f} MB; "
        f"peak (VmHWM) over the run: {peak / MB:.1f} MB."
    )
    first = done[min(WARMUP_CYCLES, len(done) - 1)]  # the end of the first steady cycle
    growth = done[-1].committed - first.committed  # 0 while no later cycle ran
    complete = len(done) >= settings.memory_cycles
    goals: tuple[Goal, ...] = (
        at_most(
            "f1",
            f"RSS MB with {n} shards tracked and committed (max)",
            max(c.committed for c in done) / MB,
            RSS_LIMIT / MB,
            ".1f",
        ),
        Goal(
            "f2",
            f"RSS growth over {settings.memory_cycles} cycles of {n} (from the end of cycle "
            f"{WARMUP_CYCLES + 1}: cycle 1 is the warm-up)",
            f"{growth / MB:+.1f} MB over {len(done)} cycles"
            + ("" if complete else " (time budget spent)"),
            f"<= {GROWTH_LIMIT / MB:.0f} MB over {settings.memory_cycles}",
            complete and growth <= GROWTH_LIMIT,
        ),
    )
    return Section(f"f. Memory with {n} shards (a fresh daemon process)", body, goals)
