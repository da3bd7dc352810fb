"""The official aliyun-log-python-sdk, unchanged but for `_isRowIp = True`, against the emulator
(and beside cpmgr's own client making the same calls).

Faults stay off here: the SDK retries 5xx ten times with one-second sleeps.
"""

from __future__ import annotations

import asyncio
import time
from base64 import b64decode, b64encode
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any, Literal

import pytest
from aliyun.log import LogClient, LogException
from aliyun.log.auth import AUTH_VERSION_1, AUTH_VERSION_4
from aliyun.log.consumer.consumer_client import ConsumerClient

from cpmgr.emulator import running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.errors import SLSError
from cpmgr.sls.client import ConsumerGroup, SLSClient
from cpmgr.sls.signer import Credentials

P, L, G = "sdk-project", "sdk-logstore", "sdk-group"
KEY_ID, SECRET = "sdk-key-id", "sdk-key-secret"
CP1 = "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="
CP2 = "MTUyNDE1NTM3OTM3MzkwODQ5Nw=="
Version = Literal["v1", "v4"]


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


ClientFactory = Callable[..., LogClient]


@pytest.fixture
def monotonic() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def emulator(monotonic: FakeClock) -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{P}/{L}:4"],
        consumer_groups=[f"{P}/{L}/{G}"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
        monotonic=monotonic,
    ) as handle:
        yield handle


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Builds SDK clients for an emulator and closes their HTTP sessions afterwards."""
    clients: list[LogClient] = []

    def build(
        handle: EmulatorHandle,
        *,
        key_id: str = KEY_ID,
        secret: str = SECRET,
        version: Version = "v1",
    ) -> LogClient:
        auth_version = AUTH_VERSION_4 if version == "v4" else AUTH_VERSION_1
        client = LogClient(
            handle.endpoint, key_id, secret, auth_version=auth_version, region="cn-hangzhou"
        )
        client._isRowIp = True  # the approved way to reach an address with a port
        clients.append(client)
        return client

    yield build
    for client in clients:
        client._session.close()


async def call(function: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking SDK call off the event loop that serves the emulator."""
    return await asyncio.to_thread(function, *args, **kwargs)


