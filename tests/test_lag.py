"""Consumer lag against the emulator (a real server): the numbers its shards imply, states
over an injected clock, failures counted, and the `lag` config block."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cpmgr.config import Config, ConfigError, parse_config
from cpmgr.emulator import running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.emulator.shards import Shard, decode_cursor, encode_cursor
from cpmgr.lag import LagReader, ShardLag, Thresholds, classify
from cpmgr.metrics import Metrics
from cpmgr.sls.client import SLSClient
from cpmgr.sls.signer import Credentials

P, L, G = "lag-project", "lag-logstore", "lag-group"
KEY_ID, SECRET = "lag-key", "lag-secret"
T0 = 1_764_000_000


class FakeClock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_config(
    endpoint: str, *, lag: dict[str, Any] | None = None, membership: dict[str, Any] | None = None
) -> Config:
    group: dict[str, Any] = {"name": "orders", "project": P, "logstore": L, "consumer_group": G}
    if membership is not None:
        group["membership"] = membership
    return parse_config(
        {
            "sls": {"endpoint": endpoint, "access_key_id": KEY_ID, "access_key_secret": SECRET},
            "lag": lag or {"interval": "30s", "lagging_after": "1m", "stall_after": "5m"},
            "groups": [group],
        },
        {},
    )


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{P}/{L}:4"],
        consumer_groups=[f"{P}/{L}/{G}"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
    ) as handle:
        yield handle


@pytest.fixture
async def client(emulator: EmulatorHandle) -> AsyncIterator[SLSClient]:
    async with SLSClient(
        endpoint=emulator.url, credentials=lambda: Credentials(KEY_ID, SECRET)
    ) as sls:
        yield sls


def shards(emulator: EmulatorHandle) -> dict[int, Shard]:
    return emulator.state.logstore(P, L).shards


def expected(shard: Shard, checkpoint: int | None) -> tuple[int, float]:
    """What the emulator's state implies (docs/operations.md "Consumer lag"), from the model."""
    start = shard.begin if checkpoint is None else max(checkpoint, shard.begin)
    log_groups = max(0, shard.end - start)
    if log_groups == 0:
        return 0, 0.0
    consumed = shard.cursor_time(max(start - 1, shard.begin))
    return log_groups, float(shard.cursor_time(shard.end - 1) - consumed)


async def commit(client: SLSClient, shard: int, position: int) -> None:
    await client.update_checkpoint(P, L, G, shard, encode_cursor(position))


# --- the numbers --------------------------------------------------------------------------


