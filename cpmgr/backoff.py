"""Exponential backoff with full jitter: a pure function of the attempt and a random source."""

from __future__ import annotations

from collections.abc import Callable

# 2.0 ** 1024 overflows a float: a very large max_attempts must not crash the retry loop.
_MAX_EXPONENT = 62


def backoff_delay(
    attempt: int, *, initial: float, maximum: float, rng: Callable[[], float]
) -> float:
    """Seconds to wait before retry `attempt` (1-based): uniform in [0, min(maximum,
    initial * 2 ** (attempt - 1))). `rng` returns a float in [0, 1), like random.random."""
    ceiling = min(maximum, initial * 2.0 ** min(max(0, attempt - 1), _MAX_EXPONENT))
    return ceiling * rng()
