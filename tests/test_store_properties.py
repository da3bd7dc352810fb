"""Random interleavings of accept, snapshot, refresh and outcomes keep the store's promises:
the newest accepted value is committed or pending (unless that very value was dropped), nothing
goes backwards unforced, and at most one value per shard is in flight."""

from __future__ import annotations

import base64
from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from cpmgr.errors import ProtocolError
from cpmgr.protocol import decode_cursor
from cpmgr.store import Attempt, CheckpointStore, ErrorInfo

GROUPS = ("a", "b")
Key = tuple[str, int]
keys = st.tuples(st.sampled_from(GROUPS), st.integers(0, 1))
values = st.integers(0, 12).map(str) | st.sampled_from(["x", "y"])
ERR = ErrorInfo("E", "e", 0.0)


def cp(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


@dataclass
class Latest:
    checkpoint: str
    seq: int
    dropped: bool = False


@dataclass
class Shadow:
    latest: dict[Key, Latest] = field(default_factory=dict)
    in_flight: dict[Key, Attempt] = field(default_factory=dict)
    stale: list[Attempt] = field(default_factory=list)
    # How low the committed value may legally drop: set by forced or uncompared (non-numeric)
    # accepts, cleared once the shard is clean with nothing out.
    floor: dict[Key, float] = field(default_factory=dict)
    committed_number: dict[Key, int] = field(default_factory=dict)


class StoreMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0
        self.store = CheckpointStore(GROUPS, clock=lambda: self.now)
        self.shadow = Shadow()

    @initialize()
    def start(self) -> None:
        self.now = 100.0

    def tick(self) -> None:
        self.now += 1.0

    # --- rules ------------------------------------------------------------------------

    @rule(key=keys, value=values, force=st.booleans())
    def accept(self, key: Key, value: str, force: bool) -> None:
        self.tick()
        view = self.store.shard_view(*key)
        guard = None if view is None else view.pending or view.committed
        checkpoint = cp(value)
        number = decode_cursor(checkpoint)
        guard_number = None if guard is None else decode_cursor(guard)
        backwards = number is not None and guard_number is not None and number < guard_number
        try:
            seq = self.store.accept(*key, checkpoint, force=force)
        except ProtocolError as exc:
            assert exc.code == "CheckpointRegression"
            assert backwards and not force
            return
        assert not backwards or force
        if guard is not None:
            self.lower_floor(key, number, guard_number, backwards)
        self.shadow.latest[key] = Latest(checkpoint, seq)

    def lower_floor(
        self, key: Key, number: int | None, guard_number: int | None, backwards: bool
    ) -> None:
        if number is None or guard_number is None:
            self.shadow.floor[key] = float("-inf")
        elif backwards:
            self.shadow.floor[key] = min(self.shadow.floor.get(key, float("inf")), number)

    @precondition(lambda self: self.shadow.in_flight)
    @rule(data=st.data())
    def accept_newer_while_in_flight(self, data: st.DataObject) -> None:
        """The race that matters most: a newer value arrives while an older one is out."""
        self.tick()
        key = data.draw(st.sampled_from(sorted(self.shadow.in_flight)))
        view = self.store.shard_view(*key)
        assert view is not None
        guard = view.pending or view.committed
        guard_number = None if guard is None else decode_cursor(guard)
        number = (guard_number or 0) + 1
        checkpoint = cp(str(number))
        seq = self.store.accept(*key, checkpoint)
        if guard is not None:
            self.lower_floor(key, number, guard_number, backwards=False)
        self.shadow.latest[key] = Latest(checkpoint, seq)

    @rule(data=st.data())
    def accept_batch(self, data: st.DataObject) -> None:
        self.tick()
        group = data.draw(st.sampled_from(GROUPS))
        shards = data.draw(st.lists(st.integers(0, 2), min_size=1, max_size=3, unique=True))
        batch = [(shard, cp(data.draw(values))) for shard in shards]
        before = {s: self.store.shard_view(group, s) for s in shards}
        items = [_Item(shard, checkpoint) for shard, checkpoint in batch]
        try:
            seqs = self.store.accept_batch(group, items)
        except ProtocolError:
            # All or nothing: no shard changed.
            assert {s: self.store.shard_view(group, s) for s in shards} == before
            return
        for shard, checkpoint in batch:
            guard = before[shard]
            guard_cp = None if guard is None else guard.pending or guard.committed
            guard_number = None if guard_cp is None else decode_cursor(guard_cp)
            number = decode_cursor(checkpoint)
            if guard_number is not None and number is not None:
                assert number >= guard_number, "unforced batch moved backwards"
            if guard_cp is not None:
                self.lower_floor((group, shard), number, guard_number, backwards=False)
            self.shadow.latest[(group, shard)] = Latest(checkpoint, seqs[shard])

    @rule(group=st.none() | st.sampled_from(GROUPS))
    def snapshot(self, group: str | None) -> None:
        self.tick()
        attempts = self.store.snapshot(group=group)
        for attempt in attempts:
            key = (attempt.group, attempt.shard)
            assert key not in self.shadow.in_flight, "two values in flight for one shard"
            latest = self.shadow.latest[key]
            assert (attempt.checkpoint, attempt.seq) == (latest.checkpoint, latest.seq)
            self.shadow.in_flight[key] = attempt

    @precondition(lambda self: self.shadow.in_flight)
    @rule(data=st.data())
    def refresh(self, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.shadow.in_flight)))
        old = self.shadow.in_flight[key]
        new = self.store.refresh(old)
        assert new.seq >= old.seq
        if new != old:
            self.shadow.stale.append(old)
        self.shadow.in_flight[key] = new

    @precondition(lambda self: self.shadow.in_flight)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "retryable", "permanent"]))
    def outcome(self, data: st.DataObject, outcome: str) -> None:
        self.tick()
        key = data.draw(st.sampled_from(sorted(self.shadow.in_flight)))
        attempt = self.shadow.in_flight.pop(key)
        self.report(attempt, outcome)

    @precondition(lambda self: self.shadow.stale)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "retryable", "permanent"]))
    def late_outcome(self, data: st.DataObject, outcome: str) -> None:
        """An outcome for a value that was superseded in flight must not hurt newer ones."""
        self.tick()
        attempt = self.shadow.stale.pop(data.draw(st.integers(0, len(self.shadow.stale) - 1)))
        key = (attempt.group, attempt.shard)
        current = self.shadow.in_flight.get(key)
        self.report(attempt, outcome)
        if current is not None:
            view = self.store.shard_view(*key)
            assert view is not None
            assert view.in_flight

    def report(self, attempt: Attempt, outcome: str) -> None:
        key = (attempt.group, attempt.shard)
        if outcome == "success":
            self.store.on_success(attempt)
        elif outcome == "retryable":
            self.store.on_retryable_failure(attempt, ERR)
        else:
            self.store.on_permanent_failure(attempt, ERR)
            latest = self.shadow.latest[key]
            if attempt.seq >= latest.seq:
                latest.dropped = True

    # --- invariants -------------------------------------------------------------------

    @invariant()
    def newest_value_is_committed_or_pending(self) -> None:
        for key, latest in self.shadow.latest.items():
            view = self.store.shard_view(*key)
            assert view is not None
            settled = self.store.is_settled(*key, latest.seq)
            if latest.dropped:
                assert view.pending is None
                assert settled == "dropped"
            elif view.pending is not None:
                assert view.pending == latest.checkpoint
                assert settled == "pending"
            else:
                assert view.committed == latest.checkpoint
                assert settled == "committed"

    @invariant()
    def committed_never_goes_backwards_unforced(self) -> None:
        for key in self.shadow.latest:
            view = self.store.shard_view(*key)
            assert view is not None
            number = None if view.committed is None else decode_cursor(view.committed)
            if number is None:
                continue
            previous = self.shadow.committed_number.get(key)
            if previous is not None and number < previous:
                assert number >= self.shadow.floor.get(key, float("inf")), "moved backwards"
            self.shadow.committed_number[key] = number
            out = key in self.shadow.in_flight or any(
                (a.group, a.shard) == key for a in self.shadow.stale
            )
            if view.pending is None and not out:
                self.shadow.floor.pop(key, None)

    @invariant()
    def in_flight_flags_match(self) -> None:
        for key in self.shadow.latest:
            view = self.store.shard_view(*key)
            assert view is not None
            assert view.in_flight == (key in self.shadow.in_flight)

    @invariant()
    def dirty_bookkeeping_is_consistent(self) -> None:
        for group in GROUPS:
            views = self.store.shard_views(group)
            dirty = [v for v in views if v.pending is not None]
            assert all((v.dirty_since is None) == (v.pending is None) for v in views)
            assert self.store.pending_count(group) == len(dirty)
            expected = min((v.dirty_since for v in dirty if v.dirty_since), default=None)
            assert self.store.oldest_dirty_since(group) == expected


@dataclass(frozen=True)
class _Item:
    shard: int
    checkpoint: str
    consumer: str | None = None
    index: int = 0

    @property
    def number(self) -> int | None:
        return decode_cursor(self.checkpoint)


StoreMachine.TestCase.settings = settings(
    max_examples=100,
    stateful_step_count=40,
    deadline=None,
    derandomize=True,
    database=None,
)
TestStoreProperties = StoreMachine.TestCase
