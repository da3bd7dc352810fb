"""Scenario c: a steady 10k commits/s over 1,000 shards into a daemon committing every second to
the emulator process. Does every due shard get committed every interval, and how slow do the
answers get while the committer works, next to a bare asyncio streams server at the same rate?

The clients run open loop (bench/loadgen.py `--rate`): line n of a client is due at n / rate
seconds and its answer's latency counts from then. Every line carries a cursor that names its
line number, so each value in the emulator's per-shard history tells when the daemon accepted
it (when its answer arrived); the gap between the acceptance of two consecutive committed values
of a shard is about the time between the two snapshots that committed them. A shard that
missed an interval shows a gap of about two intervals.
"""

from __future__ import annotations

import base64
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

from harness import BenchError, ClientResult, Load, LoadShape, median, percentile, table
from ingest_bench import run_dir
from loadgen import CURSOR_BASE
from report import Goal, Section, Settings, at_most, ms
from targets import (
    daemon_config,
    emulator_process,
    emulator_state,
    running_bare,
    running_daemon,
    sample,
    scrape,
    shard_key,
    update_calls,
)

CLIENTS: Final = 4
INTERVAL: Final = 1.0
# A gap this long means a snapshot came late: one missed interval would show about 2 x INTERVAL.
GAP_LIMIT: Final = 1.5 * INTERVAL


def _line_number(checkpoint: str) -> int:
    return int(base64.b64decode(checkpoint)) - CURSOR_BASE


def commit_gaps(state: dict[str, Any], load: Load, per_client: int, rate: float) -> list[float]:
    """Per shard, the longest time between the acceptance of two consecutive committed values
    (the first counted from the load's start); inf for a shard never committed. A value was
    accepted when its answer left the daemon, which its client saw at due time + latency."""
    history: dict[str, list[str]] = state["history"]
    begin = min(client.start for client in load.clients)
    worst = []
    for client in load.clients:

        def accepted(n: int, client: ClientResult = client) -> float:
            return client.start + n / rate + client.latencies[n] - begin

        for shard in range(client.index * per_client, (client.index + 1) * per_client):
            values = history.get(shard_key(shard), [])
            times = [0.0] + [accepted(_line_number(value)) for value in values]
            gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
            worst.append(max(gaps) if gaps else float("inf"))
    return worst


def _shape(settings: Settings) -> LoadShape:
    per_client_rate = settings.rate / CLIENTS
    return LoadShape(
        clients=CLIENTS,
        lines=int(per_client_rate * settings.rate_seconds) + 1,
        shards=settings.rate_shards // CLIENTS,
        rate=per_client_rate,
        duration=settings.rate_seconds,
    )


@dataclass(frozen=True)
class DaemonRun:
    """One run of the load against a committing daemon, with what the emulator and the
    daemon's /metrics and lag probe said of it."""

    load: Load
    gaps: list[float]
    calls: int
    lag: dict[str, float]
    metrics: str


async def _daemon_run(settings: Settings, shape: LoadShape) -> DaemonRun:
    with run_dir(settings.temp_root) as directory:
        async with emulator_process(
            directory / "emulator.log", shards={"ls": settings.rate_shards}
        ) as emulator:
            config = daemon_config(
                directory / "s", endpoint=emulator.url, interval=f"{INTERVAL:g}s"
            )
            async with running_daemon(directory, config) as daemon:
                await daemon.lag_start()
                load = await daemon.load(shape)
                lag = await daemon.lag_stop()
                state = await emulator_state(emulator.url)
                assert daemon.http is not None
                metrics = await scrape(daemon.http)
                await daemon.stop()
    calls = update_calls(state)
    if update_calls(state, "OK") != calls:
        raise BenchError(f"the emulator answered errors: {state['requests']}")
    gaps = commit_gaps(state, load, shape.shards, shape.rate or 1.0)
    return DaemonRun(load, gaps, calls, lag, metrics)


async def _bare_run(settings: Settings, shape: LoadShape) -> Load:
    with run_dir(settings.temp_root) as directory:
        async with running_bare(directory, "streams") as bare:
            load = await bare.load(shape)
            await bare.stop()
    return load


def p99(load: Load) -> float:
    return percentile(load.latencies, 99)


