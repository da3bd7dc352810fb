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
from typing import Any, Final

from harness import BenchError, ClientResult, Load, LoadShape, percentile, table
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


def _latency_row(name: str, load: Load) -> list[str]:
    latencies = load.latencies
    return [
        name,
        f"{load.rate:,.0f}",
        ms(percentile(latencies, 50)),
        ms(percentile(latencies, 99)),
        ms(max(latencies)),
    ]


async def steady_rate(settings: Settings, progress: Callable[[str], None]) -> Section:
    shape = _shape(settings)
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
    progress(f"  daemon: {load.rate:,.0f} commits/s, p99 {ms(percentile(load.latencies, 99))} ms")
    with run_dir(settings.temp_root) as directory:
        async with running_bare(directory, "streams") as bare:
            streams = await bare.load(shape)
            await bare.stop()
    progress(f"  streams: p99 {ms(percentile(streams.latencies, 99))} ms")
    gaps = commit_gaps(state, load, shape.shards, shape.rate or 1.0)
    calls = update_calls(state)
    if update_calls(state, "OK") != calls:
        raise BenchError(f"the emulator answered errors: {state['requests']}")
    return _section(
        settings,
        shape=shape,
        load=load,
        streams=streams,
        gaps=gaps,
        calls=calls,
        lag=lag,
        metrics=metrics,
    )


def _section(
    settings: Settings,
    *,
    shape: LoadShape,
    load: Load,
    streams: Load,
    gaps: list[float],
    calls: int,
    lag: dict[str, float],
    metrics: str,
) -> Section:
    late = sum(1 for gap in gaps if gap > GAP_LIMIT)
    cycles = sample(metrics, "cpmgr_commit_cycle_duration_seconds_count") or 0.0
    cycle_sum = sample(metrics, "cpmgr_commit_cycle_duration_seconds_sum") or 0.0
    rows = [
        _latency_row("cpmgr daemon, committing every 1 s", load),
        _latency_row("bare asyncio streams", streams),
    ]
    body = table(["server", "answers/s", "p50 ms", "p99 ms", "max ms"], rows)
    body += (
        f"\n\nCommitted: {calls:,} UpdateCheckPoint calls for {load.ok:,} commits "
        f"({load.ok / max(1, calls):.1f} commits per call); {cycles:.0f} timer cycles, "
        f"mean {cycle_sum / max(1.0, cycles):.2f} s. Longest gap between two committed values "
        f"of one shard: {max(gaps):.2f} s (median shard {sorted(gaps)[len(gaps) // 2]:.2f} s); "
        f"{late} of {len(gaps)} shards had a gap over {GAP_LIMIT:g} s. The daemon's loop lag "
        f"meanwhile: p99 {ms(lag['p99'])} ms, max {ms(lag['max'])} ms."
    )
    p99 = percentile(load.latencies, 99) / percentile(streams.latencies, 99)
    goals: tuple[Goal, ...] = (
        Goal(
            "c1",
            "every due shard committed every interval",
            f"{late} of {len(gaps)} shards late (max gap {max(gaps):.2f} s)",
            f"0 (gaps <= {GAP_LIMIT:g} s)",
            late == 0,
        ),
        at_most("c2", "answer p99 vs bare streams at the same rate", p99, 3.0),
    )
    title = (
        f"c. {settings.rate:,.0f} commits/s over {settings.rate_shards:,} shards for "
        f"{settings.rate_seconds:g} s, interval 1 s, emulator process ({shape.clients} clients, "
        "open loop)"
    )
    return Section(title, body, goals)
