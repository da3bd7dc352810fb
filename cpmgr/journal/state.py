"""The journal's records and what each one does to the state per shard (no I/O)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

from cpmgr.protocol import decode_cursor

Key = tuple[str, int]
Entry = tuple[str, int, str, str | None]
"""An accepted checkpoint as the journal is handed it: group, shard, checkpoint, consumer."""


@dataclass(frozen=True)
class ShardRecord:
    """What replay restores per (group, shard)."""

    group: str
    shard: int
    latest: str
    """Newest accepted checkpoint: the regression baseline."""
    consumer: str | None
    """The consumer that came with `latest`."""
    committed: str | None
    """Last value known committed to SLS (None if unknown)."""


Shard = tuple[str, int, str, str | None, str | None, int]
"""A shard's state in memory: its ShardRecord's fields (group, shard, latest, consumer,
committed) plus `seq`, the sequence number of the record that set `latest` (or, for a
snapshot's shards, of the snapshot). A plain tuple: the writer thread makes one per shard of
every run of accepted records while it holds the GIL, and the garbage collector stops tracking
a tuple of strings and numbers, while it tracks a NamedTuple (a tuple subclass) for good:
100,000 of those made every full collection, which holds the event loop too, take tens of
milliseconds longer."""
GROUP: Final = 0
SHARD: Final = 1
LATEST: Final = 2
CONSUMER: Final = 3
COMMITTED: Final = 4
SEQ: Final = 5


def public(state: Shard) -> ShardRecord:
    return ShardRecord(*state[:SEQ])


@dataclass(frozen=True, slots=True)
class Accepted:
    seq: int
    group: str
    shard: int
    checkpoint: str
    consumer: str | None


@dataclass(frozen=True, slots=True)
class Committed:
    seq: int
    group: str
    shard: int
    checkpoint: str
    latest_seq: int | None = None
    """The committed value was the shard's latest, set by the record with this `seq`."""
    older_than: int | None = None
    """The committed value is older than the shard's latest, set by the record with this `seq`."""


@dataclass(frozen=True, slots=True)
class Dropped:
    """SLS refused this value for good: it is no longer pending (nor a baseline)."""

    seq: int
    group: str
    shard: int
    checkpoint: str


LogRecord = Accepted | Committed | Dropped
Shards = dict[Key, Shard]
Undo = tuple[Key, Shard | None, Shard | None]
"""A change to one shard: (key, the state it set, the state before it)."""


def committed_record(
    shards: Shards, seq: int, group: str, shard: int, checkpoint: str
) -> Committed:
    """A committed record naming the record that set the shard's latest value now."""
    state = shards.get((group, shard))
    if state is None:
        return Committed(seq, group, shard, checkpoint)
    if state[LATEST] == checkpoint:
        return Committed(seq, group, shard, checkpoint, latest_seq=state[SEQ])
    return Committed(seq, group, shard, checkpoint, older_than=state[SEQ])


def accept(shards: Shards, key: Key, checkpoint: str, consumer: str | None, seq: int) -> Undo:
    """Apply an accepted record (the common one, so without building it); return the undo."""
    prev = shards.get(key)
    committed = prev[COMMITTED] if prev else None
    new: Shard = (key[0], key[1], checkpoint, consumer, committed, seq)
    shards[key] = new
    return key, new, prev


def accept_columns(
    shards: Shards,
    group: str,
    columns: tuple[Sequence[int], Sequence[str], Sequence[str | None]],
    first_seq: int,
    changes: list[Undo],
) -> None:
    """Apply accepted records of one group, given as columns (shards, checkpoints,
    consumers) numbered from `first_seq`, adding the undos to `changes`. A shard given several
    values ends with the last, as if each were applied in turn, but is set once: one step per
    shard, not per record."""
    numbers, checkpoints, consumers = columns
    last = dict(zip(numbers, range(len(numbers)), strict=True))  # each shard's last value
    get = shards.get
    for shard, index in last.items():
        key = (group, shard)
        prev = get(key)
        committed = None if prev is None else prev[COMMITTED]
        new: Shard = (
            group,
            shard,
            checkpoints[index],
            consumers[index],
            committed,
            first_seq + index,
        )
        shards[key] = new
        changes.append((key, new, prev))


def apply(shards: Shards, rec: LogRecord) -> Undo:
    """Apply one log record; return what undoes it."""
    if isinstance(rec, Accepted):
        return accept(shards, (rec.group, rec.shard), rec.checkpoint, rec.consumer, rec.seq)
    key = (rec.group, rec.shard)
    prev = shards.get(key)
    new = _committed(prev, rec) if isinstance(rec, Committed) else _dropped(prev, rec)
    if new is None:
        shards.pop(key, None)
    else:
        shards[key] = new
    return key, new, prev


def _committed(prev: Shard | None, rec: Committed) -> Shard:
    if prev is None or _lost_newer_than(prev, rec):
        # Replay lacks the record that held the latest value when this one was written, so
        # what it has instead may be older than the committed value, and committing that
        # would move SLS backwards: the committed value is the baseline.
        return (rec.group, rec.shard, rec.checkpoint, None, rec.checkpoint, _baseline_seq(rec))
    group, shard, latest, consumer, _committed, seq = prev
    return (group, shard, latest, consumer, rec.checkpoint, seq)


def _baseline_seq(rec: Committed) -> int:
    """The seq of a shard whose latest value replay takes from `rec`'s committed value. With
    `l`, that value is the one record `latest_seq` set. With `o`, record `older_than` set a
    newer one, which replay lacks: the seq stays below it, so a later `c` record written
    against that lost value (naming it with `l` or `o`) still finds it lost, instead of
    taking the older baseline for it (which left the older value pending under a newer
    committed one)."""
    if rec.latest_seq is not None:
        return rec.latest_seq
    if rec.older_than is not None:
        return rec.older_than - 1
    return rec.seq


def _lost_newer_than(prev: Shard, rec: Committed) -> bool:
    """Whether `prev` misses the latest value `rec` was written against and is older than the
    committed value (when it was older than that latest, cursors tell the order)."""
    if rec.latest_seq is not None:
        return prev[SEQ] < rec.latest_seq
    if rec.older_than is None or prev[SEQ] >= rec.older_than:
        return False
    ours, committed = decode_cursor(prev[LATEST]), decode_cursor(rec.checkpoint)
    return ours is not None and committed is not None and ours < committed


def _dropped(prev: Shard | None, rec: Dropped) -> Shard | None:
    """The dropped value stops being pending and a baseline, as in the store; a newer value
    accepted since stays."""
    if prev is None or prev[LATEST] != rec.checkpoint:
        return prev
    committed = prev[COMMITTED]
    if committed is None:
        return None
    return (prev[GROUP], prev[SHARD], committed, None, committed, rec.seq)


def undo(shards: Shards, changes: Iterable[Undo]) -> None:
    """Revert `changes` (newest first), except where a later change replaced them."""
    for key, new, prev in reversed(list(changes)):
        if shards.get(key) is not new:
            continue
        if prev is None:
            shards.pop(key, None)
        else:
            shards[key] = prev


def by_key(shards: Iterable[Shard]) -> list[Shard]:
    return sorted(shards, key=lambda r: (r[GROUP], r[SHARD]))
