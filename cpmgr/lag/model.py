"""Lag arithmetic and its values, without I/O: cursors -> log groups, receive times -> seconds,
and the `ok` / `lagging` / `stalled` state of a shard (docs/operations.md "Consumer lag")."""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Literal

LagState = Literal["ok", "lagging", "stalled"]


def cursor_position(cursor: str) -> int:
    """The integer inside a cursor (base64 of a decimal integer); ValueError otherwise."""
    try:
        digits = base64.b64decode(cursor.strip().encode("ascii"), validate=True).decode("ascii")
    except (UnicodeError, binascii.Error) as exc:
        raise ValueError(f"not a cursor: {cursor!r}") from exc
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"not a cursor: {cursor!r}")
    return int(digits)


def cursor_at(position: int) -> str:
    """The cursor of a position, as SLS writes it."""
    return base64.b64encode(str(position).encode("ascii")).decode("ascii")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """`lag.lagging_after` and `lag.stall_after`, in seconds."""

    lagging_after: float
    stall_after: float


def classify(
    *,
    log_groups: int,
    seconds: float,
    has_checkpoint: bool,
    unchanged_for: float,
    thresholds: Thresholds,
) -> LagState:
    """A shard's state: stalled wins over lagging; a shard without a checkpoint is `ok` until
    it has stood still for `stall_after` (nobody has started on it yet)."""
    if log_groups > 0 and unchanged_for >= thresholds.stall_after:
        return "stalled"
    if has_checkpoint and seconds > thresholds.lagging_after:
        return "lagging"
    return "ok"


@dataclass(frozen=True, slots=True)
class ShardLag:
    """One shard's reading: how far the group is behind on it, and since when it is known."""

    shard: int
    log_groups: int
    seconds: float
    state: LagState
    at: float  # unix time of the reading

    def fields(self) -> dict[str, object]:
        """The `lag` object of a `get` entry."""
        return {
            "log_groups": self.log_groups,
            "seconds": self.seconds,
            "state": self.state,
            "at": self.at,
        }


@dataclass(frozen=True, slots=True)
class GroupLag:
    """One group's reading: per shard, and summed (log groups) or maxed (seconds) over them."""

    at: float
    shards: dict[int, ShardLag]
    log_groups: int
    seconds: float
    stalled: int
    lagging: int

    def fields(self) -> dict[str, object]:
        """The `lag` object of a group in `status`."""
        return {
            "log_groups": self.log_groups,
            "seconds": self.seconds,
            "stalled": self.stalled,
            "lagging": self.lagging,
            "shards": len(self.shards),
            "at": self.at,
        }


class Tally:
    """A group's reading being built shard by shard, each in O(1)."""

    def __init__(self) -> None:
        self.shards: dict[int, ShardLag] = {}
        self._log_groups = 0
        self._seconds = 0.0
        self._states = {"ok": 0, "lagging": 0, "stalled": 0}

    def add(self, lag: ShardLag) -> None:
        self.shards[lag.shard] = lag
        self._log_groups += lag.log_groups
        self._seconds = max(self._seconds, lag.seconds)
        self._states[lag.state] += 1

    def result(self, at: float) -> GroupLag:
        return GroupLag(
            at=at,
            shards=self.shards,
            log_groups=self._log_groups,
            seconds=self._seconds,
            stalled=self._states["stalled"],
            lagging=self._states["lagging"],
        )
