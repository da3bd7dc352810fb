"""Scenario e: how long the daemon's event loop stalls during the heavy moments of a large
deployment: a commit cycle of 100,000 dirty shards, a /metrics scrape with `shard_metrics` at
100,000 shards, and journal compaction at 100,000 shards.

The lag probe (bench/lagprobe.py) runs inside the daemon's process: a task that sleeps 1 ms in
a loop and records how late it wakes, which is how long every other task (a consumer's answer,
/healthz) would have waited. The commits go to bench/sink.py, so the cycle costs the daemon
what it costs and the SLS side almost nothing. The journal compacts once its log has grown by a
few MiB and beyond its last snapshot; more rounds of 100,000 new values are written, while every
shard is tracked, until the journal's files show a rewrite (at most 4 rounds).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from harness import BenchError, table
from ingest_bench import run_dir
from report import Goal, Section, Settings, ms
from targets import (
    Remote,
    Server,
    daemon_config,
    fed_values,
    feed_shape,
    get_json,
    running_daemon,
    scrape,
    sink_process,
)

P999_LIMIT: Final = 0.020
MAX_LIMIT: Final = 0.100
# The journal compacts once its log outgrows the last snapshot: at 100,000 shards one round of
# new values may fall just short, so rounds go on until a file was rewritten (or this many).
JOURNAL_ROUNDS: Final = 4

Lag = dict[str, float]


async def sink_state(sink: Remote) -> dict[str, Any]:
    return await get_json(f"{sink.url}/_sink/state")


async def check_committed(sink: Remote, calls_before: int, shards: int, round_number: int) -> int:
    """BenchError unless the sink now holds round `round_number`'s value on every shard."""
    state = await sink_state(sink)
    if state["values"] != fed_values(shards, round_number):
        raise BenchError(f"the sink does not hold round {round_number}'s value on every shard")
    calls: int = state["calls"] - calls_before
    return calls


def files_of(directory: Path) -> dict[str, int]:
    """File name -> inode: a file rewritten and renamed into place gets a new inode."""
    return {path.name: path.stat().st_ino for path in directory.iterdir()}


def rewritten(before: dict[str, int], after: dict[str, int]) -> list[str]:
    return sorted(name for name, inode in after.items() if before.get(name) != inode)


async def phases(server: Server, sink: Remote, shards: int, state_dir: Path) -> dict[str, Any]:
    """Run the phases, each inside its own lag window; what each measured."""
    found: dict[str, Any] = {}
    await server.lag_start()
    await server.load(feed_shape(shards, 0))
    found["ingest"] = await server.lag_stop()
    calls = (await sink_state(sink))["calls"]
    await server.lag_start()
    started = time.monotonic()
    committed = await server.flush(timeout=900)
    found["cycle_seconds"] = time.monotonic() - started
    found["cycle"] = await server.lag_stop()
    found["calls"] = await check_committed(sink, calls, shards, 0)
    if committed != shards:
        raise BenchError(f"flush committed {committed} of {shards}")
    assert server.http is not None
    await server.lag_start()
    started = time.monotonic()
    text = await scrape(server.http)
    found["scrape_seconds"] = time.monotonic() - started
    found["scrape"] = await server.lag_stop()
    found["scrape_bytes"] = len(text)
    before = files_of(state_dir)
    await server.lag_start()
    for round_number in range(1, JOURNAL_ROUNDS + 1):
        await server.load(feed_shape(shards, round_number))
        found["journal_rounds"] = round_number
        found["rewritten"] = rewritten(before, files_of(state_dir))
        if found["rewritten"]:
            break
    found["journal"] = await server.lag_stop()
    return found


def _verdict(key: str, what: str, lag: Lag) -> Goal:
    measured = f"p99.9 {ms(lag['p999'])} ms, max {ms(lag['max'])} ms"
    target = f"p99.9 <= {ms(P999_LIMIT)}, max <= {ms(MAX_LIMIT)}"
    passed = lag["p999"] <= P999_LIMIT and lag["max"] <= MAX_LIMIT
    return Goal(key, what, measured, target, passed)


def _row(what: str, lag: Lag) -> list[str]:
    cells = [ms(lag[key]) for key in ("p50", "p99", "p999", "max")]
    return [what, f"{lag['seconds']:.1f}", f"{lag['samples']:,.0f}", *cells]


async def stalls(settings: Settings, progress: Callable[[str], None]) -> Section:
    shards = settings.big_shards
    with run_dir(settings.temp_root) as directory:
        async with sink_process(directory / "sink.log") as sink:
            state_dir = directory / "state"
            config = daemon_config(
                directory / "s", endpoint=sink.url, state_dir=state_dir, shard_metrics=True
            )
            async with running_daemon(directory, config) as server:
                found = await phases(server, sink, shards, state_dir)
                # No stop(): the last round is journaled and stays pending; a drain of it is
                # not what this measures. Leaving the block terminates the process.
    progress(f"  cycle of {shards:,}: {found['cycle_seconds']:.1f} s")
    n = f"{shards:,}"
    compaction = f"journal at {n} shards ({', '.join(found['rewritten']) or 'no file'} rewritten)"
    cycle = found["cycle"]
    rows = [
        _row(f"making {n} shards dirty (batch lines of 100, journal on)", found["ingest"]),
        _row(
            f"commit cycle of {n} dirty shards (`flush`, {found['calls']:,} calls)", found["cycle"]
        ),
        _row(
            f"/metrics with shard_metrics at {n} shards ({found['scrape_bytes'] / 1e6:.1f} MB, "
            f"{found['scrape_seconds']:.2f} s)",
            found["scrape"],
        ),
        _row(
            f"{found['journal_rounds'] * shards:,} more values into the {compaction}",
            found["journal"],
        ),
    ]
    body = table(["during", "seconds", "samples", "p50 ms", "p99 ms", "p99.9 ms", "max ms"], rows)
    goals = (
        _verdict("e1", f"loop stalls: commit cycle of {n} shards", cycle),
        _verdict("e2", f"loop stalls: shard_metrics scrape at {n} shards", found["scrape"]),
        _verdict("e3", f"loop stalls: journal compaction at {n} shards", found["journal"]),
    )
    return Section(f"e. Event-loop stalls at {n} shards (lag probe in the daemon)", body, goals)
