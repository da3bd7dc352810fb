"""The checkpoint table: latest wins, never backwards unforced, one value in flight per shard."""

from __future__ import annotations

import base64

import pytest

from cpmgr.errors import ProtocolError
from cpmgr.protocol import CommitItem
from cpmgr.store import Attempt, CheckpointStore, ErrorInfo


def cp(number: int | str) -> str:
    return base64.b64encode(str(number).encode()).decode()


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def store(clock: Clock) -> CheckpointStore:
    return CheckpointStore(["orders", "audit"], clock=clock)


def only(attempts: list[Attempt]) -> Attempt:
    assert len(attempts) == 1
    return attempts[0]


ERR = ErrorInfo("ServerBusy", "busy", 1.0)
PERM = ErrorInfo("InvalidShardCheckPoint", "bad", 2.0)


# --- accepting ------------------------------------------------------------------------------


def test_accepted_value_is_pending(store: CheckpointStore, clock: Clock) -> None:
    seq = store.accept("orders", 3, cp(10), consumer="c1")
    view = store.shard_view("orders", 3)
    assert view is not None
    assert (view.pending, view.committed, view.dirty_since, view.in_flight) == (
        cp(10),
        None,
        clock.now,
        False,
    )
    assert store.is_settled("orders", 3, seq) == "pending"
    assert store.pending_count("orders") == 1
    assert store.tracked_count("orders") == 1
    assert store.pending_count("audit") == 0


def test_latest_wins(store: CheckpointStore) -> None:
    store.accept("orders", 3, cp(10))
    store.accept("orders", 3, cp(11))
    last = store.accept("orders", 3, cp(12), consumer="c2")
    attempt = only(store.snapshot())
    assert attempt == Attempt("orders", 3, cp(12), "c2", last)


def test_seqs_grow_and_equal_pending_value_is_a_no_op(store: CheckpointStore) -> None:
    first = store.accept("orders", 1, cp(10))
    second = store.accept("orders", 2, cp(10))
    assert second > first
    assert store.accept("orders", 1, cp(10)) == first


def test_value_equal_to_committed_costs_nothing(store: CheckpointStore) -> None:
    seq = store.accept("orders", 1, cp(10))
    store.on_success(only(store.snapshot()))
    assert store.accept("orders", 1, cp(10)) == seq
    assert store.snapshot() == []
    assert store.pending_count("orders") == 0


def test_unknown_group_is_refused(store: CheckpointStore) -> None:
    with pytest.raises(ProtocolError) as info:
        store.accept("nope", 1, cp(1))
    assert info.value.code == "UnknownGroup"
    with pytest.raises(ProtocolError):
        store.accept_batch("nope", [CommitItem(1, cp(1))])


# --- regression guard -----------------------------------------------------------------------


def test_older_than_pending_is_a_regression(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(10))
    with pytest.raises(ProtocolError) as info:
        store.accept("orders", 1, cp(9))
    assert info.value.code == "CheckpointRegression"
    assert "shard 1" in info.value.message
    assert store.shard_view("orders", 1).pending == cp(10)  # type: ignore[union-attr]


def test_older_than_committed_is_a_regression(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(10))
    store.on_success(only(store.snapshot()))
    with pytest.raises(ProtocolError):
        store.accept("orders", 1, cp(9))


def test_force_moves_back(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(10))
    store.on_success(only(store.snapshot()))
    store.accept("orders", 1, cp(3), force=True)
    assert only(store.snapshot()).checkpoint == cp(3)


def test_cursors_compare_as_numbers_not_strings(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(9))
    store.accept("orders", 1, cp(10))  # "10" < "9" as text, but 10 > 9
    with pytest.raises(ProtocolError):
        store.accept("orders", 1, cp(9))


def test_non_numeric_values_are_not_compared(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(10))
    store.accept("orders", 1, cp("abc"))
    store.accept("orders", 1, cp(2))
    assert store.shard_view("orders", 1).pending == cp(2)  # type: ignore[union-attr]


def test_shards_and_groups_are_independent(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(10))
    store.accept("orders", 2, cp(1))
    store.accept("audit", 1, cp(1))
    assert store.pending_count("orders") == 2
    assert store.pending_count("audit") == 1


def test_dropped_value_no_longer_guards(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(5))
    store.on_success(only(store.snapshot()))
    store.accept("orders", 1, cp(99))
    store.on_permanent_failure(only(store.snapshot()), PERM)
    store.accept("orders", 1, cp(6))
    with pytest.raises(ProtocolError):
        store.accept("orders", 1, cp(4))