async def sdk_error(function: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[int, str]:
    with pytest.raises(LogException) as caught:
        await call(function, *args, **kwargs)
    return caught.value.get_resp_status(), caught.value.get_error_code()


async def test_group_lifecycle(emulator: EmulatorHandle, make_client: ClientFactory) -> None:
    client = make_client(emulator)
    await call(client.create_consumer_group, P, L, "orders", 30, in_order=True)
    assert await sdk_error(client.create_consumer_group, P, L, "orders", 30) == (
        400,
        "ConsumerGroupAlreadyExist",
    )
    listed = await call(client.list_consumer_group, P, L)
    groups = listed.get_consumer_groups()
    assert [(g.get_consumer_group_name(), g.get_timeout(), g.is_in_order()) for g in groups] == [
        ("orders", 30, True),
        (G, 60, False),
    ]

    await call(client.update_consumer_group, P, L, "orders", timeout=45, in_order=False)
    listed = await call(client.list_consumer_group, P, L)
    assert listed.get_consumer_groups()[0].get_timeout() == 45
    assert listed.get_consumer_groups()[0].is_in_order() is False

    await call(client.delete_consumer_group, P, L, "orders")
    listed = await call(client.list_consumer_group, P, L)
    assert [g.get_consumer_group_name() for g in listed.get_consumer_groups()] == [G]
    assert await sdk_error(client.delete_consumer_group, P, L, "orders") == (
        404,
        "ConsumerGroupNotExist",
    )


async def test_two_consumers_balance_then_one_expires(
    emulator: EmulatorHandle, make_client: ClientFactory, monotonic: FakeClock
) -> None:
    client = make_client(emulator)

    async def beat(consumer: str, shards: list[int]) -> list[int]:
        response = await call(client.heart_beat, P, L, G, consumer, shards)
        return list(response.get_shards())

    assert await beat("c1", []) == [0, 1, 2, 3]
    assert await beat("c2", []) == []  # shards 2 and 3 are first released by c1
    assert await beat("c1", [0, 1, 2, 3]) == [0, 1]
    assert await beat("c1", [0, 1]) == [0, 1]
    assert await beat("c2", []) == [2, 3]
    assert await beat("c2", [2, 3]) == [2, 3]

    monotonic.advance(40)
    assert await beat("c1", [0, 1]) == [0, 1]
    monotonic.advance(25)  # c2 silent for 65 s, beyond the group's 60 s timeout
    assert await beat("c1", [0, 1]) == [0, 1, 2, 3]
    assert await sdk_error(client.heart_beat, P, L, G, "c2", [2, 3]) == (
        400,
        "NotExistConsumerWithBody",
    )


@pytest.mark.parametrize("version", ["v1", "v4"])
async def test_checkpoints_update_and_read_back(
    emulator: EmulatorHandle, make_client: ClientFactory, version: Version
) -> None:
    client = make_client(emulator, version=version)
    before = time.time()
    await call(client.update_check_point, P, L, G, 1, CP1, consumer="c1")
    await call(client.update_check_point, P, L, G, 1, CP2)  # consumer "" with forceSuccess=True

    one = (await call(client.get_check_point, P, L, G, 1)).get_consumer_group_check_points()
    assert len(one) == 1
    assert (one[0]["shard"], one[0]["checkpoint"], one[0]["consumer"]) == (1, CP2, "")
    assert before * 1e6 <= one[0]["updateTime"] <= time.time() * 1e6

    every = (await call(client.get_check_point, P, L, G)).get_consumer_group_check_points()
    assert [(entry["shard"], entry["checkpoint"]) for entry in every] == [
        (0, ""),
        (1, CP2),
        (2, ""),
        (3, ""),
    ]
    unknown = await call(client.get_check_point, P, L, G, 7)
    assert unknown.get_count() == 0
    assert emulator.state.snapshot()["history"] == {f"{P}/{L}/{G}/1": [CP1, CP2]}


async def test_list_shards(emulator: EmulatorHandle, make_client: ClientFactory) -> None:
    shards = (await call(make_client(emulator).list_shards, P, L)).get_shards_info()
    assert [shard["shardID"] for shard in shards] == [0, 1, 2, 3]


async def test_error_codes_seen_by_the_sdk(
    emulator: EmulatorHandle, make_client: ClientFactory
) -> None:
    client = make_client(emulator)
    update = client.update_check_point
    assert await sdk_error(update, P, L, G, 0, "not base64!") == (400, "InvalidShardCheckPoint")
    assert await sdk_error(update, P, L, "no-such-group", 0, CP1) == (404, "ConsumerGroupNotExist")
    assert await sdk_error(update, P, L, G, 9, CP1) == (404, "ShardNotExist")
    assert await sdk_error(update, P, "no-such-logstore", G, 0, CP1) == (404, "LogStoreNotExist")
    assert await sdk_error(update, "no-such-project", L, G, 0, CP1) == (404, "ProjectNotExist")
    assert await sdk_error(update, P, L, G, 0, CP1, consumer="", force_success=False) == (
        400,
        "ParameterInvalid",
    )
    assert emulator.state.snapshot()["history"] == {}


@pytest.mark.parametrize("version", ["v1", "v4"])
async def test_bad_credentials_seen_by_the_sdk(
    emulator: EmulatorHandle, make_client: ClientFactory, version: Version
) -> None:
    wrong_secret = make_client(emulator, secret="wrong", version=version)
    assert await sdk_error(wrong_secret.get_check_point, P, L, G, 0) == (401, "SignatureNotMatch")
    unknown_key = make_client(emulator, key_id="nobody", version=version)
    assert await sdk_error(unknown_key.get_check_point, P, L, G, 0) == (401, "Unauthorized")


async def test_ownership_is_enforced_without_force_success(
    emulator: EmulatorHandle, make_client: ClientFactory
) -> None:
    client = make_client(emulator)
    strict: dict[str, Any] = {"force_success": False}
    update = client.update_check_point
    assert await sdk_error(update, P, L, G, 0, CP1, consumer="ghost", **strict) == (
        404,
        "ConsumerNotExist",
    )
    await call(client.heart_beat, P, L, G, "owner", [])
    await call(client.heart_beat, P, L, G, "other", [])
    await call(update, P, L, G, 0, CP1, consumer="owner", **strict)
    assert await sdk_error(update, P, L, G, 0, CP2, consumer="other", **strict) == (
        400,
        "ConsumerNotMatch",
    )
    await call(update, P, L, G, 0, CP2, consumer="other")  # forceSuccess=True overrides
    assert emulator.state.snapshot()["history"] == {f"{P}/{L}/{G}/0": [CP1, CP2]}


async def test_client_clock_off_by_more_than_15_minutes(make_client: ClientFactory) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:1"],
        consumer_groups=[f"{P}/{L}/{G}"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
        wall_clock=lambda: time.time() + 16 * 60,
    ) as handle:
        for version in ("v1", "v4"):
            client = make_client(handle, version=version)
            assert await sdk_error(client.get_check_point, P, L, G, 0) == (
                400,
                "RequestTimeExpired",
            )


async def test_sdk_consumer_library_client_flow(emulator: EmulatorHandle) -> None:
    """The SDK's own consumer-group client: create if missing, join, read, commit, read."""
    consumer = ConsumerClient(emulator.endpoint, KEY_ID, SECRET, P, L, "library-group", "worker-1")
    consumer.mclient._isRowIp = True
    try:
        await call(consumer.ensure_consumer_group_created, 40, False)
        await call(consumer.ensure_consumer_group_created, 50, False)  # exists: updated
        assert (await call(consumer.get_consumer_group)).get_timeout() == 50

        held: list[int] = []
        assert await call(consumer.heartbeat, [], held) is True
        assert held == [0, 1, 2, 3]
        # a never-committed shard reads as one entry with an empty checkpoint, not as an error
        assert (await call(consumer.get_check_point, 2))["checkpoint"] == ""
        await call(consumer.update_check_point, 2, "worker-1", CP1)
        assert (await call(consumer.get_check_point, 2))["checkpoint"] == CP1
    finally:
        consumer.mclient._session.close()


# --- the same calls from the SDK and from cpmgr's own client ------------------------------------


@pytest.fixture
async def our_client(emulator: EmulatorHandle) -> AsyncIterator[SLSClient]:
    async with SLSClient(
        endpoint=emulator.url, credentials=lambda: Credentials(KEY_ID, SECRET)
    ) as client:
        yield client


async def test_get_cursor_answers_the_sdk_and_our_client_alike(
    emulator: EmulatorHandle, make_client: ClientFactory, our_client: SLSClient
) -> None:
    sdk = make_client(emulator)
    shard = emulator.state.logstore(P, L).shards[2]
    shard.append(5, 1_700_000_000)
    shard.append(5, 1_700_000_100)
    for start in ("begin", "end", 1_699_999_000, 1_700_000_050, 1_700_000_100, 1_800_000_000):
        theirs = (await call(sdk.get_cursor, P, L, 2, start)).get_cursor()
        assert theirs == await our_client.get_cursor(P, L, 2, start), start
    begin = (await call(sdk.get_begin_cursor, P, L, 2)).get_cursor()
    end = (await call(sdk.get_end_cursor, P, L, 2)).get_cursor()
    assert int(b64decode(end)) - int(b64decode(begin)) == 10
    assert await sdk_error(sdk.get_cursor, P, L, 9, "end") == (400, "ShardNotExist")
    assert emulator.state.snapshot()["requests"]["GetCursor"] == {"OK": 14, "ShardNotExist": 1}


async def test_list_shards_and_one_shard_checkpoint_alike(
    emulator: EmulatorHandle, make_client: ClientFactory, our_client: SLSClient
) -> None:
    sdk = make_client(emulator)
    theirs = (await call(sdk.list_shards, P, L)).get_shards_info()
    ours = await our_client.list_shards(P, L)
    assert [(s.shard, s.status, s.begin_key, s.end_key, s.create_time) for s in ours] == [
        (t["shardID"], t["status"], t["inclusiveBeginKey"], t["exclusiveEndKey"], t["createTime"])
        for t in theirs
    ]
    await our_client.update_checkpoint(P, L, G, 1, CP1, consumer="c1")
    for shard in (0, 1):
        entry = (await call(sdk.get_check_point, P, L, G, shard)).get_consumer_group_check_points()
        ours_entry = await our_client.get_shard_checkpoint(P, L, G, shard)
        assert ours_entry is not None
        assert [entry[0]["checkpoint"], entry[0]["consumer"], entry[0]["updateTime"]] == [
            ours_entry.checkpoint,
            ours_entry.consumer,
            ours_entry.update_time,
        ]


async def test_group_settings_changed_by_one_are_seen_by_the_other(
    emulator: EmulatorHandle, make_client: ClientFactory, our_client: SLSClient
) -> None:
    sdk = make_client(emulator)
    await our_client.create_consumer_group(P, L, "shared", heartbeat_timeout=20, order=True)
    await call(sdk.update_consumer_group, P, L, "shared", timeout=25)
    assert ConsumerGroup("shared", 25, True) in await our_client.list_consumer_groups(P, L)
    await our_client.update_consumer_group(P, L, "shared", heartbeat_timeout=30, order=False)
    groups = (await call(sdk.list_consumer_group, P, L)).get_consumer_groups()
    shared = next(g for g in groups if g.get_consumer_group_name() == "shared")
    assert (shared.get_timeout(), shared.is_in_order()) == (30, False)


async def test_sdk_and_our_heartbeats_share_one_group(
    emulator: EmulatorHandle, make_client: ClientFactory, our_client: SLSClient
) -> None:
    sdk = make_client(emulator)

    async def sdk_beat(shards: list[int]) -> list[int]:
        return list((await call(sdk.heart_beat, P, L, G, "sdk-1", shards)).get_shards())

    assert await sdk_beat([]) == [0, 1, 2, 3]
    assert await our_client.heartbeat(P, L, G, "cpmgr-1", []) == []
    assert await sdk_beat([0, 1, 2, 3]) == [0, 1]  # 2 and 3 in transfer, still reported
    assert await our_client.heartbeat(P, L, G, "cpmgr-1", []) == []
    assert await sdk_beat([0, 1]) == [0, 1]
    assert await our_client.heartbeat(P, L, G, "cpmgr-1", []) == [2, 3]
    assert await our_client.heartbeat(P, L, G, "cpmgr-1", [2, 3]) == [2, 3]
    assert await our_client.heartbeat(P, L, G, "cpmgr-1", []) == []  # leaves
    assert await sdk_beat([0, 1]) == [0, 1, 2, 3]
    with pytest.raises(SLSError) as caught:
        await our_client.heartbeat(P, L, G, "cpmgr-1", [2])
    assert caught.value.code == "NotExistConsumerWithBody"
    assert await sdk_error(sdk.heart_beat, P, L, G, "cpmgr-1", [2]) == (
        400,
        "NotExistConsumerWithBody",
    )


async def test_shard_data_calls_answer_the_sdk_and_our_client_alike(
    emulator: EmulatorHandle, make_client: ClientFactory, our_client: SLSClient
) -> None:
    """list_shards (with status), get_begin/end_cursor, get_cursor_time and PY's
    get_previous_cursor_time (its clamping included) on shards holding data."""
    sdk = make_client(emulator)
    emulator.state.write(P, L, shard=1, count=3, receive_time=1_700_000_010)
    emulator.state.write(P, L, shard=1, count=2, receive_time=1_700_000_070)
    emulator.state.logstore(P, L).shards[3].status = "readonly"
    listed = (await call(sdk.list_shards, P, L)).get_shards_info()
    assert [(s["shardID"], s["status"]) for s in listed] == [
        (0, "readwrite"),
        (1, "readwrite"),
        (2, "readwrite"),
        (3, "readonly"),
    ]
    begin = (await call(sdk.get_begin_cursor, P, L, 1)).get_cursor()
    end = (await call(sdk.get_end_cursor, P, L, 1)).get_cursor()
    assert (begin, end) == (
        await our_client.get_cursor(P, L, 1, "begin"),
        await our_client.get_cursor(P, L, 1, "end"),
    )
    first = int(b64decode(begin))
    for offset, received in ((0, 1_700_000_010), (2, 1_700_000_010), (3, 1_700_000_070)):
        cursor = b64encode(str(first + offset).encode()).decode()
        theirs = (await call(sdk.get_cursor_time, P, L, 1, cursor)).get_cursor_time()
        assert theirs == await our_client.get_cursor_time(P, L, 1, cursor) == received
    # the "previous cursor time" of a checkpoint: the last consumed log group's receive time
    previous = await call(sdk.get_previous_cursor_time, P, L, 1, end)
    assert previous.get_cursor_time() == 1_700_000_070
    clamped = await call(sdk.get_previous_cursor_time, P, L, 1, begin)  # before begin: clamped
    assert clamped.get_cursor_time() == 1_700_000_010
    past_end = b64encode(str(first + 6).encode()).decode()
    assert await sdk_error(sdk.get_cursor_time, P, L, 1, past_end) == (400, "InvalidCursor")
    # an empty shard: begin == end, and its time is the shard's creation time
    created = emulator.state.logstore(P, L).create_time
    empty_end = (await call(sdk.get_end_cursor, P, L, 0)).get_cursor()
    assert (await call(sdk.get_cursor_time, P, L, 0, empty_end)).get_cursor_time() == created
