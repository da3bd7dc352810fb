"""Late landing: an UpdateCheckPoint applied after its client gave up, in order with the rest."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest

from cpmgr.emulator import add_emulator_arguments, options_from_args, running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.emulator.faults import FaultInjector, FaultSettings, LateLanding
from cpmgr.errors import SLSError
from cpmgr.sls.client import SLSClient
from cpmgr.sls.signer import Credentials

P, L, G = "proj", "store", "group-a"
GROUP_KEY = f"{P}/{L}/{G}"
GROUP_PATH = f"/logstores/{L}/consumergroups/{G}"
HOST = {"Host": f"{P}.emulator.local"}
CP100, CP200, CP300 = "MTAw", "MjAw", "MzAw"
SETTLE_BOUND = 10.0


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


def sls_client(handle: EmulatorHandle, *, request_timeout: float) -> SLSClient:
    return SLSClient(
        endpoint=handle.url,
        credentials=lambda: Credentials("any-id", "any-secret"),
        request_timeout=request_timeout,
    )


async def post_faults(
    session: aiohttp.ClientSession, handle: EmulatorHandle, body: object
) -> tuple[int, dict[str, object]]:
    async with session.post(f"{handle.url}/_emulator/faults", data=json.dumps(body)) as response:
        return response.status, await response.json()


async def settled(handle: EmulatorHandle) -> dict[str, object]:
    await asyncio.wait_for(handle.app.settle_late(), SETTLE_BOUND)
    return handle.state.snapshot()


async def test_timed_out_update_lands_after_the_retry_and_rewinds_the_shard(
    session: aiohttp.ClientSession,
) -> None:
    """The issue's sequence: 100 times out, 200 succeeds, then 100 lands: history [200, 100]."""
    async with running_emulator(logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY]) as handle:
        status, settings = await post_faults(
            session, handle, {"late": {GROUP_KEY: {"count": 1, "delay_ms": 600}}}
        )
        assert status == 200
        assert settings["late"] == {GROUP_KEY: {"count": 1, "delay_ms": 600.0}}
        async with sls_client(handle, request_timeout=0.2) as client:
            with pytest.raises(SLSError) as timed_out:
                await client.update_checkpoint(P, L, G, 0, CP100)
            assert timed_out.value.code == "Timeout"
            await client.update_checkpoint(P, L, G, 0, CP200)  # the retry: not held
            before = handle.state.snapshot()
            assert before["history"] == {f"{GROUP_KEY}/0": [CP200]}
            assert before["late_pending"] == 1
            after = await settled(handle)
    assert after["history"] == {f"{GROUP_KEY}/0": [CP200, CP100]}
    assert after["checkpoints"] == {f"{GROUP_KEY}/0": CP100}
    assert after["late_pending"] == 0
    assert after["requests"] == {"UpdateCheckPoint": {"OK": 2}}
    assert handle.faults.settings.late == {}  # the one late landing is used up


async def test_late_requests_land_in_order_with_other_shards_and_groups() -> None:
    """Only the named group's next N updates are held; everything else lands at once."""
    other = f"{P}/{L}/group-b"
    late = {GROUP_KEY: LateLanding(count=2, delay_ms=400)}
    async with (
        running_emulator(
            logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY, other], late=late
        ) as handle,
        sls_client(handle, request_timeout=0.1) as client,
    ):
        for shard, value in ((0, CP100), (1, CP100)):
            with pytest.raises(SLSError, match="Timeout"):
                await client.update_checkpoint(P, L, G, shard, value)
        await client.update_checkpoint(P, L, G, 0, CP200)
        await client.update_checkpoint(P, L, "group-b", 0, CP300)
        after = await settled(handle)
    assert after["history"] == {
        f"{GROUP_KEY}/0": [CP200, CP100],
        f"{GROUP_KEY}/1": [CP100],
        f"{other}/0": [CP300],
    }


async def test_a_client_still_waiting_gets_the_answer_of_the_late_apply() -> None:
    late = {GROUP_KEY: LateLanding(count=1, delay_ms=50)}
    async with (
        running_emulator(
            logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY], late=late
        ) as handle,
        sls_client(handle, request_timeout=10) as client,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        await client.update_checkpoint(P, L, G, 1, CP100)
        assert loop.time() - started >= 0.050
        assert handle.state.snapshot()["history"] == {f"{GROUP_KEY}/1": [CP100]}
        # A late request that fails when applied answers that failure, and changes nothing.
        handle.faults.update({"late": {GROUP_KEY: {"count": 1, "delay_ms": 10}}})
        with pytest.raises(SLSError) as refused:
            await client.update_checkpoint(P, L, G, 7, CP200)
    assert (refused.value.status, refused.value.code) == (404, "ShardNotExist")
    assert handle.state.snapshot()["requests"]["UpdateCheckPoint"] == {
        "OK": 1,
        "ShardNotExist": 1,
    }