# --- batches --------------------------------------------------------------------------------


def test_batch_is_all_or_nothing(store: CheckpointStore) -> None:
    store.accept("orders", 2, cp(50))
    items = [CommitItem(1, cp(1), index=0), CommitItem(2, cp(40), index=1), CommitItem(3, cp(3))]
    with pytest.raises(ProtocolError) as info:
        store.accept_batch("orders", items)
    assert info.value.code == "CheckpointRegression"
    assert info.value.message.startswith("checkpoints[1]: shard 2")
    assert store.tracked_count("orders") == 1
    assert store.pending_count("orders") == 1


def test_batch_accepts_with_consumers_and_returns_seqs(store: CheckpointStore) -> None:
    seqs = store.accept_batch("orders", [CommitItem(1, cp(1), "a"), CommitItem(2, cp(2))])
    assert set(seqs) == {1, 2}
    attempts = store.snapshot()
    assert [(a.shard, a.consumer, a.seq) for a in attempts] == [
        (1, "a", seqs[1]),
        (2, None, seqs[2]),
    ]


def test_forced_batch_moves_back(store: CheckpointStore) -> None:
    store.accept("orders", 2, cp(50))
    store.accept_batch("orders", [CommitItem(2, cp(40))], force=True)
    assert store.shard_view("orders", 2).pending == cp(40)  # type: ignore[union-attr]


# --- snapshot and outcomes ------------------------------------------------------------------


def test_snapshot_hands_out_one_value_per_shard(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(1))
    first = only(store.snapshot())
    store.accept("orders", 1, cp(2))
    assert store.snapshot() == []
    assert store.shard_view("orders", 1).in_flight  # type: ignore[union-attr]
    store.on_success(first)
    second = only(store.snapshot())
    assert second.checkpoint == cp(2)


def test_snapshot_filters_by_group_and_shards(store: CheckpointStore) -> None:
    for shard in range(4):
        store.accept("orders", shard, cp(shard))
    store.accept("audit", 0, cp(0))
    assert [a.shard for a in store.snapshot(group="orders", shards=[1, 3, 9])] == [1, 3]
    assert [a.group for a in store.snapshot(group="audit")] == ["audit"]
    assert store.snapshot(group="missing") == []
    assert [(a.group, a.shard) for a in store.snapshot()] == [("orders", 0), ("orders", 2)]


def test_older_success_never_overwrites_newer_value(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(1))
    attempt = only(store.snapshot())
    newer = store.accept("orders", 1, cp(2))
    store.on_success(attempt, at=5.0)
    view = store.shard_view("orders", 1)
    assert view is not None
    assert (view.pending, view.committed, view.committed_at) == (cp(2), cp(1), 5.0)
    assert store.is_settled("orders", 1, attempt.seq) == "committed"
    assert store.is_settled("orders", 1, newer) == "pending"


def test_late_success_of_a_superseded_attempt_is_ignored(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(1))
    old = only(store.snapshot())
    store.accept("orders", 1, cp(2))
    new = store.refresh(old)
    store.on_success(new)
    store.on_success(old)
    assert store.shard_view("orders", 1).committed == cp(2)  # type: ignore[union-attr]
    assert store.pending_count("orders") == 0


def test_refresh_takes_the_newest_value(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(1))
    attempt = only(store.snapshot())
    assert store.refresh(attempt) == attempt
    seq = store.accept("orders", 1, cp(7), consumer="late")
    refreshed = store.refresh(attempt)
    assert refreshed == Attempt("orders", 1, cp(7), "late", seq)
    store.on_success(refreshed)
    assert store.is_settled("orders", 1, attempt.seq) == "committed"
    assert store.pending_count("orders") == 0


def test_retryable_failure_keeps_the_value_pending(store: CheckpointStore) -> None:
    seq = store.accept("orders", 1, cp(1))
    store.on_retryable_failure(only(store.snapshot()), ERR)
    view = store.shard_view("orders", 1)
    assert view is not None
    assert (view.pending, view.in_flight, view.last_error) == (cp(1), False, ERR)
    assert store.failure_count("orders") == 1
    assert store.is_settled("orders", 1, seq) == "pending"
    assert only(store.snapshot()).seq == seq


