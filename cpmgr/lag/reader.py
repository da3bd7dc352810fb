"""The lag reader: every `lag.interval`, per group, SLS's checkpoints (one GetCheckPoint),
ListShards, each shard's end cursor and the receive times needed -> a `GroupLag`.

It has its own SLS client (the daemon's), so its requests never queue behind a commit cycle
or heartbeats, and at most `concurrency` of them are in flight. A failed request is counted by
code and leaves the shard's (or group's) previous reading in place; it never touches commits.

Decisions where the contract is silent:
- The first reading starts as soon as the daemon has started; later ones start `interval`
  after the previous one started (right after it, if it took longer).
- "Unchanged for `stall_after`" is measured from when this daemon first saw the checkpoint at
  SLS (GetCheckPoint's `updateTime` unit is not documented): after a restart a shard needs
  `stall_after` again before it shows `stalled`.
- A checkpoint whose previous cursor GetCursorTime refuses with `InvalidCursor` (its data
  expired) counts from the begin cursor, as PY's `get_previous_cursor_time(normalize=True)`.
- Receive times are cached per shard: GetCursorTime is asked again only when the end cursor or
  the checkpoint moved, so a caught-up shard costs one GetCursor per reading.
- A cursor or checkpoint that is not base64 of a decimal integer makes that shard's lag
  unknown and is counted under code `BadCursor`.
- Failures are logged once per group and code per 10 minutes (each is counted): a flaky link
  must not fill the log with lag lines.
- Lag gauges appear with a group's first reading (absent means unknown, not 0) and vanish when
  a reload disables lag (`interval: 0`) or removes the group.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from typing import Final, Protocol, TypeVar

from cpmgr.config import Config, GroupConfig, LagConfig
from cpmgr.errors import SLSError
from cpmgr.lag.model import (
    GroupLag,
    ShardLag,
    Tally,
    Thresholds,
    classify,
    cursor_at,
    cursor_position,
)
from cpmgr.sls.client import CheckpointReads, CursorStart, RemoteCheckpoint, ShardReads

__all__ = ["LagAPI", "LagObserver", "LagReader"]

log = logging.getLogger(__name__)

_T = TypeVar("_T")

# Requests in flight for lag, per daemon (the lag client's connection limit).
LAG_CONCURRENCY: Final = 4
# Entries handled per loop turn where a reading walks a whole answer (GetCheckPoint).
CHUNK: Final = 1000
BAD_CURSOR: Final = "BadCursor"
# How long a checkpoint counted from the begin cursor (its data expired, or nothing consumed
# yet) keeps that reading before the begin cursor is looked at again.
CLAMPED_REFRESH: Final = 300.0
# Lag read failures are logged once per group and code this often (each one is counted).
LOG_EVERY: Final = 600.0


class LagAPI(CheckpointReads, ShardReads, Protocol):
    """The SLS calls lag makes, on a client of its own."""

    async def get_cursor_time(
        self,
        project: str,
        logstore: str,
        shard: int,
        cursor: str,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> int: ...


class LagObserver(Protocol):
    def lag_read_failed(self, group: str, code: str) -> None: ...


class _NullObserver:
    def lag_read_failed(self, group: str, code: str) -> None:
        pass


@dataclass(frozen=True)
class _Consumed:
    """The receive time of the last log group consumed before `position`, as last read."""

    position: int  # the checkpoint's (or start cursor's) position: the cache key
    counted_from: int  # the position itself, or the begin cursor when the data before expired
    seconds: int  # unix receive time
    read_at: float  # monotonic


@dataclass
class _Memory:
    """What one shard's readings keep between intervals."""

    checkpoint: str  # at SLS, "" when none
    since: float  # monotonic time this daemon first saw that checkpoint
    newest: tuple[int, int] | None = None  # (end position, receive time of end - 1)
    consumed: _Consumed | None = None


@dataclass
class _Pass:
    """One reading of one group in progress."""

    group: GroupConfig
    now: float  # monotonic
    at: float  # unix time
    remembered: dict[int, _Memory]  # from the previous reading
    memory: dict[int, _Memory]  # for the next one


class _BadCursor(ValueError):
    """SLS answered a cursor (or holds a checkpoint) that is not base64 of a decimal integer."""


