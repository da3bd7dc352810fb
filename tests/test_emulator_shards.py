"""The emulator's shards and GetCursor: begin/end cursors, time -> cursor, through SLSClient."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmgr.emulator import running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.emulator.shards import Shard, decode_cursor, encode_cursor, initial_shards
from cpmgr.errors import SLSError
from cpmgr.sls.client import ShardInfo, SLSClient
from cpmgr.sls.signer import Credentials

P, L = "cursor-project", "cursor-logstore"
KEY_ID, SECRET = "cursor-key", "cursor-secret"
T0 = 1_700_000_000


def empty_shard(create_time: int = T0) -> Shard:
    return initial_shards(1, create_time)[0]


# --- the shard model -------------------------------------------------------------------------


def test_a_cursor_is_base64_of_a_decimal_integer() -> None:
    assert encode_cursor(1524155379373908496) == "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="
    assert decode_cursor("MTUyNDE1NTM3OTM3MzkwODQ5Ng==") == 1524155379373908496
    for bad in ("not base64!", base64.b64encode(b"12a").decode(), "", "MTA"):
        with pytest.raises(ValueError, match="not a cursor"):
            decode_cursor(bad)


def test_a_new_shard_begins_where_it_ends() -> None:
    shard = empty_shard()
    assert shard.begin_cursor == shard.end_cursor
    assert decode_cursor(shard.begin_cursor) == T0 * 1_000_000_000
    assert shard.cursor_at(0) == shard.cursor_at(T0 + 10**6) == shard.end


def test_writes_move_the_end_one_step_per_log_group() -> None:
    shard = empty_shard()
    begin = shard.begin
    shard.append(3, T0 + 1)
    shard.append(2, T0 + 1)
    shard.append(4, T0 + 5)
    assert (shard.begin, shard.end) == (begin, begin + 9)
    assert shard.cursor_at(T0) == begin  # before the oldest data: the begin cursor
    assert shard.cursor_at(T0 + 1) == begin  # the first log group received at T0+1
    assert shard.cursor_at(T0 + 2) == begin + 5  # nothing at T0+2..4: the next one after
    assert shard.cursor_at(T0 + 5) == begin + 5
    assert shard.cursor_at(T0 + 6) == shard.end  # after the newest: the end
    assert [shard.receive_time(begin + i) for i in (0, 4, 5, 8)] == [T0 + 1] * 2 + [T0 + 5] * 2
    assert shard.receive_time(shard.end) is None
    assert shard.receive_time(begin - 1) is None


def test_a_read_only_shard_keeps_its_end() -> None:
    shard = empty_shard()
    shard.append(2, T0)
    shard.status = "readonly"
    with pytest.raises(ValueError, match="read-only"):
        shard.append(1, T0 + 1)
    assert shard.end == shard.begin + 2
    assert shard.listing()["status"] == "readonly"


def test_a_clock_stepping_back_never_makes_time_to_cursor_go_backwards() -> None:
    shard = empty_shard()
    shard.append(1, T0 + 10)
    shard.append(1, T0 + 5)  # received "earlier": counted with the newest second
    assert shard.receive_time(shard.begin + 1) == T0 + 10
    assert shard.cursor_at(T0 + 6) == shard.begin


writes = st.lists(st.tuples(st.integers(0, 5), st.integers(T0 - 20, T0 + 20)), max_size=30)


@settings(max_examples=200, deadline=None)
@given(writes=writes, times=st.lists(st.integers(T0 - 30, T0 + 30), min_size=2, max_size=10))
def test_time_to_cursor_is_monotonic_and_finds_the_first_group_at_or_after(
    writes: list[tuple[int, int]], times: list[int]
) -> None:
    shard = empty_shard()
    for count, when in writes:
        shard.append(count, when)
    cursors = [shard.cursor_at(when) for when in sorted(times)]
    assert cursors == sorted(cursors)
    for when in times:
        position = shard.cursor_at(when)
        assert shard.begin <= position <= shard.end
        received = shard.receive_time(position)
        assert received is None or received >= when  # None only at the end
        assert (received is None) == (position == shard.end)
        earlier = shard.receive_time(position - 1)
        assert earlier is None or earlier < when


def test_initial_shards_split_the_hash_space_evenly() -> None:
    shards = initial_shards(4, T0)
    assert [shards[n].begin_key[:2] for n in range(4)] == ["00", "40", "80", "c0"]
    assert shards[3].end_key == "f" * 32
    assert all(shard.create_time == T0 and shard.parents == () for shard in shards.values())


# --- GetCursor and ListShards over HTTP, through the daemon's own client ---------------------


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{P}/{L}:2"], access_key_id=KEY_ID, access_key_secret=SECRET
    ) as handle:
        yield handle


@pytest.fixture
async def client(emulator: EmulatorHandle) -> AsyncIterator[SLSClient]:
    async with SLSClient(
        endpoint=emulator.url, credentials=lambda: Credentials(KEY_ID, SECRET)
    ) as sls:
        yield sls


async def test_get_cursor_begin_end_and_time(emulator: EmulatorHandle, client: SLSClient) -> None:
    shard = emulator.state.logstore(P, L).shards[1]
    assert await client.get_cursor(P, L, 1, "begin") == await client.get_cursor(P, L, 1, "end")
    shard.append(10, T0)
    shard.append(10, T0 + 60)
    begin, end = await client.get_cursor(P, L, 1, "begin"), await client.get_cursor(P, L, 1, "end")
    assert decode_cursor(end) - decode_cursor(begin) == 20
    assert await client.get_cursor(P, L, 1, T0 - 3600) == begin
    assert decode_cursor(await client.get_cursor(P, L, 1, T0 + 1)) == decode_cursor(begin) + 10
    assert await client.get_cursor(P, L, 1, T0 + 61) == end
    # cursors are per shard: shard 0 has no data and its own positions
    assert await client.get_cursor(P, L, 0, "end") == await client.get_cursor(P, L, 0, T0)


async def test_get_cursor_errors(client: SLSClient) -> None:
    with pytest.raises(SLSError) as unknown_shard:
        await client.get_cursor(P, L, 5, "begin")
    assert (unknown_shard.value.status, unknown_shard.value.code) == (400, "ShardNotExist")
    assert unknown_shard.value.permanent
    with pytest.raises(SLSError) as unknown_logstore:
        await client.get_cursor(P, "nowhere", 0, "end")
    assert (unknown_logstore.value.status, unknown_logstore.value.code) == (
        404,
        "LogStoreNotExist",
    )


async def test_list_shards_through_the_client(emulator: EmulatorHandle, client: SLSClient) -> None:
    shards = await client.list_shards(P, L)
    created = emulator.state.logstore(P, L).create_time
    assert shards == [
        ShardInfo(0, "readwrite", "0" * 32, "8" + "0" * 31, created),
        ShardInfo(1, "readwrite", "8" + "0" * 31, "f" * 32, created),
    ]
    assert emulator.state.snapshot()["requests"]["ListShards"] == {"OK": 1}
