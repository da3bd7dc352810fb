"""The common batch's fast path (cpmgr/batch.py, the store's column-wise accept) answers and
changes the store exactly as the general path does, for any batch: the same answer bytes, the
same error, the same values, seqs and dirty shards."""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any
from unittest import mock

from hypothesis import example, given, settings
from hypothesis import strategies as st

from cpmgr import protocol
from cpmgr.config import Config, GroupConfig, SLSConfig, SocketConfig
from cpmgr.dispatch import Dispatcher
from cpmgr.errors import ProtocolError
from cpmgr.protocol import (
    MAX_SHARD,
    CommitItem,
    CommitRequest,
    ItemColumns,
    encode_failure,
    encode_ok,
    parse_request,
)
from cpmgr.requests import item_consumers, item_shards, with_consumer
from cpmgr.store import Attempt, CheckpointStore, ErrorInfo

GROUP = "orders"
ERR = ErrorInfo("ShardNotExist", "gone", 0.0)
PROPERTY = settings(max_examples=400, deadline=None, derandomize=True, database=None)


def cp(cursor: int | str) -> str:
    return base64.b64encode(str(cursor).encode()).decode()


def batch_line(entries: list[Any], **fields: Any) -> bytes:
    return json.dumps({"op": "commit", "group": GROUP, "checkpoints": entries, **fields}).encode()


@contextmanager
def general_path_only() -> Iterator[None]:
    """Every batch read item by item, as if no batch had the common shape."""
    with mock.patch.object(protocol, "read_plain_batch", lambda entries, consumer: None):
        yield


# --- what a batch may hold --------------------------------------------------------------------

cursors = st.integers(0, 40) | st.integers(0, 10**30) | st.just(10**300)
canonical = (
    cursors.map(cp)
    | st.text("0123456789", min_size=1, max_size=4).map(cp)  # leading zeros: "007" is 7
    | st.binary(min_size=1, max_size=9).map(lambda raw: base64.b64encode(raw).decode())
)


def spoiled(value: str, how: str) -> str:
    """A near miss of the canonical checkpoint `value`."""
    if how == "bits" and value.endswith("="):  # non-zero padding bits: decodes the same
        at = len(value.rstrip("=")) - 1
        return value[:at] + "B" + value[at + 1 :]
    return {
        "unpadded": value.rstrip("="),
        "space": value[:2] + " " + value[2:],
        "newline": value + "\n" + value,
        "extra-pad": value + "=",
        "urlsafe": value + "-_",
        "non-ascii": value + "é",
        "doubled": value + value,
    }.get(how, "")


near_misses = st.builds(
    spoiled,
    canonical,
    st.sampled_from(["bits", "unpadded", "space", "newline", "extra-pad", "urlsafe", "non-ascii"])
    | st.sampled_from(["doubled", "empty"]),
)
odd_values = st.sampled_from([None, True, 3, 2.0, [], {}, "", "x"])
checkpoint_values = canonical | near_misses | odd_values
shards = st.integers(0, 8)
shard_values = shards | st.sampled_from([-1, MAX_SHARD, MAX_SHARD + 1, 2**70, True, 1.0, "1", None])
consumers = st.sampled_from([None, "", "c-1", "worker@host:1", "bad name", 7])

plain_entry = st.fixed_dictionaries({"shard": shard_values, "checkpoint": canonical})
# The common shape, but a checkpoint may be a near miss: only the values tell.
shaped_entry = st.fixed_dictionaries({"shard": shards, "checkpoint": checkpoint_values})
any_entry = st.fixed_dictionaries(
    {"shard": shard_values, "checkpoint": checkpoint_values},
    optional={"consumer": consumers, "extra": st.integers() | st.lists(st.integers())},
) | st.sampled_from([None, 1, "entry", [], {}, {"shard": 1}, {"checkpoint": cp(1)}])
entry_lists = (
    st.lists(plain_entry, min_size=1, max_size=12, unique_by=lambda e: json.dumps(e["shard"]))
    | st.lists(shaped_entry, min_size=1, max_size=6, unique_by=lambda e: e["shard"])
    | st.lists(plain_entry, min_size=1, max_size=12)
    | st.lists(any_entry | plain_entry, min_size=1, max_size=8)
)
deep = st.integers(25, 40).map(lambda depth: json.loads("[" * depth + "]" * depth))
line_fields = st.fixed_dictionaries(
    {}, optional={"consumer": consumers, "force": st.booleans(), "id": st.integers(), "x": deep}
)

