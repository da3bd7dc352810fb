"""Shards that split, merge and end, in the emulator: SplitShard and MergeShards at their real
paths (through the official SDK, unchanged but for `_isRowIp = True`), read-only parents with
frozen ends, and what consumer groups see: `over` and `order`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aliyun.log import LogClient, LogException

from cpmgr.emulator import running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.emulator.shards import HASH_SPACE, encode_cursor
from cpmgr.emulator.state import ApiError, EmulatorState
from cpmgr.sls.client import ShardInfo, SLSClient
from cpmgr.sls.signer import Credentials

P, L, G = "lineage-project", "lineage-logstore", "lineage-group"
KEY_ID, SECRET = "lineage-key", "lineage-secret"
T0 = 1_700_000_000
HALF = f"{HASH_SPACE // 2:032x}"
QUARTER = f"{HASH_SPACE // 4:032x}"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_state(shards: int, *, order: bool = False) -> EmulatorState:
    state = EmulatorState(wall_clock=lambda: float(T0), monotonic=FakeClock())
    state.add_logstore(P, L, shards)
    state.create_group(P, L, G, timeout=60, order=order)
    return state


def write(state: EmulatorState, shard: int, count: int) -> None:
    state.logstore(P, L).shards[shard].append(count, T0)


def end_of(state: EmulatorState, shard: int) -> str:
    return state.logstore(P, L).shards[shard].end_cursor


def commit(state: EmulatorState, shard: int, checkpoint: str, consumer: str = "c") -> None:
    """As `consumer` without forceSuccess; with no consumer, forced (as cpmgr's plain groups)."""
    state.update_checkpoint(
        P, L, G, shard=shard, checkpoint=checkpoint, consumer=consumer, force_success=not consumer
    )


def events(state: EmulatorState, *kinds: str) -> list[tuple[str, int]]:
    return [
        (str(e["event"]), int(str(e["shard"]))) for e in state.shard_events if e["event"] in kinds
    ]


# --- split and merge in the shard table ------------------------------------------------------


def test_a_split_freezes_the_parent_and_its_children_partition_its_range() -> None:
    state = make_state(2)
    write(state, 0, 5)
    end = end_of(state, 0)
    answer = state.split_shard(P, L, 0, key=QUARTER, count=None)
    assert [(s["shardID"], s["status"]) for s in answer] == [
        (0, "readonly"),
        (2, "readwrite"),
        (3, "readwrite"),
    ]
    keys = [(s["inclusiveBeginKey"], s["exclusiveEndKey"]) for s in answer]
    assert keys == [("0" * 32, HALF), ("0" * 32, QUARTER), (QUARTER, HALF)]
    shards = state.logstore(P, L).shards
    assert shards[2].parents == shards[3].parents == (0,)
    with pytest.raises(ValueError, match="read-only"):
        shards[0].append(1, T0 + 1)
    assert end_of(state, 0) == end  # frozen
    assert [s["shardID"] for s in state.list_shards(P, L)] == [0, 1, 2, 3]


def test_a_split_into_equal_parts_and_the_refusals() -> None:
    state = make_state(1)
    answer = state.split_shard(P, L, 0, key=None, count=4)
    assert [s["inclusiveBeginKey"] for s in answer[1:]] == [
        f"{HASH_SPACE * part // 4:032x}" for part in range(4)
    ]
    assert answer[-1]["exclusiveEndKey"] == "f" * 32
    refusals: list[Callable[[], object]] = [
        lambda: state.split_shard(P, L, 0, key=None, count=2),  # read-only now
        lambda: state.split_shard(P, L, 9, key=None, count=2),  # no such shard
        lambda: state.split_shard(P, L, 1, key="0" * 32, count=None),  # the range's own begin
        lambda: state.split_shard(P, L, 1, key="xyz", count=None),
        lambda: state.split_shard(P, L, 1, key=None, count=1),
        lambda: state.split_shard(P, L, 1, key=None, count=None),
        lambda: state.split_shard(P, L, 1, key=f"{HASH_SPACE // 8:032x}", count=3),
        lambda: state.merge_shards(P, L, 4),  # the last range: nothing on its right
    ]
    for refused in refusals:
        with pytest.raises(ApiError) as caught:
            refused()
        assert (caught.value.status, caught.value.code) == (400, "ParameterInvalid")


def test_a_merge_joins_a_shard_with_its_right_neighbour() -> None:
    state = make_state(4)
    answer = state.merge_shards(P, L, 1)
    assert [(s["shardID"], s["status"]) for s in answer] == [
        (4, "readwrite"),
        (1, "readonly"),
        (2, "readonly"),
    ]
    assert (answer[0]["inclusiveBeginKey"], answer[0]["exclusiveEndKey"]) == (
        answer[1]["inclusiveBeginKey"],
        answer[2]["exclusiveEndKey"],
    )
    assert state.logstore(P, L).shards[4].parents == (1, 2)
    assert events(state, "split", "merge") == [("merge", 1)]


# --- what a consumer group sees --------------------------------------------------------------


def test_new_shards_appear_in_the_next_heartbeat_and_a_finished_parent_leaves() -> None:
    state = make_state(2)
    assert state.heartbeat(P, L, G, "c", []) == [0, 1]
    write(state, 0, 3)
    state.split_shard(P, L, 0, key=QUARTER, count=None)
    assert state.heartbeat(P, L, G, "c", [0, 1]) == [0, 1, 2, 3]  # no order: children at once
    commit(state, 0, encode_cursor(state.logstore(P, L).shards[0].end - 1))
    assert state.heartbeat(P, L, G, "c", [0, 1, 2, 3]) == [0, 1, 2, 3]  # not at its end yet
    commit(state, 0, end_of(state, 0))
    assert state.heartbeat(P, L, G, "c", [0, 1, 2, 3]) == [1, 2, 3]
    assert state.heartbeat(P, L, G, "other", []) == []  # never assigned again
    assert state.heartbeat(P, L, G, "c", [1, 2, 3]) == [1, 2]  # 3 moves to the newcomer
    assert state.heartbeat(P, L, G, "c", [1, 2]) == [1, 2]
    assert state.heartbeat(P, L, G, "other", []) == [3]
    assert [e["shard"] for e in state.get_checkpoints(P, L, G, None)] == [0, 1, 2, 3]


def test_with_order_children_wait_until_their_parent_is_finished() -> None:
    state = make_state(1, order=True)
    assert state.heartbeat(P, L, G, "c", []) == [0]
    write(state, 0, 3)
    state.split_shard(P, L, 0, key=HALF, count=None)
    assert state.heartbeat(P, L, G, "c", [0]) == [0]
    assert state.heartbeat(P, L, G, "idle", []) == []  # children are waiting, not free
    commit(state, 0, end_of(state, 0))
    # The holder's next heartbeat drops the finished parent; the children go to whoever asks.
    assert state.heartbeat(P, L, G, "c", [0]) == [1]
    assert state.heartbeat(P, L, G, "idle", []) == [2]
    assert events(state, "finished", "assigned") == [
        ("assigned", 0),
        ("finished", 0),
        ("assigned", 1),
        ("assigned", 2),
    ]


def test_a_merged_child_waits_for_both_parents() -> None:
    state = make_state(2, order=True)
    assert state.heartbeat(P, L, G, "c", []) == [0, 1]
    state.merge_shards(P, L, 0)
    commit(state, 0, end_of(state, 0))
    assert state.heartbeat(P, L, G, "c", [0, 1]) == [1]
    commit(state, 1, end_of(state, 1))
    assert state.heartbeat(P, L, G, "c", [1]) == [2]


def test_a_checkpoint_already_at_the_end_needs_one_more_commit_to_finish() -> None:
    state = make_state(1, order=True)
    assert state.heartbeat(P, L, G, "c", []) == [0]
    write(state, 0, 2)
    commit(state, 0, end_of(state, 0))  # caught up while the shard was still read-write
    state.split_shard(P, L, 0, key=HALF, count=None)
    assert state.heartbeat(P, L, G, "c", [0]) == [0]  # not finished: the shard never ends
    commit(state, 0, end_of(state, 0))  # the same value again, now on a read-only shard
    assert state.heartbeat(P, L, G, "c", [0]) == [1, 2]
    assert state.history[f"{P}/{L}/{G}/0"] == [end_of(state, 0)] * 2


def test_a_holder_whose_only_shard_finished_is_still_a_member() -> None:
    state = make_state(1, order=True)
    assert state.heartbeat(P, L, G, "c", []) == [0]
    state.split_shard(P, L, 0, key=HALF, count=None)
    commit(state, 0, end_of(state, 0))  # an empty parent: its begin is its end
    assert state.heartbeat(P, L, G, "c", []) == [1, 2]  # [] after the end is not a leave
    assert state.assignments(P, L, G) == {"c": [1, 2]}


def test_the_holder_of_a_finished_shard_may_commit_to_it_until_it_stops_reporting_it() -> None:
    state = make_state(2)
    assert state.heartbeat(P, L, G, "c", []) == [0, 1]
    state.split_shard(P, L, 0, key=QUARTER, count=None)
    commit(state, 0, end_of(state, 0))
    assert state.heartbeat(P, L, G, "c", [0, 1]) == [1, 2, 3]
    assert state.assignments(P, L, G) == {"c": [0, 1, 2, 3]}  # 0 is still reported
    commit(state, 0, end_of(state, 0))  # a last flush of the same value
    assert state.heartbeat(P, L, G, "c", [1, 2, 3]) == [1, 2, 3]
    with pytest.raises(ApiError) as caught:
        commit(state, 0, end_of(state, 0))
    assert caught.value.code == "ConsumerNotMatch"


def test_the_state_file_keeps_the_lineage_and_the_finished_shards(tmp_path: Path) -> None:
    state = make_state(2, order=True)
    state.split_shard(P, L, 0, key=QUARTER, count=None)
    commit(state, 0, end_of(state, 0), consumer="")  # forceSuccess: no consumer needed
    path = tmp_path / "state.json"
    state.save_file(path)
    again = EmulatorState(wall_clock=lambda: float(T0 + 60), monotonic=FakeClock())
    again.add_logstore(P, L, 2)
    again.load_file(path)
    assert again.list_shards(P, L) == state.list_shards(P, L)
    assert again.logstore(P, L).shards[3].parents == (0,)
    assert again.group(P, L, G).finished == {0}
    assert again.heartbeat(P, L, G, "c", []) == [1, 2, 3]


# --- through HTTP: the official SDK, a GO-style request, and the daemon's client -------------


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{P}/{L}:2"],
        consumer_groups=[f"{P}/{L}/{G}"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
    ) as handle:
        yield handle


@pytest.fixture
def sdk(emulator: EmulatorHandle) -> Iterator[LogClient]:
    client = LogClient(emulator.endpoint, KEY_ID, SECRET)
    client._isRowIp = True  # the approved way to reach an address with a port
    yield client
    client._session.close()


async def call(function: Callable[..., Any], *args: Any) -> Any:
    """A blocking SDK call, off the event loop that serves the emulator."""
    return await asyncio.to_thread(function, *args)


async def test_the_sdk_splits_merges_and_lists_shards_unchanged(
    emulator: EmulatorHandle, sdk: LogClient
) -> None:
    split = (await call(sdk.split_shard, P, L, 0, QUARTER)).get_shards_info()
    assert [(s["shardID"], s["status"]) for s in split] == [
        (0, "readonly"),
        (2, "readwrite"),
        (3, "readwrite"),
    ]
    merged = (await call(sdk.merge_shard, P, L, 3)).get_shards_info()
    assert [(s["shardID"], s["status"]) for s in merged] == [
        (4, "readwrite"),
        (3, "readonly"),
        (1, "readonly"),
    ]
    listed = (await call(sdk.list_shards, P, L)).get_shards_info()
    assert [(s["shardID"], s["status"]) for s in listed] == [
        (0, "readonly"),
        (1, "readonly"),
        (2, "readwrite"),
        (3, "readonly"),
        (4, "readwrite"),
    ]
    assert (listed[4]["inclusiveBeginKey"], listed[4]["exclusiveEndKey"]) == (QUARTER, "f" * 32)
    with pytest.raises(LogException) as caught:
        await call(sdk.split_shard, P, L, 0, QUARTER)
    assert (caught.value.get_resp_status(), caught.value.get_error_code()) == (
        400,
        "ParameterInvalid",
    )
    requests = emulator.state.snapshot()["requests"]
    assert requests["SplitShard"] == {"OK": 1, "ParameterInvalid": 1}
    assert requests["MergeShards"] == {"OK": 1}


async def test_our_client_splits_as_go_does_and_the_sdk_lists_the_result(
    emulator: EmulatorHandle, sdk: LogClient
) -> None:
    async with SLSClient(
        endpoint=emulator.url, credentials=lambda: Credentials(KEY_ID, SECRET)
    ) as ours:
        split = await ours.split_shard(P, L, 1, count=3)  # shardCount, no key
        assert [(s.shard, s.read_only) for s in split] == [
            (1, True),
            (2, False),
            (3, False),
            (4, False),
        ]
        halves = await ours.split_shard(P, L, 2, key=f"{HASH_SPACE * 7 // 12:032x}")
        assert [s.shard for s in halves] == [2, 5, 6]
        merged = await ours.merge_shards(P, L, 5)
        assert [(s.shard, s.read_only) for s in merged] == [(7, False), (5, True), (6, True)]
        assert await ours.list_shards(P, L) == [
            ShardInfo(
                t["shardID"],
                t["status"],
                t["inclusiveBeginKey"],
                t["exclusiveEndKey"],
                t["createTime"],
            )
            for t in (await call(sdk.list_shards, P, L)).get_shards_info()
        ]
