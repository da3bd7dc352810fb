"""The emulator's shard data: writes (`POST /_emulator/write`, `--write-rate`), GetCursorTime,
and the shards in /_emulator/state, through the daemon's own client."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from cpmgr.emulator import add_emulator_arguments, options_from_args, running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.emulator.shards import decode_cursor, encode_cursor, initial_shards
from cpmgr.emulator.writer import SteadyWriter
from cpmgr.errors import SLSError
from cpmgr.sls.client import SLSClient
from cpmgr.sls.signer import Credentials

P, L = "data-project", "data-logstore"
KEY_ID, SECRET = "data-key", "data-secret"
T0 = 1_700_000_000


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def wall() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
def monotonic() -> FakeClock:
    return FakeClock(100.0)


@pytest.fixture
async def emulator(wall: FakeClock, monotonic: FakeClock) -> AsyncIterator[EmulatorHandle]:
    # No keys: the fake wall clock would make every signature's Date look expired.
    async with running_emulator(
        logstores=[f"{P}/{L}:3"], wall_clock=wall, monotonic=monotonic
    ) as handle:
        yield handle


@pytest.fixture
async def client(emulator: EmulatorHandle) -> AsyncIterator[SLSClient]:
    async with SLSClient(
        endpoint=emulator.url, credentials=lambda: Credentials(KEY_ID, SECRET)
    ) as sls:
        yield sls


async def post_write(handle: EmulatorHandle, body: dict[str, Any]) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(handle.url + "/_emulator/write", json=body) as response,
    ):
        return response.status, await response.json()


# --- GetCursorTime on the model --------------------------------------------------------------


def test_cursor_time_covers_begin_to_end_inclusive() -> None:
    shard = initial_shards(1, T0)[0]
    assert shard.cursor_time(shard.end) == T0  # empty: the creation time
    shard.append(3, T0 + 5)
    shard.append(2, T0 + 9)
    begin = shard.begin
    assert [shard.cursor_time(begin + i) for i in range(5)] == [T0 + 5] * 3 + [T0 + 9] * 2
    assert shard.cursor_time(shard.end) == T0 + 9  # the newest log group's time
    for outside in (begin - 1, shard.end + 1):
        with pytest.raises(ValueError, match="outside"):
            shard.cursor_time(outside)


# --- writes and GetCursorTime over HTTP ------------------------------------------------------


async def test_a_write_moves_the_end_and_records_receive_times(
    emulator: EmulatorHandle, client: SLSClient, wall: FakeClock
) -> None:
    status, answer = await post_write(
        emulator, {"project": P, "logstore": L, "shard": 1, "count": 4, "receive_time": T0 + 30}
    )
    assert status == 200
    begin, end = answer["shards"][0]["begin"], answer["shards"][0]["end"]
    assert answer["shards"] == [{"shard": 1, "begin": begin, "end": end}]
    assert decode_cursor(end) - decode_cursor(begin) == 4
    assert await client.get_cursor(P, L, 1, "end") == end
    wall.now = T0 + 45  # no receive_time: the emulator's wall clock
    _, everywhere = await post_write(emulator, {"project": P, "logstore": L, "count": 2})
    assert [entry["shard"] for entry in everywhere["shards"]] == [0, 1, 2]
    newest = await client.get_cursor(P, L, 1, "end")
    assert decode_cursor(newest) - decode_cursor(begin) == 6
    times = [
        await client.get_cursor_time(P, L, 1, encode_cursor(decode_cursor(begin) + i))
        for i in range(7)
    ]
    assert times == [T0 + 30] * 4 + [T0 + 45] * 3  # the end cursor: the newest log group
    assert await client.get_cursor_time(P, L, 0, await client.get_cursor(P, L, 0, "begin")) == (
        T0 + 45
    )
    shards = emulator.state.snapshot()["shards"]
    assert shards[f"{P}/{L}/1"] == {"status": "readwrite", "begin": begin, "end": newest}
    assert emulator.state.snapshot()["requests"]["GetCursorTime"] == {"OK": 8}


async def test_get_cursor_time_refuses_cursors_outside_the_shard(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    emulator.state.write(P, L, shard=0, count=2, receive_time=T0)
    end = decode_cursor(await client.get_cursor(P, L, 0, "end"))
    for cursor in (encode_cursor(end + 1), encode_cursor(end - 3), "not-a-cursor", ""):
        with pytest.raises(SLSError) as refused:
            await client.get_cursor_time(P, L, 0, cursor)
        assert (refused.value.status, refused.value.code) == (400, "InvalidCursor")
    with pytest.raises(SLSError) as unknown:
        await client.get_cursor_time(P, L, 7, encode_cursor(end))
    assert unknown.value.code == "ShardNotExist"


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"project": P, "logstore": L, "count": -1}, 400, "ParameterInvalid"),
        ({"project": P, "logstore": L, "count": "3"}, 400, "ParameterInvalid"),
        ({"project": P, "logstore": L}, 400, "ParameterInvalid"),
        ({"project": P, "logstore": L, "count": 1, "shard": 9}, 400, "ShardNotExist"),
        ({"project": P, "logstore": "nowhere", "count": 1}, 404, "LogStoreNotExist"),
    ],
)
async def test_bad_writes_are_refused_and_change_nothing(
    emulator: EmulatorHandle, body: dict[str, Any], status: int, code: str
) -> None:
    before = emulator.state.snapshot()["shards"]
    answered, answer = await post_write(emulator, body)
    assert (answered, answer["errorCode"]) == (status, code)
    assert emulator.state.snapshot()["shards"] == before


async def test_a_read_only_shard_refuses_writes(emulator: EmulatorHandle) -> None:
    emulator.state.logstore(P, L).shards[2].status = "readonly"
    one = {"project": P, "logstore": L, "shard": 2, "count": 1}
    status, answer = await post_write(emulator, one)
    assert (status, answer["errorCode"]) == (400, "ParameterInvalid")
    _, everywhere = await post_write(emulator, {"project": P, "logstore": L, "count": 1})
    assert [entry["shard"] for entry in everywhere["shards"]] == [0, 1]


# --- the steady writer -----------------------------------------------------------------------


async def test_the_steady_writer_appends_rate_times_elapsed_to_every_read_write_shard(
    emulator: EmulatorHandle, wall: FakeClock, monotonic: FakeClock
) -> None:
    store = emulator.state.logstore(P, L)
    store.shards[2].status = "readonly"
    writer = SteadyWriter(emulator.state, 2.5)
    begins = {n: shard.end for n, shard in store.shards.items()}
    assert writer.write_due() == 0
    monotonic.now += 1.0
    wall.now = T0 + 1
    assert writer.write_due() == 2
    monotonic.now += 1.0
    wall.now = T0 + 2
    assert writer.write_due() == 3  # 5 due after 2 s: the half carried over
    monotonic.now += 0.3
    assert writer.write_due() == 0
    assert {n: shard.end - begins[n] for n, shard in store.shards.items()} == {0: 5, 1: 5, 2: 0}
    assert store.shards[0].cursor_time(begins[0]) == T0 + 1
    assert store.shards[0].cursor_time(begins[0] + 2) == T0 + 2


async def test_the_writer_task_writes_every_tick_until_closed(
    emulator: EmulatorHandle, monotonic: FakeClock
) -> None:
    ticks: list[float] = []
    three_ticks = asyncio.Event()

    async def sleep(seconds: float) -> None:
        ticks.append(seconds)
        monotonic.now += seconds
        if len(ticks) == 3:
            three_ticks.set()
        await asyncio.sleep(0)

    shard = emulator.state.logstore(P, L).shards[0]
    start = shard.end
    writer = SteadyWriter(emulator.state, 4, sleep=sleep)
    writer.start()
    await asyncio.wait_for(three_ticks.wait(), 10)
    await writer.close()
    assert ticks[:3] == [0.25] * 3  # one tick per log group at 4 per second
    assert shard.end - start == len(ticks) - 1  # each tick wrote what the previous one made due
    closed_at, count = shard.end, len(ticks)
    await asyncio.sleep(0)
    assert (shard.end, len(ticks)) == (closed_at, count)


async def test_write_rate_starts_a_writer_with_the_emulator_and_close_stops_it() -> None:
    async with running_emulator(logstores=[f"{P}/{L}:1"], write_rate=10) as handle:
        writer = handle.writer
        assert writer is not None and writer.running
    assert not writer.running
    async with running_emulator(logstores=[f"{P}/{L}:1"]) as idle:
        assert idle.writer is None


def test_cli_write_rate() -> None:
    parser = argparse.ArgumentParser()
    add_emulator_arguments(parser)
    assert options_from_args(parser.parse_args(["--listen", "127.0.0.1:0"])).write_rate == 0
    args = parser.parse_args(["--listen", "127.0.0.1:0", "--write-rate", "20"])
    assert options_from_args(args).write_rate == 20.0
    assert options_from_args(args).problems() == []
    bad = parser.parse_args(["--listen", "127.0.0.1:0", "--write-rate", "-1"])
    assert options_from_args(bad).problems() == ["--write-rate must be a number >= 0"]