class LagReader:
    """Every group's latest lag reading; `start()` runs the readings, `close()` stops them."""

    def __init__(
        self,
        *,
        config: Config,
        api: LagAPI,
        observer: LagObserver | None = None,
        on_credentials_error: Callable[[], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        concurrency: int = LAG_CONCURRENCY,
    ) -> None:
        self._api = api
        self._on_credentials_error = on_credentials_error
        self._observer: LagObserver = observer or _NullObserver()
        self._clock = clock
        self._wall_clock = wall_clock
        self._concurrency = concurrency
        self._requests = asyncio.Semaphore(concurrency)
        self._readings: dict[str, GroupLag] = {}
        self._memory: dict[str, dict[int, _Memory]] = {}
        self._logged: dict[tuple[str, str], float] = {}  # (group, code) -> when last logged
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._finished = asyncio.Condition()
        self.rounds = 0  # readings of every group finished by the loop
        self.apply_config(config)

    # ------------------------------------------------------------------ settings and lifecycle

    def apply_config(self, config: Config) -> None:
        """Take a (reloaded) config: thresholds and interval at once, groups from the next
        reading; a removed group's reading, or every reading if lag is disabled, is dropped."""
        self._settings: LagConfig = config.lag
        self._thresholds = Thresholds(config.lag.lagging_after, config.lag.stall_after)
        self._groups = {g.name: g for g in config.groups}
        for name in list(self._readings.keys() | self._memory.keys()):
            if name not in self._groups or not self.enabled:
                self._readings.pop(name, None)
                self._memory.pop(name, None)
        self._changed.set()

    @property
    def enabled(self) -> bool:
        return self._settings.interval > 0

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cpmgr-lag")

    async def close(self) -> None:
        """Stop reading (idempotent); a reading in flight is abandoned."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    # ------------------------------------------------------------------ what others read

    def readings(self) -> dict[str, GroupLag]:
        """Every group's latest reading (groups without one are absent)."""
        return dict(self._readings)

    def reading(self, group: str) -> GroupLag | None:
        return self._readings.get(group)

    def shard(self, group: str, shard: int) -> ShardLag | None:
        reading = self._readings.get(group)
        return reading.shards.get(shard) if reading is not None else None

    # ------------------------------------------------------------------ the loop

    async def _run(self) -> None:
        while True:
            if not self.enabled:
                self._changed.clear()
                await self._changed.wait()
                continue
            started = self._clock()
            try:
                await self.read_all()
            except Exception:
                # A bug in one reading must not end lag reading for good (commits go on anyway).
                log.exception("lag reading failed; reading again next interval")
            self.rounds += 1
            async with self._finished:
                self._finished.notify_all()
            await self._pause(started)

    async def wait_rounds(self, count: int = 1) -> None:
        """Return once the loop has finished `count` more readings of every group."""
        target = self.rounds + count
        async with self._finished:
            await self._finished.wait_for(lambda: self.rounds >= target)

    async def _pause(self, started: float) -> None:
        """Until `interval` after `started`; a reload that changes the interval counts at once."""
        while self.enabled:
            remaining = started + self._settings.interval - self._clock()
            if remaining <= 0:
                return
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def read_all(self) -> None:
        """One reading of every configured group, side by side."""
        groups = list(self._groups.values())
        await asyncio.gather(*(self.read_group(group) for group in groups))

    # ------------------------------------------------------------------ one group

    async def read_group(self, group: GroupConfig) -> GroupLag | None:
        """Read `group` now; its new reading, or the previous one if SLS could not be read."""
        at, now = self._wall_clock(), self._clock()
        try:
            entries = await self._request(
                partial(
                    self._api.get_checkpoint,
                    group.project,
                    group.logstore,
                    group.consumer_group,
                    endpoint=group.endpoint,
                    region=group.region,
                )
            )
            shards = await self._request(
                partial(
                    self._api.list_shards,
                    group.project,
                    group.logstore,
                    endpoint=group.endpoint,
                    region=group.region,
                )
            )
        except SLSError as exc:
            self._failed(group.name, exc)
            return self._readings.get(group.name)
        checkpoints = await _by_shard(entries)
        tally = Tally()
        previous = self._readings.get(group.name)
        run = _Pass(group, now, at, self._memory.get(group.name, {}), {})
        queue = iter(shards)

        async def worker() -> None:
            for info in queue:
                lag = await self._read_shard(run, info.shard, checkpoints.get(info.shard, ""))
                if lag is None:
                    lag = previous.shards.get(info.shard) if previous is not None else None
                if lag is not None:
                    tally.add(lag)

        await asyncio.gather(*(worker() for _ in range(self._concurrency)))
        if group.name not in self._groups or not self.enabled:
            return None  # removed or disabled by a reload meanwhile
        self._memory[group.name] = run.memory
        reading = self._readings[group.name] = tally.result(at)
        return reading

    async def _read_shard(self, run: _Pass, shard: int, checkpoint: str) -> ShardLag | None:
        """One shard's lag, or None if it could not be read (counted)."""
        group, now = run.group, run.now
        known = run.remembered.get(shard)
        if known is None or known.checkpoint != checkpoint:
            known = _Memory(checkpoint, now, newest=known.newest if known else None)
        run.memory[shard] = known
        try:
            log_groups, seconds = await self._lag_of(group, shard, known)
        except SLSError as exc:
            self._failed(group.name, exc)
            return None
        except _BadCursor as exc:
            self._failed(group.name, SLSError(BAD_CURSOR, 200, str(exc)))
            return None
        state = classify(
            log_groups=log_groups,
            seconds=seconds,
            has_checkpoint=bool(checkpoint),
            unchanged_for=now - known.since,
            thresholds=self._thresholds,
        )
        return ShardLag(shard, log_groups, seconds, state, run.at)

    async def _lag_of(self, group: GroupConfig, shard: int, known: _Memory) -> tuple[int, float]:
        """(log groups, seconds) behind on `shard`."""
        end = _position(await self._cursor(group, shard, "end"))
        position, begin = await self._start_position(group, shard, known.checkpoint, end)
        if end - position <= 0:
            return 0, 0.0
        newest = await self._newest_time(group, shard, end, known)
        position, consumed = await self._consumed_time(group, shard, position, begin, known)
        return max(0, end - position), float(max(0, newest - consumed))

    async def _start_position(
        self, group: GroupConfig, shard: int, checkpoint: str, end: int
    ) -> tuple[int, int | None]:
        """(the checkpoint's position, None); without one, the group's start cursor's (begin
        unless a membership group starts elsewhere), and the begin cursor's if that was read."""
        if checkpoint:
            return _position(checkpoint), None
        start = group.membership.start_from if group.membership is not None else "begin"
        if start == "end":
            return end, None
        position = _position(await self._cursor(group, shard, start))
        return position, position if start == "begin" else None

    async def _newest_time(self, group: GroupConfig, shard: int, end: int, known: _Memory) -> int:
        if known.newest is None or known.newest[0] != end:
            known.newest = (end, await self._cursor_time(group, shard, end - 1))
        return known.newest[1]

    async def _consumed_time(
        self, group: GroupConfig, shard: int, position: int, begin: int | None, known: _Memory
    ) -> tuple[int, int]:
        """(position counted from, receive time of the last consumed log group)."""
        cached, now = known.consumed, self._clock()
        if cached is not None and cached.position == position:
            # Counted from the begin cursor: looked at again now and then, as data expires.
            fresh = cached.counted_from == position or now - cached.read_at < CLAMPED_REFRESH
            if fresh:
                return cached.counted_from, cached.seconds
        if begin is None or position - 1 >= begin:
            try:
                seconds = await self._cursor_time(group, shard, position - 1)
            except SLSError as exc:
                if exc.code != "InvalidCursor":
                    raise
                # Nothing consumed yet at the begin cursor, or the data expired.
                begin = _position(await self._cursor(group, shard, "begin"))
            else:
                known.consumed = _Consumed(position, position, seconds, now)
                return position, seconds
        counted_from = max(position, begin)
        seconds = await self._cursor_time(group, shard, begin)
        known.consumed = _Consumed(position, counted_from, seconds, now)
        return counted_from, seconds

    # ------------------------------------------------------------------ requests

    async def _cursor(self, group: GroupConfig, shard: int, start: CursorStart) -> str:
        return await self._request(
            partial(
                self._api.get_cursor,
                group.project,
                group.logstore,
                shard,
                start,
                endpoint=group.endpoint,
                region=group.region,
            )
        )

    async def _cursor_time(self, group: GroupConfig, shard: int, position: int) -> int:
        return await self._request(
            partial(
                self._api.get_cursor_time,
                group.project,
                group.logstore,
                shard,
                cursor_at(position),
                endpoint=group.endpoint,
                region=group.region,
            )
        )

    async def _request(self, call: Callable[[], Awaitable[_T]]) -> _T:
        # The call is made only once a slot is free: a reading cancelled while it waits
        # leaves no coroutine that was never awaited.
        async with self._requests:
            return await call()

    # ------------------------------------------------------------------ failures

    def _failed(self, group: str, error: SLSError) -> None:
        """Count every failure; log one line per group and code per LOG_EVERY seconds. SLS
        refusing the keys also asks for fresh ones, as a refused commit does."""
        code, message = error.code, error.message
        self._observer.lag_read_failed(group, code)
        if error.credentials_problem and self._on_credentials_error is not None:
            self._on_credentials_error()
        now, last = self._clock(), self._logged.get((group, code))
        if last is None or now - last >= LOG_EVERY:
            self._logged[group, code] = now
            log.warning(
                "lag of group %s: a read failed with %s: %s (counted in "
                "cpmgr_lag_read_failures_total; read again next interval; logged once per %gs)",
                group,
                code,
                message,
                LOG_EVERY,
            )


def _position(cursor: str) -> int:
    try:
        return cursor_position(cursor)
    except ValueError as exc:
        raise _BadCursor(str(exc)) from None


async def _by_shard(entries: list[RemoteCheckpoint]) -> dict[int, str]:
    """{shard: checkpoint} from a GetCheckPoint answer, a chunk per loop turn."""
    checkpoints: dict[int, str] = {}
    for start in range(0, len(entries), CHUNK):
        for entry in _chunk(entries, start):
            checkpoints[entry.shard] = entry.checkpoint
        await asyncio.sleep(0)
    return checkpoints


def _chunk(entries: list[RemoteCheckpoint], start: int) -> Iterator[RemoteCheckpoint]:
    return iter(entries[start : start + CHUNK])
