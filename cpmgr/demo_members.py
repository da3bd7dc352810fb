"""The membership part of `make run`: two consumers in one consumer group, each joined through
a daemon of its own, share the shards; one daemon stops half-way and the other consumer takes
its shards over. Every holding is recorded from the consumers' side (from `assigned` to the
answer of `release`), printed as it changes, and checked at the end.

Decisions where the contract is silent:
- A consumer reads a shard from the `assigned` checkpoint on; the synthetic "records" it reads
  are cursor steps, printed relative to where the shard began so the lines stay short.
- A holding ends when `release` (or `leave`) answers, or at a `lost` event: from then on the
  consumer no longer reads the shard, so that is when another may start without overlap.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import random
import time
from dataclasses import dataclass, field

from cpmgr.client import (
    Assigned,
    AsyncCpmgrClient,
    AsyncMember,
    CpmgrProtocolError,
    CpmgrUnavailable,
    Ended,
    Lost,
    Revoked,
)

__all__ = ["Board", "DemoMember", "Holding", "check_holdings", "join"]

READ_EVERY = 0.05  # seconds between two synthetic batches of a consumer


def cursor_of(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


def number_of(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        return int(base64.b64decode(cursor, validate=True))
    except (ValueError, binascii.Error):
        return None


@dataclass
class Holding:
    """One consumer's hold on one shard, as the consumer saw it."""

    consumer: str
    shard: int
    start: float  # monotonic time of the `assigned` event
    first: int  # the checkpoint it was assigned
    last: int  # its newest accepted commit; the released checkpoint once it ended
    end: float | None = None
    how: str = ""


@dataclass
class Board:
    """Every holding of the demo's consumers, printed as holdings change."""

    shards: int
    holdings: list[Holding] = field(default_factory=list)
    origin: dict[int, int] = field(default_factory=dict)  # shard -> its first checkpoint seen
    consumers: list[str] = field(default_factory=list)
    _shown: str = ""

    def record(self, consumer: str, shard: int, checkpoint: int) -> Holding:
        self.origin.setdefault(shard, checkpoint)
        holding = Holding(consumer, shard, time.monotonic(), checkpoint, checkpoint)
        self.holdings.append(holding)
        self.say(f"{consumer} assigned shard {shard} at record {self.records(shard, checkpoint)}")
        return holding

    def finish(self, holding: Holding, how: str, checkpoint: int | None) -> None:
        if holding.end is not None:
            return
        holding.end = time.monotonic()
        holding.how = how
        if checkpoint is not None:
            holding.last = checkpoint
        where = self.records(holding.shard, holding.last)
        self.say(f"{holding.consumer} {how} shard {holding.shard} at record {where}")

    def records(self, shard: int, checkpoint: int) -> int:
        """Cursor steps since the shard's first checkpoint seen (short numbers to print)."""
        return checkpoint - self.origin.get(shard, checkpoint)

    def held_by(self, consumer: str) -> list[int]:
        return sorted(h.shard for h in self.holdings if h.consumer == consumer and h.end is None)

    def say(self, text: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} members: {text}", flush=True)

    def show(self) -> None:
        parts = [
            f"{name} [{' '.join(map(str, self.held_by(name))) or '-'}]" for name in self.consumers
        ]
        line = "  ".join(parts)
        if line != self._shown:
            self._shown = line
            print(f"{time.strftime('%H:%M:%S')} members: holds  {line}", flush=True)

    def balanced(self) -> bool:
        """Every shard held, by more than one consumer."""
        held = [self.held_by(name) for name in self.consumers]
        return sum(len(h) for h in held) == self.shards and sum(1 for h in held if h) > 1


