"""The event-loop lag probe: a task that sleeps 1 ms in a loop and records how late it wakes.

Whatever holds the loop (a long callback, a big synchronous loop, a blocking call) delays the
probe's wake-up by as long as it runs, so the lateness samples are the stalls every other task
on the loop saw. Standard library only; used inside the server process under test.
"""

from __future__ import annotations

import asyncio
import math
import time
from dataclasses import asdict, dataclass
from typing import Final

PERIOD: Final = 0.001


@dataclass(frozen=True)
class LagStats:
    """Summary of the lateness samples of one window, in seconds."""

    samples: int
    seconds: float  # length of the window
    p50: float
    p99: float
    p999: float
    max: float

    def as_json(self) -> dict[str, float]:
        return asdict(self)


def _rank(ordered: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]


def summarize(samples: list[float], seconds: float) -> LagStats:
    if not samples:
        return LagStats(0, seconds, 0.0, 0.0, 0.0, 0.0)
    ordered = sorted(samples)
    return LagStats(
        len(ordered),
        seconds,
        _rank(ordered, 50),
        _rank(ordered, 99),
        _rank(ordered, 99.9),
        ordered[-1],
    )


class LagProbe:
    """`start()` begins a window, `stop()` ends it and summarizes it; idle in between."""

    def __init__(self, period: float = PERIOD) -> None:
        self._period = period
        self._samples: list[float] = []
        self._task: asyncio.Task[None] | None = None
        self._started = 0.0

    def start(self) -> None:
        if self._task is None:
            self._samples = []
            self._started = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="lag-probe")

    async def stop(self) -> LagStats:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        return summarize(self._samples, time.monotonic() - self._started)

    async def _run(self) -> None:
        record = self._samples.append
        while True:
            expected = time.monotonic() + self._period
            await asyncio.sleep(self._period)
            record(max(0.0, time.monotonic() - expected))
