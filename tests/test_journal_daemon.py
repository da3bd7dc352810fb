"""The journal inside a running daemon: what a restart restores."""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_observability import GROUPS, PROJECT, config_data, cursor

from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError
from cpmgr.config import Config, parse_config
from cpmgr.daemon import run
from cpmgr.emulator import EmulatorHandle, running_emulator


@asynccontextmanager
async def daemon_client(config: Config) -> AsyncIterator[AsyncCpmgrClient]:
    """A daemon run in-process on `config`, stopped (drained) on exit."""
    stop = asyncio.Event()
    started: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(
        run(
            config,
            shutdown_trigger=stop.wait,
            registry=CollectorRegistry(),
            started=lambda _: started.set_result(None),
        )
    )
    await started
    try:
        async with AsyncCpmgrClient(config.socket.path) as client:
            yield client
    finally:
        stop.set()
        await task


def force(emulator: EmulatorHandle, answer: tuple[int, str] | None) -> None:
    key = f"{PROJECT}/{GROUPS['orders']}"
    emulator.faults.update({"force": {key: list(answer) if answer else None}})


async def test_a_dropped_value_stays_dropped_after_a_restart(tmp_path: Path) -> None:
    sock_dir = tempfile.mkdtemp(prefix="cp", dir="/tmp")
    logstores = [f"{PROJECT}/{where.split('/')[0]}:4" for where in GROUPS.values()]
    groups = [f"{PROJECT}/{where}" for where in GROUPS.values()]
    async with running_emulator(
        logstores=logstores,
        consumer_groups=groups,
        access_key_id="obs-key-id",
        access_key_secret=config_data("", "")["sls"]["access_key_secret"],
    ) as emulator:
        data = config_data(emulator.url, f"{sock_dir}/c.sock", shutdown_timeout="200ms")
        data["state"] = {"dir": str(tmp_path / "state"), "fsync": "always"}
        config = parse_config(data)
        async with daemon_client(config) as client:
            await client.commit("orders", 1, cursor(10))
            assert await client.flush() == 1
            force(emulator, (404, "ConsumerGroupNotExist"))
            await client.commit("orders", 1, cursor(20))  # dropped by SLS
            await client.commit("orders", 2, cursor(5))  # dropped, never committed
            with pytest.raises(CpmgrProtocolError):
                await client.flush()
            force(emulator, (500, "InternalServerError"))  # the final drain cannot commit it:
            await client.commit("orders", 3, cursor(7))  # pending, only in the journal
        force(emulator, None)
        async with daemon_client(config) as client:
            shards = {entry["shard"]: entry for entry in await client.get("orders")}
            assert shards[1]["pending"] is None  # back to the committed value, not resent
            assert 2 not in shards
            assert shards[3]["pending"] == cursor(7)
            with pytest.raises(CpmgrProtocolError) as info:  # the committed value still guards
                await client.commit("orders", 1, cursor(9))
            assert info.value.code == "CheckpointRegression"
            assert await client.flush() == 1
        history = emulator.state.history
        assert history[f"{PROJECT}/{GROUPS['orders']}/1"] == [cursor(10)]
        assert history[f"{PROJECT}/{GROUPS['orders']}/3"] == [cursor(7)]