def test_permanent_failure_drops_that_value_only(store: CheckpointStore) -> None:
    first = store.accept("orders", 1, cp(1))
    attempt = only(store.snapshot())
    second = store.accept("orders", 1, cp(2))
    store.on_permanent_failure(attempt, PERM)
    assert store.is_settled("orders", 1, first) == "dropped"
    assert store.is_settled("orders", 1, second) == "pending"
    assert only(store.snapshot()).checkpoint == cp(2)
    assert store.shard_view("orders", 1).last_error == PERM  # type: ignore[union-attr]


def test_permanent_failure_of_the_newest_value_cleans_the_shard(store: CheckpointStore) -> None:
    seq = store.accept("orders", 1, cp(1))
    store.on_permanent_failure(only(store.snapshot()), PERM)
    view = store.shard_view("orders", 1)
    assert view is not None
    assert (view.pending, view.dirty_since, view.in_flight) == (None, None, False)
    assert store.is_settled("orders", 1, seq) == "dropped"
    assert store.failure_count("orders") == 1
    assert store.snapshot() == []


def test_success_clears_the_last_error(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(1))
    attempt = only(store.snapshot())
    store.note_error(attempt, ERR)
    assert store.shard_view("orders", 1).last_error == ERR  # type: ignore[union-attr]
    store.on_success(attempt)
    assert store.shard_view("orders", 1).last_error is None  # type: ignore[union-attr]
    assert store.failure_count("orders") == 0


def test_back_to_committed_value_with_nothing_in_flight_cancels_pending(
    store: CheckpointStore,
) -> None:
    store.accept("orders", 1, cp(5))
    store.on_success(only(store.snapshot()))
    pending = store.accept("orders", 1, cp(8))
    back = store.accept("orders", 1, cp(5), force=True)
    assert back > pending
    assert store.snapshot() == []
    assert store.is_settled("orders", 1, pending) == "committed"


def test_back_to_committed_value_while_in_flight_is_sent_again(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(5))
    store.on_success(only(store.snapshot()))
    store.accept("orders", 1, cp(8))
    in_flight = only(store.snapshot())
    back = store.accept("orders", 1, cp(5), force=True)
    store.on_success(in_flight)
    resend = only(store.snapshot())
    assert (resend.checkpoint, resend.seq) == (cp(5), back)


def test_is_settled_for_unknown_shard_or_group(store: CheckpointStore) -> None:
    assert store.is_settled("orders", 9, 1) == "dropped"
    assert store.is_settled("nope", 9, 1) == "dropped"


def test_outcomes_for_a_removed_group_are_ignored(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(1))
    attempt = only(store.snapshot())
    store.remove_group("orders")
    store.on_success(attempt)
    store.on_permanent_failure(attempt, PERM)
    store.on_retryable_failure(attempt, ERR)
    store.note_error(attempt, ERR)
    assert store.refresh(attempt) == attempt
    assert store.groups() == ["audit"]


# --- views and times ------------------------------------------------------------------------


def test_dirty_since_is_when_the_shard_became_dirty(store: CheckpointStore, clock: Clock) -> None:
    store.accept("orders", 1, cp(1))
    clock.now = 1010.0
    store.accept("orders", 1, cp(2))
    assert store.shard_view("orders", 1).dirty_since == 1000.0  # type: ignore[union-attr]
    store.on_retryable_failure(only(store.snapshot()), ERR)
    assert store.oldest_dirty_since("orders") == 1000.0


def test_dirty_since_moves_to_the_first_value_after_the_committed_one(
    store: CheckpointStore, clock: Clock
) -> None:
    store.accept("orders", 1, cp(1))
    attempt = only(store.snapshot())
    clock.now = 1005.0
    store.accept("orders", 1, cp(2))
    clock.now = 1007.0
    store.accept("orders", 1, cp(3))
    clock.now = 1009.0
    store.on_success(attempt)
    assert store.shard_view("orders", 1).dirty_since == 1005.0  # type: ignore[union-attr]
    store.on_success(only(store.snapshot()))
    assert store.shard_view("orders", 1).dirty_since is None  # type: ignore[union-attr]
    assert store.oldest_dirty_since("orders") is None


def test_oldest_dirty_since_over_shards(store: CheckpointStore, clock: Clock) -> None:
    store.accept("orders", 1, cp(1))
    clock.now = 1003.0
    store.accept("orders", 2, cp(1))
    assert store.oldest_dirty_since("orders") == 1000.0
    store.on_success(store.snapshot(shards=[1])[0])
    assert store.oldest_dirty_since("orders") == 1003.0