class DemoMember:
    """A consumer reading its assigned shards (synthetic batches) and committing as it reads,
    through one joined connection."""

    def __init__(self, name: str, member: AsyncMember, board: Board, seed: int) -> None:
        self.name = name
        self.member = member
        self.board = board
        self.reading: dict[int, Holding] = {}
        self._rng = random.Random(seed)
        board.consumers.append(name)

    async def run(self, stop: asyncio.Event) -> None:
        """Follow the events and read until the membership ends, or `stop` (then leave)."""
        reader = asyncio.create_task(self._read(stop))
        events = asyncio.create_task(self._follow())
        stopped = asyncio.create_task(stop.wait())
        await asyncio.wait({events, stopped}, return_when=asyncio.FIRST_COMPLETED)
        stopped.cancel()
        await reader
        if not events.done():
            await self._leave()
            events.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await events
        for holding in list(self.reading.values()):
            self.board.finish(holding, "lost", None)
        self.reading.clear()
        await self.member.close()

    async def _follow(self) -> None:
        async for event in self.member:
            match event:
                case Assigned(shard=shard, checkpoint=checkpoint):
                    number = number_of(checkpoint)
                    if number is not None:
                        self.reading[shard] = self.board.record(self.name, shard, number)
                case Revoked(shard=shard, reason=reason) if shard in self.reading:
                    await self._release(self.reading.pop(shard), reason)
                case Ended(shard=shard) if shard in self.reading:
                    self.board.finish(self.reading.pop(shard), "ended", None)
                case Lost(shards=shards):
                    for shard in shards:
                        if shard in self.reading:
                            self.board.finish(self.reading.pop(shard), "lost", None)
                case _:
                    pass
            self.board.show()

    async def _release(self, holding: Holding, reason: str) -> None:
        """Hand a revoked shard back (no longer read): `release` answers once its last
        checkpoint is at SLS. A failed release is shown; the daemon's deadline hands it on."""
        try:
            released = await self.member.release(holding.shard)
        except (CpmgrProtocolError, CpmgrUnavailable) as exc:
            self.board.finish(holding, f"could not release ({exc})", None)
            return
        self.board.finish(holding, f"released ({reason})", number_of(released))

    async def _read(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self.member.ended:
            for shard, holding in list(self.reading.items()):
                position = holding.last + self._rng.randrange(1, 50)
                try:
                    await self.member.commit(shard, cursor_of(position))
                except CpmgrProtocolError as exc:
                    if exc.code != "NotOwner":
                        raise
                    continue  # lost meanwhile: its `lost` event stops the reading
                except CpmgrUnavailable:
                    return  # the daemon went away: the events end the membership
                if self.reading.get(shard) is holding:
                    holding.last = position
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=READ_EVERY)

    async def _leave(self) -> None:
        """Hand every shard back: `leave` answers once their last checkpoints are at SLS."""
        holdings = list(self.reading.values())
        self.reading.clear()
        try:
            await self.member.leave()
        except (CpmgrProtocolError, CpmgrUnavailable) as exc:
            self.board.say(f"{self.name} could not leave: {exc}")
            for holding in holdings:
                self.board.finish(holding, "lost", None)
            return
        for holding in holdings:
            self.board.finish(holding, "released (leave)", None)
        self.board.show()


async def join(
    client: AsyncCpmgrClient, group: str, name: str, board: Board, seed: int
) -> DemoMember:
    member = await client.join(group, name)
    board.say(f"{name} joined {group}")
    return DemoMember(name, member, board, seed)


def check_holdings(board: Board, remote: dict[int, int | None]) -> list[str]:
    """What went wrong, if anything: each shard held by one consumer at a time, each new owner
    starting at the previous owner's last checkpoint, and the last one's at the emulator."""
    problems = []
    for shard in range(board.shards):
        held = sorted((h for h in board.holdings if h.shard == shard), key=lambda h: h.start)
        if not held:
            problems.append(f"shard {shard} was never assigned")
            continue
        for before, after in itertools.pairwise(held):
            if before.end is None or before.end > after.start:
                problems.append(
                    f"shard {shard} held by {before.consumer} and {after.consumer} at once"
                )
            if after.first != before.last:
                problems.append(
                    f"shard {shard}: {after.consumer} started at {after.first}, "
                    f"not at {before.consumer}'s last checkpoint {before.last}"
                )
        if held[-1].end is None:
            problems.append(f"shard {shard} is still held by {held[-1].consumer}")
        if remote.get(shard) != held[-1].last:
            problems.append(
                f"shard {shard}: the emulator has {remote.get(shard)}, "
                f"the last checkpoint was {held[-1].last}"
            )
    return problems