async def test_lag_equals_what_the_emulator_state_implies(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    data = shards(emulator)
    for number, shard in data.items():
        for step in range(6):  # receive times 7 s apart, a different amount per shard
            shard.append(number + step, T0 + 7 * step)
    behind = data[1].begin + 4  # shard 1 holds 1 log group at T0, 2 at T0+7, 3 at T0+14...
    caught_up = data[2].end
    expired = data[3].begin + 1
    data[3].begin += 5  # the data before it expired: counted from the begin cursor
    await commit(client, 1, behind)
    await commit(client, 2, caught_up)
    await commit(client, 3, expired)
    reader = LagReader(config=make_config(emulator.url), api=client)
    reading = await reader.read_group(make_config(emulator.url).groups[0])
    assert reading is not None
    implied = {
        0: expected(data[0], None),  # never committed: from the begin cursor
        1: expected(data[1], behind),
        2: (0, 0.0),
        3: expected(data[3], expired),
    }
    got = {n: (lag.log_groups, lag.seconds) for n, lag in reading.shards.items()}
    assert got == implied
    # the last consumed (position 3) arrived at T0+14, the newest at T0+35
    assert implied[1] == (sum(1 + step for step in range(6)) - 4, 21.0)
    assert reading.log_groups == sum(groups for groups, _ in implied.values())
    assert reading.seconds == max(seconds for _, seconds in implied.values())
    assert reader.shard("orders", 2) == ShardLag(2, 0, 0.0, "ok", reading.at)


async def test_a_caught_up_shard_costs_one_get_cursor_and_receive_times_are_cached(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    data = shards(emulator)
    for shard in data.values():
        shard.append(10, T0)
    await commit(client, 0, data[0].end)
    reader = LagReader(config=make_config(emulator.url), api=client)
    group = make_config(emulator.url).groups[0]
    await reader.read_group(group)
    first = dict(emulator.state.requests["GetCursorTime"])
    await reader.read_group(group)  # nothing moved: no receive time asked again
    assert dict(emulator.state.requests["GetCursorTime"]) == first
    data[1].append(3, T0 + 40)
    reading = await reader.read_group(group)
    assert reading is not None and reading.shards[1].seconds == 40.0
    asked = emulator.state.requests["GetCursorTime"]["OK"] - first["OK"]
    assert asked == 1  # only shard 1's newest log group
    requests = emulator.state.snapshot()["requests"]
    assert requests["GetCheckPoint"] == {"OK": 3}
    assert requests["ListShards"] == {"OK": 3}


async def test_a_membership_group_without_checkpoint_counts_from_its_start(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    data = shards(emulator)
    data[0].append(5, T0)
    data[0].append(5, T0 + 100)
    for start, groups in (("end", 0), ("2025-11-24T16:01:40Z", 5), ("begin", 10)):
        assert start == "end" or start == "begin" or T0 + 100 == 1_764_000_100
        config = make_config(emulator.url, membership={"start": start})
        reader = LagReader(config=config, api=client)
        reading = await reader.read_group(config.groups[0])
        assert reading is not None
        assert reading.shards[0].log_groups == groups, start


# --- states over an injected clock ------------------------------------------------------


async def test_stalled_after_stall_after_and_ok_again_once_caught_up(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    clock = FakeClock(500.0)
    config = make_config(emulator.url, lag={"lagging_after": "1m", "stall_after": "5m"})
    group = config.groups[0]
    reader = LagReader(config=config, api=client, clock=clock)
    shard = shards(emulator)[0]
    shard.append(10, T0)
    await commit(client, 0, shard.begin + 2)
    shard.append(10, T0 + 90)

    async def state() -> str:
        reading = await reader.read_group(group)
        assert reading is not None
        return reading.shards[0].state

    assert await state() == "lagging"  # 90 s behind, the checkpoint just seen
    clock.now += 299
    assert await state() == "lagging"
    clock.now += 1
    assert await state() == "stalled"  # unchanged for stall_after with lag > 0
    reading = reader.reading("orders")
    assert reading is not None and reading.stalled == 1
    await commit(client, 0, shard.begin + 5)  # moves, still 90 s behind
    assert await state() == "lagging"
    await commit(client, 0, shard.end)
    assert await state() == "ok"
    clock.now += 3600
    assert await state() == "ok"  # caught up: standing still is not stalling


async def test_a_shard_without_checkpoint_is_ok_until_stall_after(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    clock = FakeClock(0.0)
    config = make_config(emulator.url, lag={"stall_after": "2m"})
    reader = LagReader(config=config, api=client, clock=clock)
    shard = shards(emulator)[3]
    shard.append(4, T0)
    shard.append(4, T0 + 3600)  # an hour behind, yet nobody has started on it
    reading = await reader.read_group(config.groups[0])
    assert reading is not None and reading.shards[3].state == "ok"
    clock.now = 120
    reading = await reader.read_group(config.groups[0])
    assert reading is not None and reading.shards[3].state == "stalled"


async def test_a_finished_read_only_shard_has_lag_0_and_never_stalls(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    clock = FakeClock(0.0)
    config = make_config(emulator.url, lag={"stall_after": "1m"})
    reader = LagReader(config=config, api=client, clock=clock)
    parent, behind = shards(emulator)[0], shards(emulator)[1]
    for shard in (parent, behind):
        shard.append(6, T0)
        shard.append(6, T0 + 300)
        shard.status = "readonly"  # the parent of a split: its end is frozen
    await commit(client, 0, parent.end)  # committed to its end: finished
    await commit(client, 1, behind.begin + 3)
    clock.now = 3600
    reading = await reader.read_group(config.groups[0])
    assert reading is not None
    assert (reading.shards[0].log_groups, reading.shards[0].seconds) == (0, 0.0)
    clock.now = 7200
    reading = await reader.read_group(config.groups[0])
    assert reading is not None
    assert reading.shards[0].state == "ok"
    assert (reading.shards[1].log_groups, reading.shards[1].state) == (9, "stalled")


def test_classify_precedence() -> None:
    thresholds = Thresholds(lagging_after=60, stall_after=300)

    def state(groups: int, seconds: float, unchanged: float, has: bool = True) -> str:
        return classify(
            log_groups=groups,
            seconds=seconds,
            has_checkpoint=has,
            unchanged_for=unchanged,
            thresholds=thresholds,
        )

    assert state(5, 61, 300) == "stalled"  # both: stalled
    assert state(5, 61, 299) == "lagging"
    assert state(5, 60, 10) == "ok"
    assert state(0, 0, 10**6) == "ok"
    assert state(5, 10**6, 0, has=False) == "ok"


# --- failures -------------------------------------------------------------------------------


async def test_failures_are_counted_by_code_and_keep_the_previous_reading(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_metrics=False)
    config = make_config(emulator.url)
    reader = LagReader(config=config, api=client, observer=metrics)
    shards(emulator)[0].append(3, T0)
    first = await reader.read_group(config.groups[0])
    emulator.faults.update({"error_rate": 1.0, "apis": ["GetCursor"]})
    shards(emulator)[0].append(3, T0 + 5)
    second = await reader.read_group(config.groups[0])
    assert second is not None and first is not None
    assert second.shards == first.shards  # every shard kept its previous value
    assert second.at >= first.at
    failures = registry.get_sample_value(
        "cpmgr_lag_read_failures_total", {"group": "orders", "code": "InternalServerError"}
    )
    assert failures == 4
    emulator.faults.update({"apis": ["GetCheckPoint"]})
    assert await reader.read_group(config.groups[0]) is second
    assert (
        registry.get_sample_value(
            "cpmgr_lag_read_failures_total", {"group": "orders", "code": "InternalServerError"}
        )
        == 5
    )
    emulator.faults.update({"error_rate": 0.0, "apis": None})
    third = await reader.read_group(config.groups[0])
    assert third is not None and third.shards[0].log_groups == 6


async def test_refused_keys_are_counted_and_ask_for_fresh_ones(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    registry = CollectorRegistry()
    asked: list[bool] = []
    config = make_config(emulator.url)
    reader = LagReader(
        config=config,
        api=client,
        observer=Metrics(registry, process_metrics=False),
        on_credentials_error=lambda: asked.append(True),
    )
    emulator.faults.update({"force": {f"{P}/{L}/{G}": [401, "SignatureNotMatch"]}})
    assert await reader.read_group(config.groups[0]) is None
    assert asked == [True]
    labels = {"group": "orders", "code": "SignatureNotMatch"}
    assert registry.get_sample_value("cpmgr_lag_read_failures_total", labels) == 1
    emulator.faults.update({"force": {f"{P}/{L}/{G}": [500, "InternalServerError"]}})
    await reader.read_group(config.groups[0])
    assert asked == [True]  # only refused keys ask for fresh ones


async def test_a_checkpoint_that_is_no_cursor_is_counted_as_bad_cursor(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    registry = CollectorRegistry()
    config = make_config(emulator.url)
    reader = LagReader(config=config, api=client, observer=Metrics(registry, process_metrics=False))
    await client.update_checkpoint(P, L, G, 1, "bm90LWEtbnVtYmVy")  # base64 of "not-a-number"
    reading = await reader.read_group(config.groups[0])
    assert reading is not None and 1 not in reading.shards and len(reading.shards) == 3
    assert (
        registry.get_sample_value(
            "cpmgr_lag_read_failures_total", {"group": "orders", "code": "BadCursor"}
        )
        == 1
    )


# --- metrics ----------------------------------------------------------------------------------


async def test_metrics_per_group_and_per_shard(emulator: EmulatorHandle, client: SLSClient) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_metrics=False)
    config = make_config(emulator.url)
    reader = LagReader(config=config, api=client, observer=metrics)
    collector = metrics.watch_lag(reader.readings, shard_metrics=True)
    labels = {"group": "orders"}
    assert registry.get_sample_value("cpmgr_consumer_lag_log_groups", labels) is None
    data = shards(emulator)
    data[0].append(2, T0)
    data[2].append(5, T0)
    data[2].append(1, T0 + 70)
    await reader.read_group(config.groups[0])
    assert registry.get_sample_value("cpmgr_consumer_lag_log_groups", labels) == 8
    assert registry.get_sample_value("cpmgr_consumer_lag_seconds", labels) == 70
    assert registry.get_sample_value("cpmgr_stalled_shards", labels) == 0
    # 70 s > lagging_after, but nobody has committed shard 2 yet: ok until stall_after
    assert registry.get_sample_value("cpmgr_lagging_shards", labels) == 0
    shard2 = {"group": "orders", "shard": "2"}
    assert registry.get_sample_value("cpmgr_shard_lag_log_groups", shard2) == 6
    assert registry.get_sample_value("cpmgr_shard_lag_seconds", shard2) == 70
    assert registry.get_sample_value("cpmgr_shard_stalled", shard2) == 0
    streamed = b"".join([part async for part in collector.stream_shards()]).decode()
    assert 'cpmgr_shard_lag_log_groups{group="orders",shard="2"} 6.0\n' in streamed
    assert streamed.count("cpmgr_shard_stalled{") == 4


# --- config ------------------------------------------------------------------------------------


def test_lag_config_defaults_zero_and_problems() -> None:
    defaults = make_config("127.0.0.1:1", lag={}).lag
    assert (defaults.interval, defaults.lagging_after, defaults.stall_after) == (30, 60, 300)
    assert make_config("127.0.0.1:1", lag={"interval": 0}).lag.interval == 0
    assert make_config("127.0.0.1:1", lag={"interval": "0s"}).lag.interval == 0
    with pytest.raises(ConfigError) as bad:
        make_config(
            "127.0.0.1:1",
            lag={"interval": -1, "lagging_after": 0, "stall_after": "soon", "every": "1s"},
        )
    assert sorted(bad.value.problems) == [
        "lag.every: unknown key",
        "lag.interval: must be greater than 0",
        "lag.lagging_after: must be greater than 0",
        "lag.stall_after: must be a duration like 5s, 250ms or 2m",
    ]


async def test_a_reload_that_disables_lag_or_removes_the_group_drops_its_reading(
    emulator: EmulatorHandle, client: SLSClient
) -> None:
    config = make_config(emulator.url)
    reader = LagReader(config=config, api=client)
    await reader.read_group(config.groups[0])
    assert reader.reading("orders") is not None
    reader.apply_config(make_config(emulator.url, lag={"interval": 0}))
    assert reader.readings() == {}
    reader.apply_config(config)
    await reader.read_group(config.groups[0])
    assert set(reader.readings()) == {"orders"}
    assert decode_cursor(encode_cursor(7)) == 7
