"""The emulator's shards: hash ranges, status, and the log groups their cursors address.

A cursor is standard base64 of an ASCII decimal integer, one step per log group. A shard's begin
cursor is its oldest log group and its end cursor the position of the next write (no data yet).
Receive times are kept as runs (first cursor, unix second), so a shard written to at a steady
rate costs memory per second, not per log group, and time -> cursor is a binary search.

Decisions where SLS is silent:
- Cursor integers start at the shard's creation time in nanoseconds: they look like SLS's and
  are never confused across shards in a test's output (cursors compare within one shard only).
- Receive times never go backwards within a shard (a wall clock stepping back is clamped), so
  time -> cursor is monotonic.
- GetCursorTime accepts every cursor in [begin, end]: the end cursor (no data yet) answers the
  newest log group's receive time, or the shard's creation time while it holds none, so the
  "previous cursor time" of PY's `normalize` clamping always has an answer.
"""

from __future__ import annotations

import base64
import binascii
from bisect import bisect_left, bisect_right
from dataclasses import dataclass, field
from typing import Literal

ShardStatus = Literal["readwrite", "readonly"]
HASH_SPACE = 1 << 128
NANOSECONDS = 1_000_000_000


def encode_cursor(position: int) -> str:
    """A cursor as SLS writes it: base64 (with padding) of the decimal integer."""
    return base64.b64encode(str(position).encode("ascii")).decode("ascii")


def decode_cursor(cursor: str) -> int:
    """The integer inside a cursor; ValueError if it is not base64 of decimal digits."""
    try:
        digits = base64.b64decode(cursor.encode("ascii"), validate=True).decode("ascii")
    except (UnicodeError, binascii.Error) as exc:
        raise ValueError(f"not a cursor: {cursor!r}") from exc
    if not (digits.isascii() and digits.isdigit()):
        raise ValueError(f"not a cursor: {cursor!r}")
    return int(digits)


def hash_key(value: int) -> str:
    """A position in the MD5 hash space as ListShards shows it: 32 hex digits."""
    return f"{min(value, HASH_SPACE - 1):032x}"


@dataclass
class Shard:
    """One shard: its key range [begin_key, end_key), status, lineage and cursor positions."""

    shard_id: int
    begin_key: str
    end_key: str
    create_time: int  # unix seconds
    status: ShardStatus = "readwrite"
    parents: tuple[int, ...] = ()  # the shard(s) it was split or merged from
    begin: int = 0  # cursor integer of the oldest log group
    end: int = 0  # cursor integer of the next write
    # Runs of log groups received in the same second: run i starts at _run_starts[i].
    _run_starts: list[int] = field(default_factory=list, repr=False)
    _run_times: list[int] = field(default_factory=list, repr=False)

    @classmethod
    def create(cls, shard_id: int, *, begin_key: int, end_key: int, create_time: int) -> Shard:
        """A new, empty, read-write shard covering hash keys [begin_key, end_key)."""
        start = create_time * NANOSECONDS
        return cls(
            shard_id,
            hash_key(begin_key),
            hash_key(end_key),
            create_time,
            begin=start,
            end=start,
        )

    @property
    def begin_cursor(self) -> str:
        return encode_cursor(self.begin)

    @property
    def end_cursor(self) -> str:
        return encode_cursor(self.end)

    @property
    def read_only(self) -> bool:
        return self.status == "readonly"

    def append(self, count: int, receive_time: int) -> None:
        """Write `count` log groups received at `receive_time`; a read-only shard refuses."""
        if self.read_only:
            raise ValueError(f"shard {self.shard_id} is read-only: its end cursor is frozen")
        if count <= 0:
            return
        last = self._run_times[-1] if self._run_times else None
        if last is None or receive_time > last:
            self._run_starts.append(self.end)
            self._run_times.append(receive_time)
        # else: same second, or a clock that stepped back, joins the last run
        self.end += count

    def cursor_at(self, unix_time: int) -> int:
        """The first log group received at or after `unix_time`; the end if none is.

        A time before the oldest data gives the begin cursor.
        """
        index = bisect_left(self._run_times, unix_time)
        if index == len(self._run_times):
            return self.end
        return max(self.begin, self._run_starts[index])

    def receive_time(self, position: int) -> int | None:
        """When the log group at `position` arrived; None outside [begin, end)."""
        if not self.begin <= position < self.end:
            return None
        return self._run_times[bisect_right(self._run_starts, position) - 1]

    def cursor_time(self, position: int) -> int:
        """GetCursorTime: when the log group at `position` arrived (see the module docstring
        for the end cursor); ValueError outside [begin, end]."""
        if not self.begin <= position <= self.end:
            raise ValueError(f"cursor {position} is outside [{self.begin}, {self.end}]")
        if position == self.end:
            return self._run_times[-1] if self._run_times else self.create_time
        return self._run_times[bisect_right(self._run_starts, position) - 1]

    def listing(self) -> dict[str, object]:
        """The shard as one entry of a ListShards answer."""
        return {
            "shardID": self.shard_id,
            "status": self.status,
            "inclusiveBeginKey": self.begin_key,
            "exclusiveEndKey": self.end_key,
            "createTime": self.create_time,
        }


def initial_shards(count: int, create_time: int) -> dict[int, Shard]:
    """`count` read-write shards 0..count-1 dividing the hash space into equal ranges."""
    return {
        number: Shard.create(
            number,
            begin_key=number * HASH_SPACE // count,
            end_key=(number + 1) * HASH_SPACE // count,
            create_time=create_time,
        )
        for number in range(count)
    }
