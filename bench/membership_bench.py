"""Consumer-group membership: how long a handoff takes, and what heartbeats cost the daemon.

    python bench/membership_bench.py [--quick] [--rounds N] [--members N] [--tmp DIR]
    python bench/run.py --only m [--quick]      (the same, as a section of the bench report)

Not in `make bench`'s default set yet. The daemon (bench/server_proc.py) and the emulator
each run in their own process; the members are socket connections from this process, speaking
the socket protocol's membership ops (`join`, `release`, `leave`) and reading its events.

- Handoff: member A holds every shard; member B joins, so A gets `revoked` for half of them and
  releases each at once; the handoff time of a shard is from A reading `revoked` to B reading
  `assigned`. B then leaves and A takes everything back (leave to A's `assigned`, reported
  apart). Repeated for `--rounds` rebalances at a 200 ms heartbeat interval: p50 and p99, also
  in heartbeat intervals (what a handoff costs is mostly waiting for heartbeats).
- Heartbeat cost: the daemon's CPU time over a window with `--members` idle members joined,
  less its CPU time over the same window with none, per heartbeat the emulator answered and
  per member (a share of one core).

The report (markdown) goes to stdout, progress to stderr; exit 1 if the run went wrong.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from harness import BenchError, percentile, report_standalone, table
from report import Section, Settings, ms
from targets import (
    CONSUMER_GROUP,
    GROUP,
    PROJECT,
    Server,
    daemon_config,
    emulator_process,
    emulator_state,
    running_daemon,
)

LOGSTORE: Final = "members"
HEARTBEAT_INTERVAL: Final = 0.2
WAIT: Final = 30.0  # the longest one step may take before the run is called broken


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Sizes:
    rounds: int  # rebalances measured
    shards: int  # of the logstore
    members: int  # idle members of the heartbeat-cost window
    window: float  # seconds of each CPU window

    @classmethod
    def of(cls, *, quick: bool, rounds: int | None, members: int | None) -> Sizes:
        if quick:
            return cls(rounds=rounds or 2, shards=4, members=members or 4, window=1.0)
        return cls(rounds=rounds or 20, shards=8, members=members or 16, window=5.0)


def membership_config(socket_path: Path, endpoint: str) -> dict[str, Any]:
    """The bench daemon, its group turned into a membership group at a 200 ms heartbeat."""
    config = daemon_config(
        socket_path, endpoint=endpoint, logstore=LOGSTORE, interval="1s", request_timeout="300ms"
    )
    config["groups"][0]["membership"] = {
        "heartbeat_interval": f"{HEARTBEAT_INTERVAL * 1000:.0f}ms",
        "timeout": "2s",
        "release_timeout": "2s",
        "start": "begin",
    }
    return config


# --- a member: one socket connection, answers in order, events as they come ----------------------


@dataclass
class Member:
    """A joined connection; records when each event was read (this process's monotonic clock)."""

    name: str
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answers: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    held: set[int] = field(default_factory=set)
    assigned_at: dict[int, float] = field(default_factory=dict)
    revoked_at: dict[int, float] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    _pump: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        while line := await self.reader.readline():
            message = json.loads(line)
            if "event" in message:
                self._on_event(message, time.monotonic())
            else:
                self.answers.put_nowait(message)

    def _on_event(self, event: dict[str, Any], at: float) -> None:
        kind = event["event"]
        if kind == "assigned":
            self.held.add(event["shard"])
            self.assigned_at[event["shard"]] = at
        elif kind == "revoked":
            self.revoked_at[event["shard"]] = at
            self.send({"op": "release", "group": GROUP, "shard": event["shard"]})
        elif kind == "ended":
            self.held.discard(event["shard"])
        elif kind == "lost":
            raise BenchError(f"{self.name} lost shards {event['shards']}: {event['reason']}")
        self.changed.set()

    def send(self, request: dict[str, Any]) -> None:
        self.writer.write(json.dumps(request).encode() + b"\n")

    async def ask(self, request: dict[str, Any]) -> dict[str, Any]:
        self.send(request)
        answer = await asyncio.wait_for(self.answers.get(), WAIT)
        if not answer.get("ok"):
            raise BenchError(f"{self.name}: {request['op']} answered {answer}")
        return answer

    async def drain_releases(self, count: int) -> None:
        """The answers to `count` releases sent on revoke: each must be ok."""
        for _ in range(count):
            answer = await asyncio.wait_for(self.answers.get(), WAIT)
            if not answer.get("ok"):
                raise BenchError(f"{self.name}: a release answered {answer}")

    async def until(self, condition: Callable[[], bool], what: str) -> None:
        """Wait, on events rather than by polling, until `condition` holds."""
        deadline = time.monotonic() + WAIT
        while not condition():
            self.changed.clear()
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"{self.name}: not within {WAIT:g} s: {what}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), left)

    async def leave(self) -> None:
        await self.ask({"op": "leave", "group": GROUP})
        self.held.clear()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(OSError):
            await self.writer.wait_closed()
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump


@contextlib.asynccontextmanager
async def joined(socket_path: str, name: str) -> AsyncIterator[Member]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    member = Member(name, reader, writer)
    member._pump = asyncio.create_task(member._read())
    try:
        await member.ask({"op": "join", "group": GROUP, "consumer": name})
        yield member
    finally:
        await member.close()


# --- the handoff rounds ---------------------------------------------------------------------


@dataclass
class Handoffs:
    revoke_to_assigned: list[float] = field(default_factory=list)
    leave_to_assigned: list[float] = field(default_factory=list)


async def _one_round(socket_path: str, a: Member, shards: int, number: int, into: Handoffs) -> None:
    a.revoked_at.clear()
    async with joined(socket_path, f"bench-b-{number}") as b:
        half = shards // 2
        await b.until(lambda: len(b.held) == half, f"B holds {half} shards")
        await a.drain_releases(len(a.revoked_at))
        a.held -= set(a.revoked_at)
        for shard, revoked in a.revoked_at.items():
            into.revoke_to_assigned.append(b.assigned_at[shard] - revoked)
        moved = set(b.held)
        a.assigned_at.clear()
        left = time.monotonic()
        await b.leave()
    await a.until(lambda: moved <= set(a.assigned_at), "A takes B's shards back")
    into.leave_to_assigned += [a.assigned_at[shard] - left for shard in moved]


async def handoff_rounds(server: Server, sizes: Sizes) -> Handoffs:
    found = Handoffs()
    async with joined(server.socket, "bench-a") as a:
        await a.until(lambda: len(a.held) == sizes.shards, "A holds every shard")
        for number in range(sizes.rounds):
            await _one_round(server.socket, a, sizes.shards, number, found)
    return found


# --- heartbeat cost ---------------------------------------------------------------------------


def heartbeats_answered(state: dict[str, Any]) -> int:
    by_code: dict[str, int] = state["requests"].get("ConsumerGroupHeartBeat", {})
    return by_code.get("OK", 0)


async def cpu_over(server: Server, seconds: float) -> float:
    before = server.cpu_seconds()
    await asyncio.sleep(seconds)  # a measurement window, not a wait for something to happen
    return server.cpu_seconds() - before


@dataclass(frozen=True)
class HeartbeatCost:
    idle_cpu: float
    members_cpu: float
    heartbeats: int
    members: int
    window: float

    @property
    def us_per_heartbeat(self) -> float:
        return max(0.0, self.members_cpu - self.idle_cpu) / self.heartbeats * 1e6

    @property
    def core_share_per_member(self) -> float:
        return max(0.0, self.members_cpu - self.idle_cpu) / self.window / self.members


async def balanced(emulator_url: str, members: int, shards: int) -> None:
    """Until the emulator shows `members` consumers sharing every shard at most one apart."""
    deadline = time.monotonic() + WAIT
    group = f"{PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}"
    while True:
        held = (await emulator_state(emulator_url))["consumers"].get(group, {})
        counts = [len(shards_held) for shards_held in held.values()]
        if len(counts) == members and sum(counts) == shards and max(counts) - min(counts) <= 1:
            return
        if time.monotonic() > deadline:
            raise BenchError(f"{members} members not balanced within {WAIT:g} s: {held}")
        await asyncio.sleep(HEARTBEAT_INTERVAL)  # the emulator is another process: poll it


async def heartbeat_cost(
    server: Server, emulator_url: str, sizes: Sizes, *, idle: float
) -> HeartbeatCost:
    """`idle`: the daemon's CPU time over the same window with no member."""
    async with contextlib.AsyncExitStack() as stack:
        for n in range(sizes.members):
            await stack.enter_async_context(joined(server.socket, f"idle-{n}"))
        await balanced(emulator_url, sizes.members, sizes.shards)
        before = heartbeats_answered(await emulator_state(emulator_url))
        busy = await cpu_over(server, sizes.window)
        heartbeats = heartbeats_answered(await emulator_state(emulator_url)) - before
    if heartbeats < sizes.members:
        raise BenchError(f"only {heartbeats} heartbeats answered for {sizes.members} members")
    return HeartbeatCost(idle, busy, heartbeats, sizes.members, sizes.window)


# --- the report -------------------------------------------------------------------------------


def _row(what: str, values: list[float]) -> list[str]:
    p50, p99 = percentile(values, 50), percentile(values, 99)
    return [
        what,
        str(len(values)),
        ms(p50),
        ms(p99),
        f"{p50 / HEARTBEAT_INTERVAL:.1f}",
        f"{p99 / HEARTBEAT_INTERVAL:.1f}",
    ]


def section(handoffs: Handoffs, cost: HeartbeatCost, sizes: Sizes) -> Section:
    header = ["handoff", "n", "p50 ms", "p99 ms", "p50 intervals", "p99 intervals"]
    rows = [
        _row("revoked (A) to assigned (B)", handoffs.revoke_to_assigned),
        _row("leave (B) to assigned (A)", handoffs.leave_to_assigned),
    ]
    body = "\n".join(
        [
            f"{sizes.rounds} rebalances over {sizes.shards} shards, heartbeat interval "
            f"{HEARTBEAT_INTERVAL * 1e3:.0f} ms, one daemon process, the emulator in another.",
            "",
            table(header, rows),
            "",
            f"Heartbeat cost: {cost.members} idle members, {cost.heartbeats} heartbeats in "
            f"{cost.window:g} s; daemon CPU {cost.members_cpu:.3f} s against "
            f"{cost.idle_cpu:.3f} s with no member: {cost.us_per_heartbeat:,.0f} µs per "
            f"heartbeat, {cost.core_share_per_member:.2%} of a core per member.",
        ]
    )
    return Section("m. Membership: handoff time and heartbeat cost", body)


async def measure(temp_root: Path, sizes: Sizes) -> Section:
    async with (
        emulator_process(temp_root / "emulator.log", shards={LOGSTORE: sizes.shards}) as remote,
        running_daemon(temp_root, membership_config(temp_root / "s", remote.url)) as server,
    ):
        progress(f"m: the daemon's CPU time with no member, {sizes.window:g} s")
        idle = await cpu_over(server, sizes.window)
        progress(f"m: {sizes.rounds} rebalances")
        handoffs = await handoff_rounds(server, sizes)
        progress(f"m: heartbeat cost, {sizes.members} members")
        cost = await heartbeat_cost(server, remote.url, sizes, idle=idle)
    return section(handoffs, cost, sizes)


async def scenario(settings: Settings, say: Callable[[str], None]) -> Section:
    """Scenario m of bench/run.py, at the run's sizes (`--quick`: tiny)."""
    directory = settings.temp_root / "m"
    directory.mkdir()
    say(f"m: sockets and logs in {directory}")
    return await measure(directory, Sizes.of(quick=settings.quick, rounds=None, members=None))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, to check it works")
    parser.add_argument("--rounds", type=int, default=None, help="rebalances (default 20)")
    parser.add_argument("--members", type=int, default=None, help="idle members (default 16)")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temp dir")
    return parser.parse_args(argv)


async def main() -> int:
    args = parse_args()
    sizes = Sizes.of(quick=args.quick, rounds=args.rounds, members=args.members)
    return await report_standalone("cpm", args.tmp, lambda root: measure(root, sizes))


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
