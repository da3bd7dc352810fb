"""Consumer lag: what reading it costs, in SLS requests per second and daemon CPU.

    python bench/lag_bench.py [--quick] [--shards N] [--tmp DIR]
    python bench/run.py --only l [--quick]      (the same, as a section of the bench report)

Not in `make bench`'s default set. The daemon (bench/server_proc.py) and the emulator each run
in their own process; the emulator holds one logstore of `--shards` shards (1,000 by default).

A reading costs the same whatever `lag.interval` is, so the daemon reads every 3 s
(`lag.interval: 3s`: a reading of 1,000 shards fits with room, so whole readings can be told
apart at the emulator) and the figures are scaled to the 30 s default: requests per reading / 30
and CPU per reading / 30. Two cases, each over a measured window:
- caught up: the group's checkpoint is every shard's end (no data arrives): one GetCheckPoint,
  one ListShards and one GetCursor per shard per reading;
- behind: every shard is behind and gets new data all the time (the emulator writes 1 log group
  per second to each), so each reading also asks the receive time of every shard's newest log
  group (the checkpoint's is cached).
The daemon's CPU is measured over the same window with lag reading off, and subtracted.

The report (markdown) goes to stdout, progress to stderr; exit 1 if the run went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from harness import BenchError, report_standalone, table
from report import Section, Settings
from targets import (
    CONSUMER_GROUP,
    PROJECT,
    Server,
    daemon_config,
    emulator_process,
    emulator_state,
    running_daemon,
    sample,
    scrape,
)

from cpmgr.sls.client import SLSClient
from cpmgr.sls.signer import Credentials

LOGSTORE: Final = "lagged"
INTERVAL: Final = 3.0  # the daemon's lag.interval while measured: a reading fits with room
DEFAULT_INTERVAL: Final = 30.0  # what the figures are scaled to
LAG_APIS: Final = ("GetCheckPoint", "ListShards", "GetCursor", "GetCursorTime")
WAIT: Final = 120.0
QUIET: Final = 0.1  # no lag request for this long: the reading has finished


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sizes:
    shards: int
    window: float  # seconds of each measured window

    @classmethod
    def of(cls, *, quick: bool, shards: int | None) -> Sizes:
        if quick:
            return cls(shards=shards or 50, window=2.0)
        return cls(shards=shards or 1_000, window=20.0)


@dataclass(frozen=True)
class Window:
    """One measured window: readings finished, lag requests by API, daemon CPU seconds."""

    case: str
    readings: int
    requests: dict[str, int]
    cpu: float
    seconds: float

    @property
    def requests_per_reading(self) -> float:
        return sum(self.requests.values()) / self.readings

    def cpu_per_reading(self, idle_rate: float) -> float:
        """Daemon CPU seconds per reading, less what it spends idle over as long."""
        return max(0.0, self.cpu - idle_rate * self.seconds) / self.readings


def _lag_requests(state: dict[str, Any]) -> dict[str, int]:
    return {api: sum(state["requests"].get(api, {}).values()) for api in LAG_APIS}


async def measure_window(server: Server, emulator: str, case: str, seconds: float) -> Window:
    """Lag requests and daemon CPU over whole readings: from the end of one reading to the end
    of the first one that ends `seconds` or more later (a reading takes well under
    INTERVAL, so the daemon is idle between two)."""
    await _reading_done(emulator)  # the first reading fills the caches: not measured
    loop = asyncio.get_running_loop()
    before, cpu_before = await _reading_done(emulator), server.cpu_seconds()
    started = loop.time()
    await asyncio.sleep(seconds)  # a measurement window, not a wait for something to happen
    after, cpu_after = await _reading_done(emulator), server.cpu_seconds()
    seconds = loop.time() - started
    requests = {api: after[api] - before[api] for api in LAG_APIS}
    readings = requests["GetCheckPoint"]  # one per reading of the one group
    if readings < 1:
        raise BenchError(f"{case}: no lag reading finished in {seconds:g} s")
    return Window(case, readings, requests, cpu_after - cpu_before, seconds)


async def _reading_done(emulator: str) -> dict[str, int]:
    """The lag requests so far, once the next reading has started and then finished (no new
    request for QUIET seconds)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + WAIT
    first = _lag_requests(await emulator_state(emulator))
    seen = first
    while True:
        await asyncio.sleep(QUIET)  # the emulator is another process: poll it
        now = _lag_requests(await emulator_state(emulator))
        if now == seen and now["GetCheckPoint"] > first["GetCheckPoint"]:
            return now
        if loop.time() > deadline:
            raise BenchError(f"no lag reading finished within {WAIT:g} s")
        seen = now


async def _commit_ends(emulator: str, shards: int) -> None:
    """The group's checkpoint at every shard's end: caught up."""
    credentials = Credentials("bench-key-id", "bench-key-secret")
    async with SLSClient(endpoint=emulator, credentials=lambda: credentials) as client:
        for shard in range(shards):
            end = await client.get_cursor(PROJECT, LOGSTORE, shard, "end")
            await client.update_checkpoint(PROJECT, LOGSTORE, CONSUMER_GROUP, shard, end)


