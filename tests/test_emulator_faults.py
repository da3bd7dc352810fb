"""Fault knobs: rates measured over HTTP for a fixed seed, resets, latency, forced codes."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import pytest

from cpmgr.emulator import running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.emulator.faults import FaultInjector, FaultSettings
from cpmgr.errors import ConfigError

P, L, G = "proj", "store", "group-a"
GROUP_KEY = f"{P}/{L}/{G}"
GROUP_PATH = f"/logstores/{L}/consumergroups/{G}"
HOST = {"Host": f"{P}.emulator.local"}
REQUESTS = 2000
TOLERANCE = 0.04


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


async def outcome(session: aiohttp.ClientSession, url: str) -> str:
    """One UpdateCheckPoint: "OK", "status errorCode", or "Reset" if the connection dropped.

    A POST, because aiohttp silently retries an idempotent request once when a reused
    connection is dropped, which would hide resets.
    """
    query = "?type=checkpoint&consumer=&forceSuccess=true"
    body = json.dumps({"shard": 0, "checkpoint": "MTAw"})
    try:
        async with session.post(url + GROUP_PATH + query, data=body, headers=HOST) as response:
            if response.status == 200:
                await response.read()
                return "OK"
            body = await response.json()
            return f"{response.status} {body['errorCode']}"
    except aiohttp.ClientConnectionError:
        return "Reset"


async def outcomes(session: aiohttp.ClientSession, url: str, count: int) -> Counter[str]:
    semaphore = asyncio.Semaphore(16)

    async def one() -> str:
        async with semaphore:
            return await outcome(session, url)

    return Counter(await asyncio.gather(*(one() for _ in range(count))))


def share(counts: Counter[str], key: str) -> float:
    return counts[key] / sum(counts.values())


async def post_faults(
    session: aiohttp.ClientSession, handle: EmulatorHandle, body: object
) -> tuple[int, dict[str, object]]:
    async with session.post(f"{handle.url}/_emulator/faults", data=json.dumps(body)) as response:
        return response.status, await response.json()


# --- rates over HTTP -----------------------------------------------------------------------


async def test_error_rate_is_measured_within_tolerance(session: aiohttp.ClientSession) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY], seed=7, error_rate=0.3
    ) as handle:
        counts = await outcomes(session, handle.url, REQUESTS)
    assert set(counts) == {"OK", "500 InternalServerError"}
    assert share(counts, "500 InternalServerError") == pytest.approx(0.3, abs=TOLERANCE)


async def test_throttle_rate_splits_between_server_busy_and_write_quota(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY], seed=11, throttle_rate=0.4
    ) as handle:
        counts = await outcomes(session, handle.url, REQUESTS)
    assert set(counts) == {"OK", "503 ServerBusy", "403 WriteQuotaExceed"}
    assert share(counts, "503 ServerBusy") == pytest.approx(0.2, abs=TOLERANCE)
    assert share(counts, "403 WriteQuotaExceed") == pytest.approx(0.2, abs=TOLERANCE)


async def test_resets_drop_the_connection_and_are_counted(session: aiohttp.ClientSession) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY], seed=3, reset_rate=0.15
    ) as handle:
        counts = await outcomes(session, handle.url, 600)
        served = handle.state.snapshot()["requests"]
    assert set(counts) == {"OK", "Reset"}
    assert share(counts, "Reset") == pytest.approx(0.15, abs=0.05)
    assert served == {"UpdateCheckPoint": {"OK": counts["OK"], "Reset": counts["Reset"]}}


async def test_all_rates_together_keep_their_own_shares(session: aiohttp.ClientSession) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:2"],
        consumer_groups=[GROUP_KEY],
        seed=5,
        error_rate=0.2,
        throttle_rate=0.2,
        reset_rate=0.1,
    ) as handle:
        counts = await outcomes(session, handle.url, REQUESTS)
    throttled = counts["503 ServerBusy"] + counts["403 WriteQuotaExceed"]
    assert share(counts, "500 InternalServerError") == pytest.approx(0.2, abs=TOLERANCE)
    assert throttled / REQUESTS == pytest.approx(0.2, abs=TOLERANCE)
    assert share(counts, "Reset") == pytest.approx(0.1, abs=TOLERANCE)
    assert share(counts, "OK") == pytest.approx(0.5, abs=TOLERANCE)


async def test_same_seed_gives_the_same_sequence(session: aiohttp.ClientSession) -> None:
    runs = []
    for _ in range(2):
        async with running_emulator(
            logstores=[f"{P}/{L}:2"],
            consumer_groups=[GROUP_KEY],
            seed=42,
            error_rate=0.25,
            throttle_rate=0.25,
        ) as handle:
            runs.append([await outcome(session, handle.url) for _ in range(60)])
    assert runs[0] == runs[1]
    assert len(set(runs[0])) == 4  # OK, 500, 503 and 403 all occur


def test_injector_rates_over_many_draws() -> None:
    """The injector on its own: 20 000 draws land on the configured shares."""
    injector = FaultInjector(
        FaultSettings(error_rate=0.1, throttle_rate=0.3, reset_rate=0.05), seed=1
    )
    counts = Counter(
        decision.fault.code if decision.fault else "OK"
        for decision in (injector.decide(GROUP_KEY) for _ in range(20_000))
    )
    assert counts["InternalServerError"] / 20_000 == pytest.approx(0.1, abs=0.01)
    assert counts["ServerBusy"] / 20_000 == pytest.approx(0.15, abs=0.01)
    assert counts["WriteQuotaExceed"] / 20_000 == pytest.approx(0.15, abs=0.01)
    assert counts["Reset"] / 20_000 == pytest.approx(0.05, abs=0.01)


# --- latency -------------------------------------------------------------------------------


async def test_latency_is_drawn_within_bounds_before_each_answer(
    session: aiohttp.ClientSession,
) -> None:
    delays: list[float] = []

    async def recording_sleep(seconds: float) -> None:
        delays.append(seconds)

    async with running_emulator(
        logstores=[f"{P}/{L}:2"],
        consumer_groups=[GROUP_KEY],
        latency_ms=(20.0, 80.0),
        error_rate=0.5,
        sleep=recording_sleep,
    ) as handle:
        await outcomes(session, handle.url, 400)
    assert len(delays) == 400  # failed answers are delayed too
    assert all(0.020 <= delay <= 0.080 for delay in delays)
    assert sum(delays) / len(delays) == pytest.approx(0.050, abs=0.005)
    assert min(delays) < 0.025 and max(delays) > 0.075


async def test_latency_really_delays_the_answer(session: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with running_emulator(
        logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY], latency_ms=(30.0, 30.0)
    ) as handle:
        started = loop.time()
        assert await outcome(session, handle.url) == "OK"
        assert loop.time() - started >= 0.030


# --- forced codes and the admin endpoint ---------------------------------------------------


async def checkpoint(
    session: aiohttp.ClientSession, handle: EmulatorHandle, shard: int, value: str
) -> tuple[int, bytes]:
    url = f"{handle.url}{GROUP_PATH}?type=checkpoint&consumer=&forceSuccess=true"
    body = json.dumps({"shard": shard, "checkpoint": value})
    async with session.post(url, data=body, headers=HOST) as response:
        return response.status, await response.read()


async def test_forced_code_fails_only_that_group_and_never_commits(
    session: aiohttp.ClientSession,
) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:2"], consumer_groups=[GROUP_KEY, f"{P}/{L}/group-b"]
    ) as handle:
        status, _ = await post_faults(
            session, handle, {"force": {GROUP_KEY: [404, "ShardNotExsit"]}}
        )
        assert status == 200
        status, body = await checkpoint(session, handle, 0, "MTAw")
        assert (status, json.loads(body)["errorCode"]) == (404, "ShardNotExsit")
        other = f"{handle.url}/logstores/{L}/consumergroups/group-b"
        async with session.get(other, headers=HOST) as response:
            assert response.status == 200  # another group of the same logstore is unaffected
        assert handle.state.snapshot()["history"] == {}

        status, settings = await post_faults(session, handle, {"force": {GROUP_KEY: None}})
        assert settings["force"] == {}
        assert await checkpoint(session, handle, 0, "MTAw") == (200, b"")
        assert handle.state.snapshot()["checkpoints"] == {f"{GROUP_KEY}/0": "MTAw"}


async def test_faulted_update_checkpoint_changes_nothing(session: aiohttp.ClientSession) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:1"], consumer_groups=[GROUP_KEY], seed=9, error_rate=0.5
    ) as handle:
        answers = [await checkpoint(session, handle, 0, "MTAw") for _ in range(40)]
        successes = sum(1 for status, _ in answers if status == 200)
        history = handle.state.snapshot()["history"]
        assert 0 < successes < 40
        assert history == {f"{GROUP_KEY}/0": ["MTAw"] * successes}
        counted = handle.state.snapshot()["requests"]["UpdateCheckPoint"]
        assert counted == {"OK": successes, "InternalServerError": 40 - successes}


async def test_faults_can_be_limited_to_some_apis(session: aiohttp.ClientSession) -> None:
    async with running_emulator(
        logstores=[f"{P}/{L}:1"], consumer_groups=[GROUP_KEY], seed=3
    ) as handle:
        status, settings = await post_faults(
            session, handle, {"error_rate": 1.0, "apis": ["GetCheckPoint"]}
        )
        assert (status, settings["apis"]) == (200, ["GetCheckPoint"])
        assert [(await checkpoint(session, handle, 0, "MTAw"))[0] for _ in range(5)] == [200] * 5
        async with session.get(f"{handle.url}{GROUP_PATH}", headers=HOST) as response:
            assert response.status == 500
        _, settings = await post_faults(session, handle, {"apis": None})
        assert settings["apis"] is None
        assert (await checkpoint(session, handle, 0, "MTAw"))[0] == 500


async def test_faults_endpoint_merges_fields(session: aiohttp.ClientSession) -> None:
    async with running_emulator(logstores=[f"{P}/{L}:1"], error_rate=0.1) as handle:
        status, settings = await post_faults(session, handle, {"latency_ms": [1, 2]})
        assert status == 200
        assert settings == {
            "error_rate": 0.1,
            "throttle_rate": 0.0,
            "reset_rate": 0.0,
            "latency_ms": [1.0, 2.0],
            "force": {},
            "late_rate": 0.0,
            "late_ms": [0.0, 0.0],
            "late": {},
            "apis": None,
        }
        await post_faults(session, handle, {"force": {"a/b/c": [503, "ServerBusy"]}})
        status, settings = await post_faults(session, handle, {"force": {"d/e/f": [400, "X"]}})
        assert settings["force"] == {"a/b/c": [503, "ServerBusy"], "d/e/f": [400, "X"]}
        async with session.get(f"{handle.url}/_emulator/faults") as response:
            assert await response.json() == settings


@pytest.mark.parametrize(
    ("body", "mentions"),
    [
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": "0.1"}, "error_rate"),
        ({"throttle_rate": True}, "throttle_rate"),
        ({"error_rate": 0.6, "reset_rate": 0.6}, "must not exceed 1"),
        ({"latency_ms": [5]}, "latency_ms"),
        ({"latency_ms": [9, 2]}, "latency_ms"),
        ({"force": {"only/two": [500, "X"]}}, "PROJECT/LOGSTORE/GROUP"),
        ({"force": {"a/b/c": [200, "OK"]}}, "force.a/b/c"),
        ({"force": {"a/b/c": [True, "X"]}}, "force.a/b/c"),
        ({"force": []}, "force"),
        ({"eror_rate": 0.1}, "eror_rate: unknown field"),
        ({"apis": []}, "apis"),
        ({"apis": ["GetCursor", 3]}, "apis"),
        ([1, 2], "JSON object"),
        ("not an object", "JSON object"),
    ],
)
async def test_faults_endpoint_refuses_bad_input_and_keeps_settings(
    session: aiohttp.ClientSession, body: object, mentions: str
) -> None:
    async with running_emulator(logstores=[f"{P}/{L}:1"], error_rate=0.1) as handle:
        status, answer = await post_faults(session, handle, body)
        assert status == 400
        assert answer["errorCode"] == "ParameterInvalid"
        assert mentions in str(answer["errorMessage"])
        assert handle.faults.settings.error_rate == 0.1


def test_fault_settings_refuse_bad_values_from_python() -> None:
    with pytest.raises(ConfigError, match="latency_ms"):
        FaultSettings(latency_ms=(10.0, 1.0))
    with pytest.raises(ConfigError, match="must not exceed 1"):
        FaultSettings(error_rate=0.5, throttle_rate=0.5, reset_rate=0.1)


async def test_admin_endpoints_are_never_faulted(session: aiohttp.ClientSession) -> None:
    async with running_emulator(logstores=[f"{P}/{L}:1"], seed=1, reset_rate=1.0) as handle:
        async with session.get(f"{handle.url}/_emulator/state") as response:
            assert response.status == 200
        assert await outcome(session, handle.url) == "Reset"
