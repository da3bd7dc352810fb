"""A stalled disk under the journal: the event loop keeps answering, commits are refused after
a bound and taken back, /readyz says the daemon cannot persist, and it all recovers."""

from __future__ import annotations

import asyncio
import functools
import os
import tempfile
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from prometheus_client import CollectorRegistry
from test_observability import GROUPS, PROJECT, SECRET, config_data, cursor

from cpmgr import daemon as daemon_module
from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError
from cpmgr.config import parse_config
from cpmgr.daemon import Daemon, run
from cpmgr.emulator import EmulatorHandle, running_emulator
from cpmgr.journal import Journal, JournalError, ShardRecord


class StallableDisk:
    """write(2) as a stalled disk does it: while `flowing` is clear, writes block (in the
    journal's writer thread) until it is set again."""

    def __init__(self) -> None:
        self.flowing = threading.Event()
        self.flowing.set()
        self.held = threading.Event()  # a write is blocked now

    def __call__(self, fd: int, data: memoryview) -> int:
        if not self.flowing.is_set():
            self.held.set()
            assert self.flowing.wait(30), "the test never released the disk"
        return os.write(fd, data)

    def stall(self) -> None:
        self.held.clear()
        self.flowing.clear()

    async def wait_held(self) -> None:
        assert await asyncio.to_thread(self.held.wait, 10), "nothing was written"


async def replay(directory: Path) -> dict[tuple[str, int], ShardRecord]:
    journal = Journal(directory, fsync="never")
    try:
        return {(r.group, r.shard): r for r in journal.open()}
    finally:
        await journal.close()


async def test_a_stalled_write_is_refused_after_the_timeout_and_taken_back(tmp_path: Path) -> None:
    disk = StallableDisk()
    # The write after the stall waits behind the take-back (a rewrite with fsyncs): a bound of
    # 0.2 s was too tight for that on a loaded machine.
    journal = Journal(tmp_path, fsync="always", write_fn=disk, write_timeout=0.5)
    journal.open()
    await journal.start()
    try:
        await journal.record_accepted([("g", 0, "kept", None)])
        assert journal.writable
        disk.stall()
        stalled = asyncio.create_task(journal.record_accepted([("g", 1, "refused", None)]))
        await disk.wait_held()
        queued = asyncio.create_task(journal.record_accepted([("g", 2, "refused", None)]))
        with pytest.raises(JournalError, match=r"within 0\.5s"):
            await stalled
        with pytest.raises(JournalError, match=r"within 0\.5s"):
            await queued
        assert not journal.writable
        journal.record_committed("g", 0, "kept")  # queued, written once the disk moves
        disk.flowing.set()
        await journal.record_accepted([("g", 3, "after", None)])
        assert journal.writable
    finally:
        disk.flowing.set()
        await journal.close()
    # The stalled record reached the log after its writer was refused: it does not count.
    assert await replay(tmp_path) == {
        ("g", 0): ShardRecord("g", 0, "kept", None, "kept"),
        ("g", 3): ShardRecord("g", 3, "after", None, None),
    }


@asynccontextmanager
async def daemon_on_a_stallable_disk(
    state_dir: Path, disk: StallableDisk, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[Daemon, AsyncCpmgrClient, aiohttp.ClientSession, EmulatorHandle]]:
    """An in-process daemon with HTTP, `fsync: always`, whose journal writes through `disk`."""
    stallable = functools.partial(Journal, write_fn=disk, write_timeout=0.3)
    monkeypatch.setattr(daemon_module, "Journal", stallable)
    sock_dir = tempfile.mkdtemp(prefix="cp", dir="/tmp")
    async with running_emulator(
        logstores=[f"{PROJECT}/{where.split('/')[0]}:4" for where in GROUPS.values()],
        consumer_groups=[f"{PROJECT}/{where}" for where in GROUPS.values()],
        access_key_id=config_data("", "")["sls"]["access_key_id"],
        access_key_secret=SECRET,
    ) as emulator:
        data = config_data(emulator.url, f"{sock_dir}/c.sock")
        data["state"] = {"dir": str(state_dir), "fsync": "always"}
        config = parse_config(data)
        stop = asyncio.Event()
        started: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run(
                config,
                shutdown_trigger=stop.wait,
                registry=CollectorRegistry(),
                started=started.set_result,
            )
        )
        daemon = await started
        try:
            async with (
                AsyncCpmgrClient(config.socket.path) as client,
                aiohttp.ClientSession() as http,
            ):
                yield daemon, client, http, emulator
        finally:
            disk.flowing.set()
            stop.set()
            await task


async def probe(http: aiohttp.ClientSession, daemon: Daemon, path: str) -> int:
    assert daemon.web is not None
    async with http.get(f"http://127.0.0.1:{daemon.web.port}{path}") as response:
        return response.status


async def test_a_stalled_disk_leaves_the_daemon_answering_and_not_ready(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    disk = StallableDisk()
    state = tmp_path / "state"
    async with daemon_on_a_stallable_disk(state, disk, monkeypatch) as (daemon, client, http, sls):
        await client.commit("orders", 0, cursor(1))
        assert await probe(http, daemon, "/readyz") == 200

        disk.stall()
        with pytest.raises(CpmgrProtocolError) as refused:
            await client.commit("orders", 1, cursor(5))
        assert refused.value.code == "JournalError"
        assert disk.held.is_set()  # the write is still stuck in the kernel
        # Everything that does not need the disk still answers, SLS commits included.
        await client.ping()
        assert [entry["shard"] for entry in await client.get("orders")] == [0]
        assert (await client.status())["ok"]
        assert await client.flush() == 1
        assert await probe(http, daemon, "/healthz") == 200
        assert await probe(http, daemon, "/readyz") == 503

        disk.flowing.set()
        await client.commit("orders", 1, cursor(3))  # 5 was never accepted: 3 is no regression
        assert await probe(http, daemon, "/readyz") == 200
    restored = await replay(state)
    assert restored[("orders", 0)].committed == cursor(1)
    assert restored[("orders", 1)].latest == cursor(3)
    assert sls.state.history[f"{PROJECT}/{GROUPS['orders']}/0"] == [cursor(1)]
