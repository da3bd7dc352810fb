"""A concurrency limit that follows AIMD: halve on throttling, creep back on success."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

__all__ = ["ConcurrencyLimiter"]


class ConcurrencyLimiter:
    """A semaphore whose size follows AIMD: halve on throttling, creep back on success.

    Waiters are served first come, first served. A cancelled waiter is left in the queue and
    skipped when its turn comes (removing it would cost O(n), and racing a wake-up in the same
    loop turn is what made an eager removal fail).
    """

    def __init__(
        self,
        maximum: int,
        *,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_use = 0
        self._cooldown = cooldown
        self._clock = clock
        self._last_decrease = -float("inf")
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    def try_acquire(self) -> bool:
        """Take a slot if one is free now and nobody waits for one; True if taken."""
        self._drop_abandoned()
        if self.in_use < self.current and not self._waiters:
            self.in_use += 1
            return True
        return False

    async def acquire(self) -> None:
        if self.try_acquire():
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def _drop_abandoned(self) -> None:
        while self._waiters and self._waiters[0].done():
            self._waiters.popleft()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.current:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    def throttled(self) -> bool:
        """Halve the limit (at most once per cooldown); True if it changed."""
        now = self._clock()
        if now - self._last_decrease < self._cooldown or self.limit <= 1:
            return False
        self._last_decrease = now
        self.limit = max(1.0, self.limit / 2)
        return True

    def succeeded(self) -> bool:
        """Grow the limit by about one per window of successes; True if the integer changed."""
        if self.limit >= self.maximum:
            return False
        before = self.current
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        self._wake()
        return self.current != before

    def resize(self, maximum: int) -> None:
        """A new maximum (reload); the current limit never exceeds it."""
        self.maximum = maximum
        self.limit = min(self.limit, float(maximum))
        self._wake()
