"""The table of checkpoints per (group, shard): latest accepted, in flight, committed. No I/O.

Every accepted value gets a sequence number, monotonic across the store. The committer takes a
snapshot (at most one value in flight per shard) and reports each outcome back; an outcome only
ever affects the value it was for, so an older value's late answer never overwrites a newer one.

Decisions where the contract is silent:
- After a permanent failure the dropped value no longer guards against regressions: the next
  commit is compared with the committed value.
- A value equal to the committed one, accepted while nothing is in flight and nothing was sent
  since the last success, cancels any pending value and costs no request. Otherwise it is
  pending like any other value: a request in flight, or one that failed (a timeout is no proof
  it did not land), may have changed the server's value.
- `dirty_since` is kept while a shard stays dirty; when a commit succeeds and a newer value is
  still pending, it moves to when the first value after the committed one was accepted.
- A value equal to the pending one is a no-op; a consumer sent with it replaces the pending
  value's consumer.
- A success clears the shard's `last_error`.
- Settled means verified: an attempt that may have landed without an answer (a timeout, a
  reset) can still be applied by SLS until `until` (the committer passes its send time plus
  2 x `request_timeout`). A success for an attempt sent before that proves nothing about what
  SLS holds afterwards, so the value stays pending (and `committed` stays the last settled
  value) until an attempt sent after `until` succeeds.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Final, Literal, Protocol, cast

from cpmgr.errors import ProtocolError
from cpmgr.gcpolicy import untrack
from cpmgr.protocol import ItemColumns, decode_cursor

__all__ = [
    "Attempt",
    "CheckpointStore",
    "ErrorInfo",
    "ItemLike",
    "Settlement",
    "ShardView",
]

Settlement = Literal["committed", "dropped", "pending"]


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """The last failure seen for a shard: its code, message and unix time."""

    code: str
    message: str
    at: float

    def __post_init__(self) -> None:
        untrack(self)  # strings and a float: a shard's last error, kept per shard


@dataclass(frozen=True, slots=True)
class Attempt:
    """One value handed to the committer; `seq` identifies it in every outcome call."""

    group: str
    shard: int
    checkpoint: str
    consumer: str | None
    seq: int


@dataclass(frozen=True, slots=True)
class ShardView:
    """What get, status and metrics show of one shard."""

    group: str
    shard: int
    pending: str | None
    committed: str | None
    committed_at: float | None
    last_error: ErrorInfo | None
    dirty_since: float | None
    in_flight: bool


class ItemLike(Protocol):
    """One checkpoint of a batch (protocol.CommitItem fits)."""

    @property
    def shard(self) -> int: ...
    @property
    def checkpoint(self) -> str: ...
    @property
    def consumer(self) -> str | None: ...
    @property
    def index(self) -> int: ...
    @property
    def number(self) -> int | None: ...


# A value: (checkpoint, the number it encodes, consumer, seq). A plain tuple of strings and
# ints, which the garbage collector stops tracking: with a tracked object per value, a full
# collection at 100,000 shards held the loop for over 100 ms.
_Value = tuple[str, int | None, str | None, int]
_CHECKPOINT: Final = 0
_NUMBER: Final = 1
_CONSUMER: Final = 2
_SEQ: Final = 3


class _Shard:
    __slots__ = (
        "ambiguous_until",
        "committed",
        "committed_at",
        "dirty_since",
        "dropped_seq",
        "in_flight",
        "last_error",
        "newer_since",
        "pending",
        "uncertain",
    )

    def __init__(self) -> None:
        self.pending: _Value | None = None
        self.committed: _Value | None = None
        self.committed_at: float | None = None
        self.in_flight: int | None = None  # seq of the value out with the committer
        self.dropped_seq = 0  # highest seq given up by a permanent failure
        self.last_error: ErrorInfo | None = None
        self.dirty_since: float | None = None
        # When the first value newer than the one in flight was accepted: where dirty_since
        # moves if the in-flight value succeeds.
        self.newer_since: float | None = None
        # A value was sent since the last success: the server may hold it (a timeout is no
        # proof it did not land), so `committed` no longer says what the server has.
        self.uncertain = False
        # Until when an unanswered attempt may still be applied by the server (the committer's
        # monotonic clock); 0 when no such attempt is outstanding.
        self.ambiguous_until = 0.0
        # It holds strings, numbers, plain tuples and an ErrorInfo, never anything that could
        # refer back to it: one per shard, the garbage collector need not scan it.
        untrack(self)

    @property
    def committed_seq(self) -> int:
        return self.committed[_SEQ] if self.committed is not None else 0

    def guard(self) -> _Value | None:
        """The value a new commit must not go back from: pending, else committed."""
        return self.pending if self.pending is not None else self.committed


# A set keeps its table after a backlog drains; rebuild it when it is this much emptier.
_SHRINK_FACTOR = 8
_SHRINK_MIN = 1024


# How many forgotten shards per group still show their last error in `get`.
_RECENT_DROPS = 1024


def _untracked_set(shards: Iterable[int] = ()) -> set[int]:
    """A set of shard numbers the garbage collector does not walk (a set is never tracked
    again once untracked)."""
    numbers = set(shards)
    untrack(numbers)
    return numbers


class _Group:
    __slots__ = (
        "dirty",
        "dirty_peak",
        "failures",
        "last_seq",
        "last_success",
        "recent_drops",
        "shards",
    )

    def __init__(self) -> None:
        # The two tables with an entry per shard. They hold shard numbers and untracked
        # records, which cannot refer back to them, so the garbage collector need not walk
        # them either (at 100,000 shards that walk was most of what a full collection did).
        self.shards: dict[int, _Shard] = {}
        self.dirty: set[int] = _untracked_set()
        self.dirty_peak = 0
        self.failures = 0
        self.last_seq = 0  # seq of the newest value accepted into the group
        self.last_success: float | None = None
        # Shards forgotten after their only value was dropped: their last error, newest last.
        self.recent_drops: collections.OrderedDict[int, ErrorInfo] = collections.OrderedDict()

    def add(self, shard: int) -> _Shard:
        """A new, empty record for `shard` (replacing any)."""
        state = self.shards[shard] = _Shard()
        untrack(self.shards)  # storing an object in a dict makes the collector track it again
        return state

    def forget(self, shard: int, error: ErrorInfo) -> None:
        """Stop tracking a shard that holds nothing (no value pending, none committed)."""
        del self.shards[shard]
        self.recent_drops[shard] = error
        self.recent_drops.move_to_end(shard)
        if len(self.recent_drops) > _RECENT_DROPS:
            self.recent_drops.popitem(last=False)

    def mark_dirty(self, shard: int) -> None:
        self.dirty.add(shard)
        self.dirty_peak = max(self.dirty_peak, len(self.dirty))

    def mark_clean(self, shard: int) -> None:
        self.dirty.discard(shard)
        if self.dirty_peak >= _SHRINK_MIN and len(self.dirty) * _SHRINK_FACTOR < self.dirty_peak:
            self.dirty = _untracked_set(self.dirty)
            self.dirty_peak = len(self.dirty)


class CheckpointStore:
    """Latest accepted, in-flight and committed checkpoint of every (group, shard)."""

    def __init__(self, groups: Iterable[str], *, clock: Callable[[], float] = time.time) -> None:
        self._groups: dict[str, _Group] = {name: _Group() for name in groups}
        self._clock = clock
        self._seq = 0

    # --- groups ---------------------------------------------------------------------------

    def groups(self) -> list[str]:
        """The group names, in the order they were added."""
        return list(self._groups)

    def add_group(self, name: str) -> None:
        """Start tracking a group (no-op if it is tracked already)."""
        self._groups.setdefault(name, _Group())

    def remove_group(self, name: str) -> None:
        """Forget a group and all its shards (flush it first: nothing is kept)."""
        self._groups.pop(name, None)

    def _group(self, name: str) -> _Group:
        group = self._groups.get(name)
        if group is None:
            raise ProtocolError("UnknownGroup", f"unknown group {name!r}")
        return group

    # --- accepting ------------------------------------------------------------------------

    def accept(
        self,
        group: str,
        shard: int,
        checkpoint: str,
        *,
        consumer: str | None = None,
        force: bool = False,
        number: int | Literal[False] | None = False,
    ) -> int:
        """Accept a checkpoint; returns the seq of the value now pending (or of the equal value
        already pending or committed). Raises ProtocolError CheckpointRegression when it is
        older than the latest accepted value, unless `force`. `number` is the cursor the
        checkpoint encodes, when the caller decoded it already."""
        table = self._group(group)
        state = table.shards.get(shard)
        if number is False:
            number = decode_cursor(checkpoint)
        if state is not None and not force:
            _check_regression(state, shard, checkpoint, number, "")
        return self._apply(table, shard, checkpoint, number=number, consumer=consumer)

    def check(
        self,
        group: str,
        shard: int,
        checkpoint: str,
        *,
        force: bool = False,
        number: int | Literal[False] | None = False,
    ) -> bool:
        """Raise what accept() would raise, changing nothing; whether the shard is tracked."""
        state = self._group(group).shards.get(shard)
        if state is None:
            return False
        if not force:
            if number is False:
                number = decode_cursor(checkpoint)
            _check_regression(state, shard, checkpoint, number, "")
        return True

    def check_batch(self, group: str, items: Sequence[ItemLike], *, force: bool = False) -> None:
        """Raise what accept_batch() would raise, changing nothing."""
        table = self._group(group)
        columns = _columns(items)
        _check_columns(list(map(table.shards.get, columns.shards)), columns, force=force)

    def accept_batch(
        self, group: str, items: Sequence[ItemLike], *, force: bool = False
    ) -> dict[int, int]:
        """Accept several checkpoints all-or-nothing; returns {shard: seq}. A regression in any
        item (named by its index) refuses them all. A shard given twice keeps the last."""
        seqs: list[int] = []
        shards = self._accept_columns(group, _columns(items), force=force, seqs=seqs)
        return dict(zip(shards, seqs, strict=True))

    def accept_all(self, group: str, items: Sequence[ItemLike], *, force: bool = False) -> None:
        """What accept_batch() does, without the seqs (the socket's common batch)."""
        self._accept_columns(group, _columns(items), force=force, seqs=None)

    def _accept_columns(
        self, group: str, columns: ItemColumns, *, force: bool, seqs: list[int] | None
    ) -> list[int]:
        table = self._group(group)
        states = list(map(table.shards.get, columns.shards))
        plain = _check_columns(states, columns, force=force)
        if plain is not None and columns.distinct():
            self._replace_pending(table, plain, columns, seqs)
        else:
            self._apply_columns(table, states, columns, seqs)
        return columns.shards

    def _replace_pending(
        self, table: _Group, states: list[_Shard], columns: ItemColumns, seqs: list[int] | None
    ) -> None:
        """_apply() of plain items of distinct shards (see _check_columns): each new value
        just replaces the pending one, the shard stays dirty, nothing else changes."""
        first = self._seq + 1
        self._seq += len(states)
        numbered = range(first, self._seq + 1)
        values = zip(columns.checkpoints, columns.numbers, columns.consumers, numbered, strict=True)
        for state, value in zip(states, values, strict=True):
            state.pending = value
        table.last_seq = self._seq
        if table.recent_drops:  # a tracked shard is not among them, but a restored one may be
            for shard in columns.shards:
                table.recent_drops.pop(shard, None)
        if seqs is not None:
            seqs.extend(numbered)

    def _apply_columns(
        self,
        table: _Group,
        states: list[_Shard | None],
        columns: ItemColumns,
        seqs: list[int] | None,
    ) -> None:
        """_apply() each item in order (`states`: each item's shard before the batch), adding
        their seqs to `seqs` if given. The common item, a known shard taking a new value, is
        applied inline: a call per item cost a third of a batch."""
        now = self._clock()
        drops = table.recent_drops
        seq = self._seq
        newest = 0  # seq of the newest value applied inline
        for state, shard, checkpoint, number, consumer in zip(
            states,
            columns.shards,
            columns.checkpoints,
            columns.numbers,
            columns.consumers,
            strict=True,
        ):
            if (
                state is None
                or ((pending := state.pending) is not None and pending[_CHECKPOINT] == checkpoint)
                or (
                    (committed := state.committed) is not None
                    and committed[_CHECKPOINT] == checkpoint
                    and not state.uncertain
                )
            ):
                self._seq = seq
                applied = self._apply(table, shard, checkpoint, number=number, consumer=consumer)
                if seqs is not None:
                    seqs.append(applied)
                seq = self._seq
                continue
            # What _apply() does for a new value of a known shard.
            seq += 1
            newest = seq
            if drops:
                drops.pop(shard, None)
            state.pending = (checkpoint, number, consumer, seq)
            if seqs is not None:
                seqs.append(seq)
            if state.dirty_since is None:
                state.dirty_since = now
                table.mark_dirty(shard)
            if state.in_flight is not None and state.newer_since is None:
                state.newer_since = now
        self._seq = seq
        table.last_seq = max(table.last_seq, newest)

    def accept_checked(self, group: str, items: Sequence[ItemLike]) -> None:
        """Accept values in order that check() passed and nothing newer was accepted for
        since (the journal's reservations see to that), without checking them again."""
        table = self._group(group)
        columns = _columns(items)
        states = list(map(table.shards.get, columns.shards))
        self._apply_columns(table, states, columns, None)

    def _apply(
        self,
        table: _Group,
        shard: int,
        checkpoint: str,
        *,
        number: int | None,
        consumer: str | None,
    ) -> int:
        state = table.shards.get(shard)
        if state is None:
            state = table.add(shard)
        pending = state.pending
        if pending is not None and pending[_CHECKPOINT] == checkpoint:
            if consumer is not None:
                state.pending = (pending[0], pending[1], consumer, pending[3])
            return pending[_SEQ]
        committed = state.committed
        if committed is not None and committed[_CHECKPOINT] == checkpoint and not state.uncertain:
            if pending is None:
                return committed[_SEQ]
            if state.in_flight is None:
                # Back to what the remote side already has: nothing left to send. The new seq
                # marks the pending value it replaces as settled.
                self._seq += 1
                state.committed = (committed[0], committed[1], committed[2], self._seq)
                self._mark_clean(table, shard, state)
                return self._seq
        self._seq += 1
        table.last_seq = self._seq
        table.recent_drops.pop(shard, None)
        state.pending = (checkpoint, number, consumer, self._seq)
        if state.dirty_since is None:
            state.dirty_since = self._clock()
            table.mark_dirty(shard)
        if state.in_flight is not None and state.newer_since is None:
            state.newer_since = self._clock()
        return self._seq

    def restore(
        self,
        group: str,
        shard: int,
        latest: str,
        *,
        consumer: str | None = None,
        committed: str | None = None,
    ) -> None:
        """Replace a shard's state with what a journal replay found: `latest` becomes pending
        unless it equals `committed` (the last value known committed, None if unknown)."""
        table = self._group(group)
        state = table.add(shard)
        table.mark_clean(shard)
        if committed is not None:
            self._seq += 1
            state.committed = (committed, decode_cursor(committed), None, self._seq)
        if latest != committed:
            self._seq += 1
            state.pending = (latest, decode_cursor(latest), consumer, self._seq)
            state.dirty_since = self._clock()
            table.mark_dirty(shard)
            table.last_seq = self._seq

    # --- membership (docs/design.md "Handoffs") -------------------------------------------

    def newest_seq(self, group: str, shard: int) -> int:
        """The seq of the shard's newest accepted value (pending, else committed); 0 if none."""
        table = self._groups.get(group)
        state = table.shards.get(shard) if table is not None else None
        if state is None:
            return 0
        return state.pending[_SEQ] if state.pending is not None else state.committed_seq

    def seed(self, group: str, shard: int, committed: str | None) -> None:
        """A member acquired the shard: SLS's checkpoint (None: it has none) becomes the
        committed value, even if older than what was here, and a pending value from before
        is discarded, so the regression guard starts from what SLS holds."""
        table = self._group(group)
        state = table.shards.get(shard)
        if state is None:
            if committed is None:
                return
            state = table.add(shard)
        self._mark_clean(table, shard, state)
        state.uncertain = False
        self._seq += 1
        state.committed = (
            None if committed is None else (committed, decode_cursor(committed), None, self._seq)
        )
        if state.committed is None and state.in_flight is None:
            del table.shards[shard]

    def resend(self, group: str, shard: int, checkpoint: str, *, consumer: str) -> int:
        """Make `checkpoint` pending even if it equals the committed value (a read-only shard's
        end cursor: committing it again is what finishes the shard at SLS); its seq."""
        table = self._group(group)
        state = table.shards.get(shard)
        if state is not None:
            state.uncertain = True  # so the equal value is not taken for a no-op
        number = decode_cursor(checkpoint)
        return self._apply(table, shard, checkpoint, number=number, consumer=consumer)

    def pending_of_consumer(self, group: str, consumer: str) -> list[tuple[int, int]]:
        """(shard, seq) of every pending value of the group named for `consumer`."""
        table = self._groups.get(group)
        if table is None:
            return []
        shards = table.shards
        values = ((shard, shards[shard].pending) for shard in table.dirty)
        return [(s, v[_SEQ]) for s, v in values if v is not None and v[_CONSUMER] == consumer]

    def discard_pending(self, group: str, shard: int, error: ErrorInfo) -> str | None:
        """Drop the shard's pending value (its member no longer holds the shard, so SLS would
        refuse it); the checkpoint dropped, or None if nothing was pending. Counts a failure."""
        table = self._groups.get(group)
        state = table.shards.get(shard) if table is not None else None
        if table is None or state is None or state.pending is None:
            return None
        dropped = state.pending
        state.dropped_seq = max(state.dropped_seq, dropped[_SEQ])
        self._mark_clean(table, shard, state)
        self._record_failure(group, state, error)
        return dropped[_CHECKPOINT]

    # --- the committer's side -------------------------------------------------------------

    def pending_seqs(self, *, group: str | None = None) -> list[tuple[str, int, int]]:
        """(group, shard, seq) of every pending value (of one group), in or out of flight."""
        names = self._names(group)
        return [
            (name, shard, pending[_SEQ])
            for name in names
            for shard in sorted(self._groups[name].dirty)
            if (pending := self._groups[name].shards[shard].pending) is not None
        ]

    def pending_by_shard(self, group: str, shards: Iterable[int] | None = None) -> dict[int, int]:
        """{shard: seq} of every pending value of one group (or of those of `shards`), in or out
        of flight."""
        table = self._groups.get(group)
        if table is None:
            return {}
        known = table.shards
        chosen = table.dirty if shards is None else shards
        pending = [(s, state.pending) for s in chosen if (state := known.get(s)) is not None]
        return {shard: value[_SEQ] for shard, value in pending if value is not None}

    def _names(self, group: str | None) -> list[str]:
        if group is None:
            return list(self._groups)
        return [group] if group in self._groups else []

    def snapshot(
        self, *, group: str | None = None, shards: Collection[int] | None = None
    ) -> list[Attempt]:
        """Dirty shards not already in flight (optionally of one group / some shards), each
        marked in flight; ordered by group, then shard."""
        attempts: list[Attempt] = []
        for name in self._names(group):
            table = self._groups[name]
            candidates = table.dirty if shards is None else table.dirty.intersection(shards)
            for shard in sorted(candidates):
                state = table.shards[shard]
                if state.in_flight is None and state.pending is not None:
                    attempts.append(self._send(name, shard, state, state.pending))
        return attempts

    def dirty_shards(self, group: str) -> list[int]:
        """The group's dirty shards, in shard order (in flight or not)."""
        table = self._groups.get(group)
        return sorted(table.dirty) if table is not None else []

    def last_seq(self, group: str) -> int:
        """The seq of the newest value accepted into the group (0 if none)."""
        table = self._groups.get(group)
        return table.last_seq if table is not None else 0

    def begin(self, group: str, shard: int) -> Attempt | None:
        """The shard's pending value, now marked in flight; None if it is not dirty, already
        in flight, or unknown."""
        table = self._groups.get(group)
        state = table.shards.get(shard) if table is not None else None
        if state is None or state.in_flight is not None or state.pending is None:
            return None
        return self._send(group, shard, state, state.pending)

    def _send(self, group: str, shard: int, state: _Shard, value: _Value) -> Attempt:
        state.in_flight = value[_SEQ]
        state.uncertain = True
        state.newer_since = None
        return Attempt(group, shard, value[_CHECKPOINT], value[_CONSUMER], value[_SEQ])

    def refresh(self, attempt: Attempt) -> Attempt:
        """For a retry: the shard's newest pending value, now the one in flight."""
        state = self._state(attempt)
        if state is None or state.pending is None or state.in_flight != attempt.seq:
            return attempt
        if state.pending[_SEQ] == attempt.seq:
            return attempt
        value = state.pending
        self._send(attempt.group, attempt.shard, state, value)
        return replace(
            attempt, checkpoint=value[_CHECKPOINT], consumer=value[_CONSUMER], seq=value[_SEQ]
        )

    def on_ambiguous(self, attempt: Attempt, *, until: float) -> None:
        """The attempt got no answer: the server may still apply it until `until`."""
        state = self._state(attempt)
        if state is not None:
            state.ambiguous_until = max(state.ambiguous_until, until)

    def on_success(
        self, attempt: Attempt, *, at: float | None = None, sent_at: float | None = None
    ) -> bool:
        """The server answered success for the attempt's value. True if that settles it; False
        if an earlier unanswered attempt may still land after it (sent before the window of
        on_ambiguous() closed): the value then stays pending, to be sent again after
        `unsettled_until()`."""
        state = self._state(attempt)
        if state is None:
            return True
        if sent_at is not None and sent_at < state.ambiguous_until:
            self._release(state, attempt)
            return False
        state.ambiguous_until = 0.0
        self._settle(state, attempt, at)
        return True

    def unsettled_until(self, group: str, shard: int) -> float:
        """Until when an unanswered attempt may still land on the shard (0 if none)."""
        table = self._groups.get(group)
        state = table.shards.get(shard) if table is not None else None
        return state.ambiguous_until if state is not None else 0.0

    def _settle(self, state: _Shard, attempt: Attempt, at: float | None) -> None:
        table = self._groups[attempt.group]
        now = self._clock() if at is None else at
        newer_since = state.newer_since if state.in_flight == attempt.seq else None
        self._release(state, attempt)
        state.uncertain = False
        pending = state.pending
        if attempt.seq > state.committed_seq:
            state.committed = _sent_value(pending, attempt)
            state.committed_at = now
            state.last_error = None
            table.last_success = now if table.last_success is None else max(table.last_success, now)
        if pending is not None and pending[_SEQ] <= state.committed_seq:
            self._mark_clean(table, attempt.shard, state)
        elif pending is not None and newer_since is not None:
            state.dirty_since = newer_since

    def on_retryable_failure(self, attempt: Attempt, error: ErrorInfo) -> None:
        """The commit ended without success (retries exhausted, or credentials): the value stays
        pending for the next cycle. Counts one failure."""
        state = self._state(attempt)
        if state is None:
            return
        self._release(state, attempt)
        self._record_failure(attempt.group, state, error)

    def on_permanent_failure(self, attempt: Attempt, error: ErrorInfo) -> None:
        """The server refused the attempt's value for good: drop it (never a newer one)."""
        state = self._state(attempt)
        if state is None:
            return
        self._release(state, attempt)
        state.dropped_seq = max(state.dropped_seq, attempt.seq)
        table = self._groups[attempt.group]
        pending = state.pending
        if pending is not None and pending[_SEQ] <= attempt.seq:
            self._mark_clean(table, attempt.shard, state)
        self._record_failure(attempt.group, state, error)
        if state.pending is None and state.committed is None and state.in_flight is None:
            # Nothing left to guard or send: a flood of values SLS refuses (shards that do not
            # exist) must not hold memory, nor count toward max_shards, for ever.
            table.forget(attempt.shard, error)

    def note_error(self, attempt: Attempt, error: ErrorInfo) -> None:
        """Record an attempt's error as the shard's last error, without ending the commit."""
        state = self._state(attempt)
        if state is not None:
            state.last_error = error

    def is_settled(self, group: str, shard: int, seq: int) -> Settlement:
        """The fate of the value accepted as `seq`: committed (or superseded by a committed
        value), dropped (given up, nothing newer committed), or still pending."""
        table = self._groups.get(group)
        state = table.shards.get(shard) if table is not None else None
        if state is None:
            return "dropped"
        if state.committed_seq >= seq:
            return "committed"
        if state.dropped_seq >= seq:
            return "dropped"
        if state.pending is not None and state.pending[_SEQ] >= seq:
            return "pending"
        return "dropped"

    def _state(self, attempt: Attempt) -> _Shard | None:
        table = self._groups.get(attempt.group)
        return table.shards.get(attempt.shard) if table is not None else None

    def _release(self, state: _Shard, attempt: Attempt) -> None:
        if state.in_flight == attempt.seq:
            state.in_flight = None
            state.newer_since = None

    def _record_failure(self, group: str, state: _Shard, error: ErrorInfo) -> None:
        state.last_error = error
        self._groups[group].failures += 1

    def _mark_clean(self, table: _Group, shard: int, state: _Shard) -> None:
        state.pending = None
        state.dirty_since = None
        table.mark_clean(shard)

    # --- views ----------------------------------------------------------------------------

    def shard_view(self, group: str, shard: int) -> ShardView | None:
        """One shard, or None if the group does not know it. A shard forgotten after its value
        was dropped shows that last error for a while (the last _RECENT_DROPS per group)."""
        table = self._groups.get(group)
        if table is None:
            return None
        state = table.shards.get(shard)
        if state is not None:
            return _view(group, shard, state)
        error = table.recent_drops.get(shard)
        return None if error is None else _forgotten(group, shard, error)

    def listed_shards(self, group: str) -> list[int]:
        """The shards shard_views() lists, by shard number (without building the views)."""
        table = self._groups.get(group)
        if table is None:
            return []
        return sorted({*table.shards, *table.recent_drops})

    def listed_count(self, group: str) -> int:
        """How many shards shard_views() lists."""
        table = self._groups.get(group)
        return len(table.shards) + len(table.recent_drops) if table is not None else 0

    def shard_views(self, group: str) -> list[ShardView]:
        """Every tracked shard of a group, and the recently forgotten ones with their last
        error, by shard number."""
        table = self._groups.get(group)
        if table is None:
            return []
        views = [_view(group, shard, state) for shard, state in table.shards.items()]
        views += [_forgotten(group, shard, error) for shard, error in table.recent_drops.items()]
        return sorted(views, key=lambda view: view.shard)

    def pending_count(self, group: str) -> int:
        """Shards with an accepted, uncommitted value."""
        table = self._groups.get(group)
        return len(table.dirty) if table is not None else 0

    def tracked_count(self, group: str) -> int:
        """Shards the group has seen."""
        table = self._groups.get(group)
        return len(table.shards) if table is not None else 0

    def oldest_dirty_since(self, group: str, shards: Iterable[int] | None = None) -> float | None:
        """The earliest `dirty_since` among the group's dirty shards (or among `shards`)."""
        table = self._groups.get(group)
        if table is None:
            return None
        known = table.shards
        chosen = table.dirty if shards is None else shards
        times = [state.dirty_since for s in chosen if (state := known.get(s)) is not None]
        return min((t for t in times if t is not None), default=None)

    def shard_numbers(self, group: str) -> list[int]:
        """Every tracked shard of a group, by shard number."""
        table = self._groups.get(group)
        return sorted(table.shards) if table is not None else []

    def shard_times(
        self, group: str, shards: Iterable[int]
    ) -> list[tuple[int, float | None, float | None]]:
        """(shard, dirty_since, committed_at) of those of `shards` the group tracks."""
        table = self._groups.get(group)
        if table is None:
            return []
        known = table.shards
        return [
            (shard, state.dirty_since, state.committed_at)
            for shard in shards
            if (state := known.get(shard)) is not None
        ]

    def last_success(self, group: str) -> float | None:
        """Unix time of the group's last successful commit."""
        table = self._groups.get(group)
        return table.last_success if table is not None else None

    def group_status(self, group: str) -> dict[str, object]:
        """A group's entry in the `status` answer: pending, tracked, failures, last_success."""
        return {
            "pending": self.pending_count(group),
            "tracked": self.tracked_count(group),
            "failures": self.failure_count(group),
            "last_success": self.last_success(group),
        }

    def failure_count(self, group: str) -> int:
        """Commits of the group that ended without success."""
        table = self._groups.get(group)
        return table.failures if table is not None else 0

    def is_tracked(self, group: str, shard: int) -> bool:
        """Whether the group has seen the shard (it counts toward the group's shard limit)."""
        table = self._groups.get(group)
        return table is not None and shard in table.shards


def _columns(items: Sequence[ItemLike]) -> ItemColumns:
    if isinstance(items, ItemColumns):
        return items
    return ItemColumns(
        [item.shard for item in items],
        [item.checkpoint for item in items],
        [item.number for item in items],
        [item.consumer for item in items],
        [item.index for item in items],
    )


def _check_columns(
    states: list[_Shard | None], columns: ItemColumns, *, force: bool
) -> list[_Shard] | None:
    """Raise CheckpointRegression for the first item older than its shard's latest value,
    unless `force` (`states`: each item's shard, None if new).

    Returns `states` if every item is plain: a cursor newer than its shard's pending one (so
    another checkpoint, and no regression), other than the committed one, nothing in flight.
    Such an item only replaces the pending value. Told by the numbers alone: at thousands of
    shards, reading a shard's values costs more than the work done on them.
    """
    for state, number in zip(states, columns.numbers, strict=True):
        if not (
            state is not None
            and (pending := state.pending) is not None
            and number is not None
            and (newest := pending[_NUMBER]) is not None
            and number > newest
            and state.in_flight is None
            and ((committed := state.committed) is None or committed[_NUMBER] != number)
        ):
            break
    else:
        return cast(list[_Shard], states)
    if not force:
        _check_numbers(states, columns)
    return None


def _check_numbers(states: list[_Shard | None], columns: ItemColumns) -> None:
    for i, (state, number) in enumerate(zip(states, columns.numbers, strict=True)):
        if state is None or number is None:
            continue
        guard = state.guard()
        if guard is not None and guard[_NUMBER] is not None and number < guard[_NUMBER]:
            where = f"checkpoints[{columns.positions[i]}]: "
            _check_regression(state, columns.shards[i], columns.checkpoints[i], number, where)


def _sent_value(pending: _Value | None, attempt: Attempt) -> _Value:
    """The value `attempt` sent: the pending value itself while it is still that one, so a
    commit neither copies the value nor decodes its cursor again."""
    if (
        pending is not None
        and pending[_SEQ] == attempt.seq
        and pending[_CONSUMER] == attempt.consumer
    ):
        return pending
    number = decode_cursor(attempt.checkpoint)
    return (attempt.checkpoint, number, attempt.consumer, attempt.seq)


def _check_regression(
    state: _Shard, shard: int, checkpoint: str, number: int | None, where: str
) -> None:
    guard = state.guard()
    if guard is None or number is None or guard[_NUMBER] is None or number >= guard[_NUMBER]:
        return
    raise ProtocolError(
        "CheckpointRegression",
        f"{where}shard {shard}: checkpoint {checkpoint} is older than {guard[_CHECKPOINT]} "
        "(set force to move it back)",
    )


def _forgotten(group: str, shard: int, error: ErrorInfo) -> ShardView:
    return ShardView(group, shard, None, None, None, error, None, in_flight=False)


def _view(group: str, shard: int, state: _Shard) -> ShardView:
    return ShardView(
        group=group,
        shard=shard,
        pending=state.pending[_CHECKPOINT] if state.pending is not None else None,
        committed=state.committed[_CHECKPOINT] if state.committed is not None else None,
        committed_at=state.committed_at,
        last_error=state.last_error,
        dirty_since=state.dirty_since,
        in_flight=state.in_flight is not None,
    )