def test_last_success_and_committed_at(store: CheckpointStore, clock: Clock) -> None:
    assert store.last_success("orders") is None
    store.accept("orders", 1, cp(1))
    clock.now = 1234.5
    store.on_success(only(store.snapshot()))
    view = store.shard_view("orders", 1)
    assert view is not None
    assert view.committed_at == 1234.5
    assert store.last_success("orders") == 1234.5


def test_views_of_a_group(store: CheckpointStore) -> None:
    store.accept("orders", 2, cp(2))
    store.accept("orders", 0, cp(0))
    assert [v.shard for v in store.shard_views("orders")] == [0, 2]
    assert store.shard_views("audit") == []
    assert store.shard_views("nope") == []
    assert store.shard_view("orders", 5) is None
    assert store.shard_view("nope", 5) is None


def test_counts_for_unknown_group_are_empty(store: CheckpointStore) -> None:
    assert store.pending_count("nope") == 0
    assert store.tracked_count("nope") == 0
    assert store.failure_count("nope") == 0
    assert store.last_success("nope") is None
    assert store.oldest_dirty_since("nope") is None


def test_add_and_remove_groups(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(1))
    store.add_group("orders")  # keeps its state
    store.add_group("new")
    assert store.groups() == ["orders", "audit", "new"]
    assert store.pending_count("orders") == 1
    store.remove_group("orders")
    store.remove_group("orders")
    assert store.groups() == ["audit", "new"]
    with pytest.raises(ProtocolError):
        store.accept("orders", 1, cp(1))


# --- journal replay and flush -----------------------------------------------------------------


def test_restore_pending_value_guards_regressions(store: CheckpointStore, clock: Clock) -> None:
    store.restore("orders", 1, cp(20), consumer="c", committed=cp(10))
    view = store.shard_view("orders", 1)
    assert view is not None
    assert (view.pending, view.committed, view.committed_at, view.dirty_since) == (
        cp(20),
        cp(10),
        None,
        clock.now,
    )
    with pytest.raises(ProtocolError):
        store.accept("orders", 1, cp(15))
    attempt = only(store.snapshot())
    assert (attempt.checkpoint, attempt.consumer) == (cp(20), "c")


def test_restore_committed_value_is_clean(store: CheckpointStore) -> None:
    store.restore("orders", 1, cp(20), committed=cp(20))
    assert store.pending_count("orders") == 0
    assert store.tracked_count("orders") == 1
    with pytest.raises(ProtocolError):
        store.accept("orders", 1, cp(19))
    assert store.accept("orders", 1, cp(20)) > 0
    assert store.snapshot() == []


def test_restore_without_committed_value(store: CheckpointStore) -> None:
    store.accept("orders", 1, cp(99))
    store.restore("orders", 1, cp(5))
    assert store.shard_view("orders", 1).pending == cp(5)  # type: ignore[union-attr]
    assert store.pending_count("orders") == 1
    with pytest.raises(ProtocolError):
        store.restore("nope", 1, cp(5))


def test_pending_seqs_include_values_in_flight(store: CheckpointStore) -> None:
    a = store.accept("orders", 2, cp(1))
    b = store.accept("orders", 1, cp(1))
    c = store.accept("audit", 0, cp(1))
    store.snapshot(group="orders", shards=[2])
    assert store.pending_seqs() == [("orders", 1, b), ("orders", 2, a), ("audit", 0, c)]
    assert store.pending_seqs(group="audit") == [("audit", 0, c)]
    assert store.pending_seqs(group="nope") == []


def test_moving_back_to_the_committed_value_after_a_failed_send_is_sent(
    store: CheckpointStore,
) -> None:
    store.accept("orders", 0, cp(100))
    store.on_success(only(store.snapshot()))
    store.accept("orders", 0, cp(200))
    sent = only(store.snapshot())
    store.on_retryable_failure(sent, ErrorInfo("Timeout", "no answer", 0.0))  # may have landed
    store.accept("orders", 0, cp(100), force=True)
    again = only(store.snapshot())
    assert again.checkpoint == cp(100)


def test_moving_back_to_the_committed_value_before_anything_was_sent_costs_nothing(
    store: CheckpointStore,
) -> None:
    store.accept("orders", 0, cp(100))
    store.on_success(only(store.snapshot()))
    store.accept("orders", 0, cp(200))
    store.accept("orders", 0, cp(100), force=True)
    assert store.snapshot() == []
    assert store.pending_count("orders") == 0
