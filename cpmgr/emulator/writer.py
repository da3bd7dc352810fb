"""`--write-rate`: a steady stream of log groups into every read-write shard.

Decisions where SLS is silent:
- The stream is even, not bursty: each tick appends what is due since the start (rate x
  elapsed, rounded down), so over any second every shard gains `rate` log groups give or take
  one, whatever the tick length or a late tick.
- Every shard gets the same count at the same receive time (the wall clock's second): lag in
  tests and the demo follows from the rate alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Awaitable, Callable

from cpmgr.emulator.state import EmulatorState

Sleep = Callable[[float], Awaitable[None]]

# How often the writer appends: often enough to look steady, never more than 20 times a second.
MIN_TICK_SECONDS = 0.05
MAX_TICK_SECONDS = 1.0


class SteadyWriter:
    """Appends `rate` log groups per second to every read-write shard of the state."""

    def __init__(self, state: EmulatorState, rate: float, *, sleep: Sleep = asyncio.sleep) -> None:
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError("the write rate must be a finite number > 0")
        self._state = state
        self._rate = rate
        self._sleep = sleep
        self._tick = min(MAX_TICK_SECONDS, max(MIN_TICK_SECONDS, 1.0 / rate))
        self._started = state.monotonic()
        self._written = 0  # per shard, since the start
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="cpmgr-emulator-writer"
            )

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def write_due(self) -> int:
        """Append what is due by now to every read-write shard; how many log groups each got."""
        due = math.floor(self._rate * (self._state.monotonic() - self._started)) - self._written
        if due > 0:
            self._state.write_everywhere(due, int(self._state.wall_clock()))
            self._written += due
        return max(due, 0)

    async def _run(self) -> None:
        while True:
            self.write_due()
            await self._sleep(self._tick)
