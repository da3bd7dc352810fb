"""`wait`, `flush` and `get` with `remote` end to end: socket -> store -> the real committer ->
the real SLS client -> the in-process emulator."""

from __future__ import annotations

import base64
import shutil
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

from test_committer import PROJECT, Env, committer_env, make_config
from test_ingest import Peer, connect

from cpmgr.config import Config, SocketConfig
from cpmgr.ingest import IngestServer


def cp(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


@asynccontextmanager
async def stack() -> AsyncIterator[tuple[Env, Peer]]:
    directory = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
    config: Config = make_config(groups={"orders": "ls/cg"}, interval="1h")
    config = replace(config, socket=SocketConfig(path=str(directory / "s")))
    try:
        async with committer_env(config) as env:
            server = IngestServer(config, env.store, committer=env.committer)
            await server.start()
            try:
                async with connect(server.path) as peer:
                    yield env, peer
            finally:
                await server.close()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


async def test_commit_with_wait_is_on_the_server_when_answered() -> None:
    async with stack() as (env, peer):
        answer = await peer.ask(
            {"op": "commit", "group": "orders", "shard": 2, "checkpoint": cp(50), "wait": True}
        )
        assert answer == {"ok": True}
        assert env.remote("ls/cg", 2) == cp(50)


async def test_flush_then_get_remote() -> None:
    async with stack() as (env, peer):
        items = [{"shard": s, "checkpoint": cp(100 + s), "consumer": "c1"} for s in range(3)]
        accepted = await peer.ask({"op": "commit", "group": "orders", "checkpoints": items})
        assert accepted == {"ok": True, "accepted": 3}
        assert env.remote("ls/cg", 0) is None  # nothing is sent before the cycle or a flush
        assert await peer.ask({"op": "flush", "id": "f"}) == {"ok": True, "committed": 3, "id": "f"}
        assert [env.remote("ls/cg", s) for s in range(3)] == [cp(100), cp(101), cp(102)]
        answer = await peer.ask({"op": "get", "group": "orders", "shard": 1, "remote": True})
        (entry,) = answer["shards"]
        assert entry["pending"] is None
        assert entry["committed"] == cp(101)
        assert entry["remote"]["checkpoint"] == cp(101)
        assert entry["remote"]["consumer"] == "c1"


async def test_wait_reports_a_permanent_failure_as_dropped() -> None:
    async with stack() as (env, peer):
        env.emulator.faults.update({"force": {f"{PROJECT}/ls/cg": [404, "ConsumerGroupNotExist"]}})
        answer = await peer.ask(
            {"op": "commit", "group": "orders", "shard": 1, "checkpoint": cp(7), "wait": True}
        )
        assert answer["error"]["code"] == "ConsumerGroupNotExist"
        assert answer["error"]["dropped"] is True
        get = await peer.ask({"op": "get", "group": "orders", "shard": 1})
        assert get["shards"][0]["pending"] is None
        assert get["shards"][0]["last_error"]["code"] == "ConsumerGroupNotExist"
        remote = await peer.ask({"op": "get", "group": "orders", "remote": True})
        assert remote["error"]["code"] == "ConsumerGroupNotExist"
