"""Lag in a running daemon: `get`, `status`, /metrics and the CLI tables show it; lag reads
under injected faults, or held by a slow SLS, never delay or fail a commit."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
from prometheus_client import CollectorRegistry

from cpmgr.client import AsyncCpmgrClient
from cpmgr.clientcli import add_client_commands, run_client_command
from cpmgr.config import parse_config
from cpmgr.daemon import Daemon, run
from cpmgr.emulator import running_emulator
from cpmgr.emulator.app import EmulatorHandle

P, L, G = "lagd-project", "lagd-logstore", "lagd-group"
KEY_ID, SECRET = "lagd-key", "lagd-secret"
T0 = 1_764_000_000
LAG_APIS = ["GetCheckPoint", "ListShards", "GetCursor", "GetCursorTime"]


def cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


@dataclass
class Running:
    daemon: Daemon
    emulator: EmulatorHandle
    registry: CollectorRegistry
    client: AsyncCpmgrClient
    socket: str

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def lag_failures(self) -> float:
        return sum(
            s.value
            for family in self.registry.collect()
            if family.name == "cpmgr_lag_read_failures"
            for s in family.samples
            if s.name.endswith("_total")
        )


@asynccontextmanager
async def running(
    *, lag: dict[str, Any], faults: dict[str, Any] | None = None
) -> AsyncIterator[Running]:
    sock_dir = tempfile.mkdtemp(prefix="lg", dir="/tmp")
    async with running_emulator(
        logstores=[f"{P}/{L}:4"],
        consumer_groups=[f"{P}/{L}/{G}"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
        seed=14,
    ) as emulator:
        if faults:
            emulator.faults.update(faults)
        config = parse_config(
            {
                "socket": {"path": f"{sock_dir}/c.sock"},
                "http": {"listen": "127.0.0.1:0", "shard_metrics": True},
                "sls": {
                    "endpoint": emulator.url,
                    "access_key_id": KEY_ID,
                    "access_key_secret": SECRET,
                },
                "commit": {
                    "interval": "1h",
                    "retry": {"initial_backoff": "1ms", "max_backoff": "5ms"},
                },
                "lag": lag,
                "groups": [{"name": "orders", "project": P, "logstore": L, "consumer_group": G}],
            },
            {},
        )
        registry = CollectorRegistry()
        stop = asyncio.Event()
        started: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run(config, shutdown_trigger=stop.wait, registry=registry, started=started.set_result)
        )
        daemon = await started
        async with AsyncCpmgrClient(config.socket.path) as client:
            try:
                yield Running(daemon, emulator, registry, client, config.socket.path)
            finally:
                stop.set()
                await task


async def test_get_status_metrics_and_tables_show_the_lag() -> None:
    async with running(lag={"interval": "20ms", "lagging_after": "30s"}) as r:
        shard = r.emulator.state.logstore(P, L).shards[1]
        shard.append(8, T0)
        shard.append(2, T0 + 45)
        await r.client.commit("orders", 1, cursor(shard.begin + 3), wait=True)
        await r.daemon.lag.wait_rounds(2)  # the second started after the commit landed
        entry = (await r.client.get("orders", 1))[0]
        lag = entry["lag"]
        assert (lag["log_groups"], lag["seconds"], lag["state"]) == (7, 45.0, "lagging")
        status = await r.client.status()
        group = status["groups"]["orders"]
        assert (group["lag"]["log_groups"], group["lag"]["seconds"]) == (7, 45.0)
        assert (group["lag"]["stalled"], group["lag"]["lagging"], group["lag"]["shards"]) == (
            0,
            1,
            4,
        )
        assert r.sample("cpmgr_consumer_lag_log_groups", group="orders") == 7
        assert r.sample("cpmgr_consumer_lag_seconds", group="orders") == 45
        assert r.sample("cpmgr_stalled_shards", group="orders") == 0
        assert r.daemon.web is not None
        url = f"http://127.0.0.1:{r.daemon.web.port}/metrics"
        async with aiohttp.ClientSession() as http, http.get(url) as response:
            text = await response.text()
        assert 'cpmgr_consumer_lag_log_groups{group="orders"} 7.0' in text
        assert 'cpmgr_shard_lag_seconds{group="orders",shard="1"} 45.0' in text
        assert text.count("cpmgr_shard_lag_log_groups{") == 4
        table = await asyncio.to_thread(_cli, ["get", "orders", "1", "--socket", r.socket])
        header, row = table.splitlines()
        assert header.split()[-3:] == ["LAG", "LAG_SECONDS", "LAG_STATE"]
        assert row.split()[-3:] == ["7", "45", "lagging"]
        status_table = await asyncio.to_thread(_cli, ["status", "--socket", r.socket])
        assert status_table.splitlines()[-1].split()[-3:] == ["7", "45", "0"]


def _cli(argv: list[str]) -> str:
    parser = argparse.ArgumentParser(prog="cpmgr")
    add_client_commands(parser.add_subparsers(dest="command"))
    out, err = io.StringIO(), io.StringIO()
    assert run_client_command(parser.parse_args(argv), out=out, err=err) == 0, err.getvalue()
    return out.getvalue()


async def test_commits_never_wait_for_lag_reads_held_by_a_slow_sls() -> None:
    # Every lag request is held 3 s: with lag on the commit path, no commit could finish first.
    slow = {"latency_ms": [3000, 3000], "apis": LAG_APIS}
    async with running(lag={"interval": "1s"}, faults=slow) as r:
        for n in range(20):
            await r.client.commit("orders", n % 4, cursor(100 + n), wait=True)
        assert r.daemon.lag.reading("orders") is None  # the first reading is still held
        assert r.emulator.state.requests["UpdateCheckPoint"] == {"OK": 20}


async def test_lag_reads_under_30_percent_faults_never_fail_or_retry_a_commit() -> None:
    faults = {"error_rate": 0.15, "reset_rate": 0.15, "apis": LAG_APIS}
    async with running(lag={"interval": "10ms"}, faults=faults) as r:
        for shard in r.emulator.state.logstore(P, L).shards.values():
            shard.append(50, T0)
        commits = 0
        for round_number in range(40):
            for shard in range(4):
                await r.client.commit("orders", shard, cursor(T0 + round_number), wait=True)
                commits += 1
            if r.lag_failures() >= 10 and r.daemon.lag.rounds >= 5:
                break
            await r.daemon.lag.wait_rounds(1)
        assert r.lag_failures() >= 10
        assert r.emulator.state.requests["UpdateCheckPoint"] == {"OK": commits}
        assert r.sample("cpmgr_commit_retries_total", group="orders") == 0
        assert r.daemon.lag.reading("orders") is not None