async def steady_rate(settings: Settings, progress: Callable[[str], None]) -> Section:
    """`settings.reps` interleaved runs of the daemon and the bare server: a p99 of one 6 s run
    moves with the machine (the bare server's from 0.5 to 1.7 ms between runs), so c2 compares
    the medians of the runs' p99s, as a and b compare the medians of their rates."""
    shape = _shape(settings)
    runs: list[DaemonRun] = []
    bare: list[Load] = []
    for rep in range(settings.reps):
        run = await _daemon_run(settings, shape)
        runs.append(run)
        progress(
            f"  rep {rep + 1}: daemon: {run.load.rate:,.0f} commits/s, p99 {ms(p99(run.load))} ms"
        )
        bare.append(await _bare_run(settings, shape))
        progress(f"  rep {rep + 1}: streams: p99 {ms(p99(bare[-1]))} ms")
    return _section(settings, shape=shape, runs=runs, streams=bare)


def _latency_row(name: str, loads: list[Load]) -> list[str]:
    return [
        name,
        f"{median([load.rate for load in loads]):,.0f}",
        ms(median([percentile(load.latencies, 50) for load in loads])),
        ms(median([p99(load) for load in loads])),
        " / ".join(ms(p99(load)) for load in loads),
        ms(max(max(load.latencies) for load in loads)),
    ]


def _run_summary(rep: int, run: DaemonRun) -> str:
    """Run `rep`: the UpdateCheckPoint calls for the commits received (coalescing), the timer
    cycles and their mean duration from /metrics, the daemon's loop lag meanwhile."""
    cycles = sample(run.metrics, "cpmgr_commit_cycle_duration_seconds_count") or 0.0
    cycle_sum = sample(run.metrics, "cpmgr_commit_cycle_duration_seconds_sum") or 0.0
    ok = run.load.ok
    return (
        f"Run {rep}: {run.calls:,} UpdateCheckPoint calls for {ok:,} commits "
        f"({ok / max(1, run.calls):.1f} commits per call); {cycles:.0f} timer cycles, mean "
        f"{cycle_sum / max(1.0, cycles):.2f} s; loop lag p99 {ms(run.lag['p99'])} ms, max "
        f"{ms(run.lag['max'])} ms."
    )


def _section(
    settings: Settings, *, shape: LoadShape, runs: list[DaemonRun], streams: list[Load]
) -> Section:
    gaps = [max(shard) for shard in zip(*(run.gaps for run in runs), strict=True)]
    late = sum(1 for gap in gaps if gap > GAP_LIMIT)
    loads = [run.load for run in runs]
    rows = [
        _latency_row("cpmgr daemon, committing every 1 s", loads),
        _latency_row("bare asyncio streams", streams),
    ]
    header = ["server", "answers/s", "p50 ms", "p99 ms (median)", "p99 ms of each run", "max ms"]
    body = table(header, rows)
    body += "\n\n" + " ".join(_run_summary(rep, run) for rep, run in enumerate(runs, 1))
    body += (
        f" Longest gap between two committed values of one shard over the {len(runs)} runs: "
        f"{max(gaps):.2f} s (median shard {sorted(gaps)[len(gaps) // 2]:.2f} s); {late} of "
        f"{len(gaps)} shards had a gap over {GAP_LIMIT:g} s in some run."
    )
    ratio = median([p99(load) for load in loads]) / median([p99(load) for load in streams])
    goals: tuple[Goal, ...] = (
        Goal(
            "c1",
            "every due shard committed every interval",
            f"0 of {len(gaps)} shards late (max gap {max(gaps):.2f} s)"
            if not late
            else f"{late} of {len(gaps)} shards late (max gap {max(gaps):.2f} s)",
            f"0 (gaps <= {GAP_LIMIT:g} s)",
            late == 0,
        ),
        at_most(
            "c2", "answer p99 vs bare streams at the same rate (medians of the runs)", ratio, 3.0
        ),
    )
    title = (
        f"c. {settings.rate:,.0f} commits/s over {settings.rate_shards:,} shards for "
        f"{settings.rate_seconds:g} s, interval 1 s, emulator process ({shape.clients} clients, "
        f"open loop; {len(runs)} interleaved runs)"
    )
    return Section(title, body, goals)
