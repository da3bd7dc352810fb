"""Limits on the committer: a concurrency limit that follows AIMD (halve on throttling, creep
back on success), and a budget of commits per event-loop turn."""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable

__all__ = ["ConcurrencyLimiter", "TurnBudget"]


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


class TurnBudget:
    """At most `per_turn` passes per event-loop turn; later callers wait for a later turn.

    Why: the answers to up to `max_in_flight` UpdateCheckPoint requests can arrive together,
    and each worker that resumes settles its shard and builds, signs and sends the next request
    (about 100 µs of CPU). Resumed in one turn, 32 of them hold the loop for 3 ms or more while
    the consumers' lines wait; through the budget, each turn runs a few and the loop reads the
    socket in between. It only interleaves: no time passes, so the commit rate stays what the
    CPU allows. Waiters are served first come, first served; a cancelled one is skipped. Those
    woken for a turn run beside that turn's own first passes, so a turn sees at most twice
    `per_turn`.
    """

    def __init__(self, per_turn: int) -> None:
        if per_turn < 1:
            raise ValueError("per_turn must be >= 1")
        self._per_turn = per_turn
        self._spent = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    async def pass_(self) -> None:
        """Return in this turn if its budget allows, else in a later turn that has room."""
        if self._spent < self._per_turn and not self._waiters:
            if self._spent == 0:
                asyncio.get_running_loop().call_soon(self._next_turn)
            self._spent += 1
            return
        # Spent or queued: a `_next_turn` is scheduled already.
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        await waiter

    def _next_turn(self) -> None:
        """Start a turn's budget: wake the first waiters (they run in the next turn, which
        this budget then covers) and look again a turn later while some still wait."""
        self._spent = 0
        waiters = self._waiters
        while waiters and self._spent < self._per_turn:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                self._spent += 1
        if waiters or self._spent:
            asyncio.get_running_loop().call_soon(self._next_turn)