async def test_a_held_request_lands_although_its_connection_is_gone() -> None:
    held = asyncio.Event()

    async def signalling_sleep(seconds: float) -> None:
        held.set()
        await asyncio.sleep(seconds)

    late = {GROUP_KEY: LateLanding(count=1, delay_ms=300)}
    async with running_emulator(
        logstores=[f"{P}/{L}:1"], consumer_groups=[GROUP_KEY], late=late, sleep=signalling_sleep
    ) as handle:
        url = f"{handle.url}{GROUP_PATH}?type=checkpoint&consumer=&forceSuccess=true"
        body = json.dumps({"shard": 0, "checkpoint": CP300})
        async with aiohttp.ClientSession() as doomed:
            request = asyncio.ensure_future(doomed.post(url, data=body, headers=HOST))
            await asyncio.wait_for(held.wait(), SETTLE_BOUND)
            request.cancel()  # drops the connection while the request is held
        assert handle.state.snapshot()["history"] == {}
        after = await settled(handle)
    assert after["history"] == {f"{GROUP_KEY}/0": [CP300]}


async def test_held_requests_are_dropped_when_the_emulator_stops() -> None:
    late = {GROUP_KEY: LateLanding(count=1, delay_ms=60_000)}
    async with (
        running_emulator(
            logstores=[f"{P}/{L}:1"], consumer_groups=[GROUP_KEY], late=late
        ) as handle,
        sls_client(handle, request_timeout=0.1) as client,
    ):
        with pytest.raises(SLSError, match="Timeout"):
            await client.update_checkpoint(P, L, G, 0, CP100)
    assert handle.state.late_pending == 0
    assert handle.state.snapshot()["history"] == {}


async def test_late_rate_holds_a_seeded_share_of_updates_only() -> None:
    holds: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        holds.append(seconds)

    async with running_emulator(
        logstores=[f"{P}/{L}:1"],
        consumer_groups=[GROUP_KEY],
        seed=5,
        late_rate=0.3,
        late_ms=(100.0, 300.0),
        sleep=recording_sleep,
    ) as handle:
        async with sls_client(handle, request_timeout=10) as client:
            for _ in range(1000):
                await client.update_checkpoint(P, L, G, 0, CP100)
            for _ in range(100):
                await client.get_checkpoint(P, L, G)
        after = await settled(handle)
    assert len(holds) / 1000 == pytest.approx(0.3, abs=0.04)
    assert all(0.100 <= hold <= 0.300 for hold in holds)
    assert len(after["history"][f"{GROUP_KEY}/0"]) == 1000  # every held update landed


def test_same_seed_holds_the_same_requests() -> None:
    def holds(seed: int) -> list[float | None]:
        settings = FaultSettings(error_rate=0.2, late_rate=0.4, late_ms=(10.0, 20.0))
        injector = FaultInjector(settings, seed=seed)
        return [injector.decide(GROUP_KEY, can_land_late=True).late_seconds for _ in range(200)]

    first = holds(3)
    assert first == holds(3)
    assert first != holds(4)
    assert 40 < sum(1 for hold in first if hold is not None) < 100


def test_late_landings_are_consumed_one_by_one() -> None:
    injector = FaultInjector(FaultSettings(late={GROUP_KEY: LateLanding(2, 250.0)}), seed=1)
    decisions = [injector.decide(GROUP_KEY, can_land_late=True) for _ in range(3)]
    assert [decision.late_seconds for decision in decisions] == [0.25, 0.25, None]
    assert injector.decide("other/group/key", can_land_late=True).late_seconds is None
    assert injector.settings.late == {}


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"late_rate": 0.5}, "late_ms"),
        ({"late_rate": 2, "late_ms": [1, 2]}, "late_rate"),
        ({"late_ms": [5, 1]}, "late_ms"),
        ({"late": {"a/b": {"count": 1, "delay_ms": 5}}}, "PROJECT/LOGSTORE/GROUP"),
        ({"late": {"a/b/c": {"count": 0, "delay_ms": 5}}}, "late.a/b/c"),
        ({"late": {"a/b/c": {"count": 1}}}, "late.a/b/c"),
        ({"late": {"a/b/c": {"count": 1, "delay_ms": -1}}}, "late.a/b/c"),
        ({"late": [1]}, "late"),
    ],
)
async def test_faults_endpoint_refuses_bad_late_settings(
    session: aiohttp.ClientSession, body: object, mentions: str
) -> None:
    async with running_emulator(logstores=[f"{P}/{L}:1"]) as handle:
        status, answer = await post_faults(session, handle, body)
        assert (status, answer["errorCode"]) == (400, "ParameterInvalid")
        assert mentions in str(answer["errorMessage"])
        assert handle.faults.settings == FaultSettings()


async def test_faults_endpoint_sets_and_clears_late_settings(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(logstores=[f"{P}/{L}:1"]) as handle:
        update = {
            "late_rate": 0.25,
            "late_ms": [100, 900],
            "late": {"a/b/c": {"count": 3, "delay_ms": 7}},
        }
        status, settings = await post_faults(session, handle, update)
        assert status == 200
        assert (settings["late_rate"], settings["late_ms"]) == (0.25, [100.0, 900.0])
        assert settings["late"] == {"a/b/c": {"count": 3, "delay_ms": 7.0}}
        _, settings = await post_faults(session, handle, {"late": {"a/b/c": None}, "late_rate": 0})
        assert (settings["late"], settings["late_rate"]) == ({}, 0.0)


def test_cli_flags_set_the_late_rate_and_hold() -> None:
    parser = argparse.ArgumentParser()
    add_emulator_arguments(parser)
    args = parser.parse_args(
        ["--listen", "127.0.0.1:0", "--late-rate", "0.1", "--late-ms", "2000:3000", "--seed", "9"]
    )
    faults = options_from_args(args).faults
    assert (faults.late_rate, faults.late_ms) == (0.1, (2000.0, 3000.0))