History = list[tuple[str, int, str, str | None]]

# A store's history before the batch: accepts, commits in flight, committed, dropped.
few_shards = st.integers(0, 3)
few_cursors = st.integers(0, 6).map(cp) | st.just(cp("not-a-number"))
history_steps = st.lists(
    st.tuples(
        st.sampled_from(["accept", "accept", "force", "send", "commit", "drop", "tick"]),
        few_shards,
        few_cursors,
        st.sampled_from([None, "c-1", "c-2"]),
    ),
    max_size=20,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Replayed:
    """A store after a history, with the attempts the history left in flight."""

    def __init__(self, history: History) -> None:
        self.clock = Clock()
        self.store = CheckpointStore([GROUP], clock=self.clock)
        self.in_flight: list[Attempt] = []
        for step, shard, checkpoint, consumer in history:
            self.step(step, shard, checkpoint, consumer)

    def step(self, step: str, shard: int, checkpoint: str, consumer: str | None) -> None:
        store = self.store
        if step in ("accept", "force"):
            with suppress(ProtocolError):  # a regression in the history changes nothing
                store.accept(GROUP, shard, checkpoint, consumer=consumer, force=step == "force")
        elif step == "tick":
            self.clock.now += 1.0
        elif (attempt := store.begin(GROUP, shard)) is not None:
            if step == "commit":
                store.on_success(attempt)
            elif step == "drop":
                store.on_permanent_failure(attempt, ERR)
            else:
                self.in_flight.append(attempt)

    def state(self) -> tuple[object, ...]:
        """Everything the store shows, then again once what was in flight has succeeded (a
        newer value accepted meanwhile shows in `dirty_since` only then)."""
        before = state_of(self.store)
        self.clock.now += 1.0
        for attempt in self.in_flight:
            self.store.on_success(attempt)
        return before, state_of(self.store)


def state_of(store: CheckpointStore) -> tuple[object, ...]:
    """Everything the store shows of its one group; snapshot() last, as it marks in flight."""
    shards = store.listed_shards(GROUP)
    return (
        [store.shard_view(GROUP, shard) for shard in shards],
        store.pending_by_shard(GROUP),
        store.last_seq(GROUP),
        store.dirty_shards(GROUP),
        store.tracked_count(GROUP),
        store.snapshot(group=GROUP),
    )


def config() -> Config:
    return Config(
        socket=SocketConfig(path="/nonexistent/cpmgr.sock"),
        sls=SLSConfig(endpoint="127.0.0.1:1"),
        groups=(GroupConfig(GROUP, "p", "ls", "cg"),),
    )


def answer(dispatcher: Dispatcher, line: bytes) -> bytes:
    """The answer line of a commit, as the socket server builds it."""
    try:
        request = parse_request(line)
    except ProtocolError as exc:
        return encode_failure(exc)
    assert isinstance(request, CommitRequest)
    try:
        return encode_ok(request.request_id, **dispatcher.commit_now(request))
    except ProtocolError as exc:
        return encode_failure(exc, request.request_id)


def item_fields(line: bytes) -> list[tuple[object, ...]] | str:
    """Each parsed item in full (CommitItem equality leaves out index and number)."""
    try:
        request = parse_request(line)
    except ProtocolError as exc:
        return encode_failure(exc).decode()
    assert isinstance(request, CommitRequest)
    return [(i.shard, i.checkpoint, i.consumer, i.index, i.number) for i in request.items]


# --- properties --------------------------------------------------------------------------------


@PROPERTY
@given(entry_lists, line_fields, history_steps)
def test_fast_and_general_paths_answer_alike_and_leave_the_same_store(
    entries: list[Any], fields: dict[str, Any], history: History
) -> None:
    line = batch_line(entries, **fields)
    fast_store, general_store = Replayed(history), Replayed(history)
    fast = answer(Dispatcher(fast_store.store, config=config()), line)
    fast_items = item_fields(line)
    with general_path_only():
        general = answer(Dispatcher(general_store.store, config=config()), line)
        general_items = item_fields(line)
    assert fast == general
    assert fast_items == general_items
    assert fast_store.state() == general_store.state()


@PROPERTY
# A value newer than the one in flight: dirty_since moves to it once the older one succeeds.
@example(
    [CommitItem(1, cp(5))],
    False,
    [("accept", 1, cp(3), None), ("send", 1, "", None), ("tick", 1, "", None)],
)
# Back to the committed value after a forced step back: nothing is left to send.
@example(
    [CommitItem(1, cp(5))],
    False,
    [("accept", 1, cp(5), None), ("commit", 1, "", None), ("force", 1, cp(3), None)],
)
@given(
    st.lists(
        st.builds(
            CommitItem,
            few_shards,
            few_cursors,
            st.sampled_from([None, "c-1", "c-2"]),
            st.integers(0, 20),
        ),
        min_size=1,
        max_size=4,
    ),
    st.booleans(),
    history_steps,
)
def test_a_batch_is_accepted_as_checking_every_item_then_accepting_each(
    items: list[CommitItem], force: bool, history: History
) -> None:
    batch, one_by_one, quiet = Replayed(history), Replayed(history), Replayed(history)
    try:
        outcome: object = batch.store.accept_batch(GROUP, items, force=force)
    except ProtocolError as exc:
        outcome = str(exc)
    try:
        quiet.store.accept_all(GROUP, items, force=force)
    except ProtocolError as exc:
        assert str(exc) == outcome
    assert one_at_a_time(one_by_one.store, items, force=force) == outcome
    assert batch.state() == one_by_one.state() == quiet.state()


def one_at_a_time(store: CheckpointStore, items: list[CommitItem], *, force: bool) -> object:
    """The batch's meaning spelled out: every item checked against the store as it was, then
    each accepted in order; the first regression refuses all, named by its index."""
    for item in items:
        try:
            store.check(GROUP, item.shard, item.checkpoint, force=force, number=item.number)
        except ProtocolError as exc:
            return str(ProtocolError(exc.code, f"checkpoints[{item.index}]: {exc.message}"))
    return {
        item.shard: store.accept(
            GROUP, item.shard, item.checkpoint, consumer=item.consumer, force=True
        )
        for item in items
    }


# --- the fast path is the one taken for the common batch ---------------------------------------


def test_a_common_batch_is_read_as_columns_with_each_cursor_decoded() -> None:
    entries = [{"shard": 2, "checkpoint": cp(7)}, {"shard": 1, "checkpoint": cp("x")}]
    request = parse_request(batch_line(entries, consumer="c-1"))
    assert isinstance(request, CommitRequest)
    assert isinstance(request.items, ItemColumns)
    assert list(request.items) == [CommitItem(2, cp(7), "c-1"), CommitItem(1, cp("x"), "c-1")]
    assert [(i.index, i.number) for i in request.items] == [(0, 7), (1, None)]


def test_a_batch_in_another_shape_is_read_item_by_item() -> None:
    entries = [
        {"shard": 2, "checkpoint": cp(7), "consumer": "c-2"},
        {"shard": 2, "checkpoint": cp(8)},
    ]
    request = parse_request(batch_line(entries))
    assert isinstance(request, CommitRequest)
    assert not isinstance(request.items, ItemColumns)
    assert [(i.shard, i.checkpoint, i.index) for i in request.items] == [(2, cp(8), 1)]


def test_a_member_s_name_fills_a_batch_read_as_columns_without_leaving_them() -> None:
    entries = [{"shard": 2, "checkpoint": cp(7)}, {"shard": 1, "checkpoint": cp(8)}]
    request = parse_request(batch_line(entries))
    assert isinstance(request, CommitRequest)
    named = with_consumer(request.items, "pod-a")
    assert isinstance(named, ItemColumns)
    assert item_consumers(named) == ["pod-a", "pod-a"]
    assert item_shards(named) == [2, 1]
    with general_path_only():
        general = parse_request(batch_line(entries))
    assert isinstance(general, CommitRequest)
    assert with_consumer(general.items, "pod-a") == named
    assert [(i.index, i.number) for i in named] == [(0, 7), (1, 8)]