async def _commit_begins(emulator: str, shards: int) -> None:
    """The group's checkpoint at every shard's begin: behind, by all the data written since."""
    credentials = Credentials("bench-key-id", "bench-key-secret")
    async with SLSClient(endpoint=emulator, credentials=lambda: credentials) as client:
        for shard in range(shards):
            begin = await client.get_cursor(PROJECT, LOGSTORE, shard, "begin")
            await client.update_checkpoint(PROJECT, LOGSTORE, CONSUMER_GROUP, shard, begin)


def _config(directory: Path, emulator: str, lag_interval: str) -> dict[str, Any]:
    return daemon_config(
        directory / "s", endpoint=emulator, logstore=LOGSTORE, lag_interval=lag_interval
    )


async def idle_cpu(directory: Path, emulator: str, seconds: float) -> float:
    """The daemon's CPU seconds per second with lag reading off (its loop-lag probe...)."""
    async with running_daemon(directory, _config(directory, emulator, "0")) as server:
        await asyncio.sleep(1.0)  # past start-up
        before = server.cpu_seconds()
        await asyncio.sleep(seconds)  # a measurement window
        return (server.cpu_seconds() - before) / seconds


async def one_case(
    directory: Path, sizes: Sizes, case: str, *, write_rate: int
) -> tuple[Window, float]:
    """(the lag window, the daemon's CPU seconds per second with lag off)."""
    idle_dir, lag_dir = _directories(directory)
    extra = ("--write-rate", str(write_rate)) if write_rate else ()
    async with emulator_process(
        directory / "emulator.log", shards={LOGSTORE: sizes.shards}, extra=extra
    ) as remote:
        if write_rate:
            await asyncio.sleep(2.0)  # some data in every shard before the checkpoints
            await _commit_begins(remote.url, sizes.shards)
        else:
            await _commit_ends(remote.url, sizes.shards)
        progress(f"l: {case}: the daemon's CPU with lag off, {sizes.window:g} s")
        idle = await idle_cpu(idle_dir, remote.url, sizes.window)
        config = _config(lag_dir, remote.url, f"{INTERVAL:g}s")
        async with running_daemon(lag_dir, config) as server:
            progress(f"l: {case}: lag every {INTERVAL:g} s over {sizes.shards} shards")
            window = await measure_window(server, remote.url, case, sizes.window)
            assert server.http is not None
            text = await scrape(server.http)
            behind = sample(text, 'cpmgr_consumer_lag_log_groups{group="bench"}')
            if behind is None or (write_rate == 0) != (behind == 0):
                raise BenchError(f"{case}: unexpected lag {behind} log groups")
            failures = sample(text, "cpmgr_lag_read_failures_total")
            if failures:
                raise BenchError(f"{case}: {failures:g} lag reads failed")
    return window, idle


def _directories(directory: Path) -> tuple[Path, Path]:
    """The run directories of the daemon with lag off and with lag on."""
    idle, lag = directory / "idle", directory / "lag"
    for path in (idle, lag):
        path.mkdir(parents=True)
    return idle, lag


def section(windows: list[tuple[Window, float]], sizes: Sizes) -> Section:
    header = [
        "case",
        "readings",
        "requests / reading",
        "of which GetCursorTime",
        "req/s at 30 s",
        "CPU ms / reading",
        "core share at 30 s",
    ]
    rows = []
    for window, idle in windows:
        per_reading = window.cpu_per_reading(idle)
        rows.append(
            [
                window.case,
                str(window.readings),
                f"{window.requests_per_reading:,.0f}",
                f"{window.requests['GetCursorTime'] / window.readings:,.0f}",
                f"{window.requests_per_reading / DEFAULT_INTERVAL:,.1f}",
                f"{per_reading * 1e3:,.1f}",
                f"{per_reading / DEFAULT_INTERVAL:.3%}",
            ]
        )
    body = "\n".join(
        [
            f"One group over {sizes.shards:,} shards; the daemon reads lag every {INTERVAL:g} s "
            f"for whole readings over about {sizes.window:g} s per case (its CPU with lag off "
            "over as long is subtracted); "
            f"the per-reading figures are scaled to the default `lag.interval` of "
            f"{DEFAULT_INTERVAL:g} s. At most 4 lag requests are in flight.",
            "",
            table(header, rows),
        ]
    )
    return Section("l. Consumer lag: the cost of reading it", body)


async def measure(temp_root: Path, sizes: Sizes) -> Section:
    windows = []
    for case, rate in (("caught up", 0), ("behind, data arriving", 1)):
        window, idle = await one_case(
            temp_root / case.split(",")[0].replace(" ", "-"), sizes, case, write_rate=rate
        )
        windows.append((window, idle))
    return section(windows, sizes)


async def scenario(settings: Settings, say: Callable[[str], None]) -> Section:
    """Scenario l of bench/run.py, at the run's sizes (`--quick`: tiny)."""
    directory = settings.temp_root / "l"
    directory.mkdir()
    say(f"l: sockets and logs in {directory}")
    return await measure(directory, Sizes.of(quick=settings.quick, shards=None))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check it works")
    parser.add_argument("--shards", type=int, default=None, help="shards (default 1,000)")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temp dir")
    return parser.parse_args(argv)


async def main() -> int:
    args = parse_args()
    sizes = Sizes.of(quick=args.quick, shards=args.shards)
    return await report_standalone("cpl", args.tmp, lambda root: measure(root, sizes))


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
