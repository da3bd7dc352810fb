"""Scenario d: a backlog of 10,000 dirty shards committed to the emulator process, by the daemon
(one `flush`) and by the official SDK's `update_check_point` in a loop; the CPU each side spends
per UpdateCheckPoint, and the emulator's, to show whether it is the bottleneck.

The daemon first commits every shard once (a warm-up that opens its keep-alive connections and
creates the emulator's entries), then gets a newer value for every shard and is timed on the
`flush` that commits them. The SDK loop runs for a fixed time on the same emulator (a rate, so
it does not need 10,000 calls to be measured). The emulator's request counts prove what each
side sent.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from harness import BENCH_DIR, STARTUP_TIMEOUT, BenchError, read_line, spawned, table
from ingest_bench import run_dir
from loadgen import cursor
from report import Goal, Section, Settings, at_least, at_most
from targets import (
    CONSUMER_GROUP,
    KEY_ID,
    KEY_SECRET,
    PROJECT,
    Remote,
    Server,
    daemon_config,
    emulator_process,
    emulator_state,
    feed_shape,
    running_daemon,
    shard_key,
    update_calls,
)

LOGSTORE: Final = "backlog"
SDK_FIRST: Final = 10**9  # the SDK's cursors, above anything the daemon sent
# A process this busy (share of one core) is saturated: one Python process (the daemon's event
# loop, the emulator) can keep at most one core busy.
SATURATED: Final = 0.9


@dataclass(frozen=True)
class Drain:
    """Who committed how many UpdateCheckPoint calls in how long, and the CPU it took."""

    calls: int
    seconds: float
    client_cpu: float
    emulator_cpu: float

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def client_us_per_call(self) -> float:
        return self.client_cpu / self.calls * 1e6

    @property
    def emulator_us_per_call(self) -> float:
        return self.emulator_cpu / self.calls * 1e6

    @property
    def client_share(self) -> float:
        """Cores the committer kept busy meanwhile."""
        return self.client_cpu / self.seconds

    @property
    def emulator_share(self) -> float:
        """Cores the emulator kept busy meanwhile."""
        return self.emulator_cpu / self.seconds

    @property
    def emulator_held_back(self) -> bool:
        """Whether the emulator, not the committer, set the pace: it was saturated while the
        committer had time to spare. When both are saturated, the committer could not have
        gone faster whatever the emulator did, so the rate is the committer's own."""
        return self.emulator_share >= SATURATED and self.client_share < SATURATED


async def daemon_drain(server: Server, emulator: Remote, shards: int) -> Drain:
    for round_number in (0, 1):  # round 0 warms up
        await server.load(feed_shape(shards, round_number))
        calls = update_calls(await emulator_state(emulator.url), "OK")
        cpu, emulator_cpu = server.cpu_seconds(), emulator.cpu_seconds()
        started = time.monotonic()
        committed = await server.flush(timeout=600)
        seconds = time.monotonic() - started
        cpu, emulator_cpu = server.cpu_seconds() - cpu, emulator.cpu_seconds() - emulator_cpu
        calls = update_calls(await emulator_state(emulator.url), "OK") - calls
        if committed != shards or calls != shards:
            raise BenchError(f"flush committed {committed}, emulator saw {calls} of {shards}")
    return Drain(calls, seconds, cpu, emulator_cpu)


async def sdk_drain(emulator: Remote, shards: int, seconds: float) -> Drain:
    argv = [sys.executable, str(BENCH_DIR / "sdk_loop.py"), "--endpoint", emulator.url]
    argv += ["--project", PROJECT, "--logstore", LOGSTORE, "--group", CONSUMER_GROUP]
    argv += ["--key-id", KEY_ID, "--key-secret", KEY_SECRET, "--shards", str(shards)]
    argv += ["--seconds", str(seconds), "--first", str(SDK_FIRST)]
    emulator_cpu = emulator.cpu_seconds()
    async with spawned(*argv) as proc:
        result = json.loads(await read_line(proc, seconds + STARTUP_TIMEOUT, "SDK loop"))
    emulator_cpu = emulator.cpu_seconds() - emulator_cpu  # start-up included: a bit high
    state = await emulator_state(emulator.url)
    done = min(result["calls"], shards)
    wrong = [
        s
        for s in range(done)
        if state["checkpoints"].get(shard_key(s, LOGSTORE)) != cursor(SDK_FIRST + s)
    ]
    if wrong:
        raise BenchError(f"the SDK's value is not at the emulator for shards {wrong[:5]}")
    return Drain(result["calls"], result["seconds"], result["cpu"], emulator_cpu)


async def backlog(settings: Settings, progress: Callable[[str], None]) -> Section:
    shards = settings.commit_shards
    with run_dir(settings.temp_root) as directory:
        async with emulator_process(
            directory / "emulator.log", shards={LOGSTORE: shards}
        ) as emulator:
            config = daemon_config(directory / "s", endpoint=emulator.url, logstore=LOGSTORE)
            async with running_daemon(directory, config) as server:
                daemon = await daemon_drain(server, emulator, shards)
                await server.stop()
            progress(f"  daemon: {daemon.rate:,.0f} UpdateCheckPoint/s")
            sdk = await sdk_drain(emulator, shards, settings.sdk_seconds)
            progress(f"  SDK loop: {sdk.rate:,.0f} UpdateCheckPoint/s")
    rows = [_row("cpmgr daemon, one `flush`", daemon), _row("official SDK in a loop", sdk)]
    header = ["committer", "calls", "seconds", "UpdateCheckPoint/s", "client CPU µs/call"]
    header += ["client busy (cores)", "emulator CPU µs/call", "emulator busy (cores)"]
    body = table(header, rows)
    body += (
        "\n\nThe daemon's event loop and the emulator are one process each, so each can keep "
        f"at most one core busy; at {SATURATED:.0%} of a core or more, a side is saturated. "
        "The emulator holds the daemon back only if it is saturated while the daemon is not; "
        "when both are, the daemon could not have gone faster whatever the emulator did, and "
        "the rate is the daemon's own."
    )
    goals: tuple[Goal, ...] = (
        at_least("d1", f"{shards:,} dirty shards: daemon vs SDK loop", daemon.rate / sdk.rate, 10),
        at_most("d2", "client CPU µs per UpdateCheckPoint", daemon.client_us_per_call, 150, ".0f"),
        Goal(
            "d3",
            "the emulator did not hold the daemon back during d1 (cores busy)",
            f"daemon {daemon.client_share:.2f}, emulator {daemon.emulator_share:.2f}",
            f"daemon >= {SATURATED:.2f} or emulator < {SATURATED:.2f}",
            not daemon.emulator_held_back,
        ),
    )
    return Section(
        f"d. A backlog of {shards:,} dirty shards, committed to the emulator", body, goals
    )


def _row(name: str, drain: Drain) -> list[str]:
    return [
        name,
        f"{drain.calls:,}",
        f"{drain.seconds:.2f}",
        f"{drain.rate:,.0f}",
        f"{drain.client_us_per_call:,.0f}",
        f"{drain.client_share:.2f}",
        f"{drain.emulator_us_per_call:,.0f}",
        f"{drain.emulator_share:.2f}",
    ]
