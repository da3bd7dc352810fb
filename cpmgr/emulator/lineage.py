"""SplitShard and MergeShards over a logstore's shards: read-only parents, children with lineage.

Pure functions on the shard table (no clock, no I/O): the caller passes the creation time and
turns a `LineageError` into the SLS error answer.

Decisions where SLS is silent:
- New shard ids continue after the highest id of the logstore, in hash order.
- A split needs `key` strictly inside the parent's range, or `shardCount` N (2..64) for N
  equal parts; both together only when N is 2. A read-only shard cannot be split or merged.
- A merge takes the read-write shard whose range starts where the named one ends.
- The answer lists the parent first, then the children, for a split; the child first, then the
  parents, for a merge (the two orders SLS's documentation shows).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, MutableMapping

from cpmgr.emulator.shards import HASH_SPACE, Shard

MAX_SPLIT_COUNT = 64
_HASH_KEY = re.compile(r"[0-9a-fA-F]{32}")


class LineageError(ValueError):
    """A split or merge SLS would refuse with ParameterInvalid; the message says why."""


def _writable(shards: Mapping[int, Shard], shard_id: int) -> Shard:
    shard = shards.get(shard_id)
    if shard is None:
        raise LineageError(f"invalid shard id {shard_id}: no such shard")
    if shard.read_only:
        raise LineageError(f"shard {shard_id} is read-only: it cannot be split or merged")
    return shard


def _split_points(shard: Shard, key: str | None, count: int | None) -> list[int]:
    """The hash keys where the children of `shard` begin, after its own begin."""
    begin, end = int(shard.begin_key, 16), _exclusive_end(shard)
    if key is not None:
        if count not in (None, 2):
            raise LineageError("give key or shardCount, not both (unless shardCount is 2)")
        if not _HASH_KEY.fullmatch(key):
            raise LineageError(f"invalid key {key!r}: 32 hexadecimal digits expected")
        point = int(key, 16)
        if not begin < point < end:
            raise LineageError(
                f"key {key} is not inside the shard's range [{shard.begin_key}, {shard.end_key})"
            )
        return [point]
    if count is None:
        raise LineageError("give the split key or shardCount")
    if not 2 <= count <= MAX_SPLIT_COUNT or end - begin < count:
        raise LineageError(f"invalid shardCount {count}: 2 to {MAX_SPLIT_COUNT} expected")
    return [begin + (end - begin) * part // count for part in range(1, count)]


def _child(
    shard_id: int, begin: int, end: int, parents: tuple[int, ...], create_time: int
) -> Shard:
    child = Shard.create(shard_id, begin_key=begin, end_key=end, create_time=create_time)
    child.parents = parents
    return child


def _next_id(shards: Mapping[int, Shard]) -> int:
    return max(shards, default=-1) + 1


def _exclusive_end(shard: Shard) -> int:
    # The last range's end is shown as ff..ff (32 digits) but stands for the whole space.
    end = int(shard.end_key, 16)
    return HASH_SPACE if end == HASH_SPACE - 1 else end


def split_shard(
    shards: MutableMapping[int, Shard],
    shard_id: int,
    *,
    key: str | None,
    count: int | None,
    create_time: int,
) -> list[Shard]:
    """Split a read-write shard: it turns read-only (its end frozen) and new read-write
    children partition its range. Returns [parent, *children]."""
    parent = _writable(shards, shard_id)
    points = _split_points(parent, key, count)
    edges = [int(parent.begin_key, 16), *points, _exclusive_end(parent)]
    first = _next_id(shards)
    children = [
        _child(first + i, edges[i], edges[i + 1], (parent.shard_id,), create_time)
        for i in range(len(edges) - 1)
    ]
    parent.status = "readonly"
    for child in children:
        shards[child.shard_id] = child
    return [parent, *children]


def merge_shards(
    shards: MutableMapping[int, Shard], shard_id: int, *, create_time: int
) -> list[Shard]:
    """Merge a read-write shard with the read-write shard right of it: both turn read-only and
    one child covers their union. Returns [child, left, right]."""
    left = _writable(shards, shard_id)
    right = next(
        (s for s in shards.values() if not s.read_only and s.begin_key == left.end_key), None
    )
    if right is None:
        raise LineageError(f"shard {shard_id} has no read-write shard adjacent on its right")
    child = _child(
        _next_id(shards),
        int(left.begin_key, 16),
        _exclusive_end(right),
        (left.shard_id, right.shard_id),
        create_time,
    )
    left.status = right.status = "readonly"
    shards[child.shard_id] = child
    return [child, left, right]


def ancestors(shards: Mapping[int, Shard], shard: Shard) -> set[int]:
    """Every shard `shard` descends from (parents, their parents, ...)."""
    found: set[int] = set()
    stack = list(shard.parents)
    while stack:
        parent = stack.pop()
        if parent in found:
            continue
        found.add(parent)
        known = shards.get(parent)
        if known is not None:
            stack.extend(known.parents)
    return found
