"""The client library against a live ingest server: ops, typed errors, pipelining, reconnects."""

from __future__ import annotations

import asyncio
import base64
import os
import random
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import replace
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_ingest import FakeCommitter, FlushResult, Outcome, make_config, running

from cpmgr.client import (
    AsyncCpmgrClient,
    CpmgrClient,
    CpmgrProtocolError,
    CpmgrUnavailable,
    backoff_delay,
    default_socket_path,
)
from cpmgr.config import Config
from cpmgr.metrics import Metrics
from cpmgr.store import CheckpointStore


def cp(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


@pytest.fixture
def sock_path() -> Iterator[Path]:
    directory = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
    try:
        yield directory / "s"
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def config(sock_path: Path) -> Config:
    return make_config(sock_path)


class Sleeps(list[float]):
    """A sleep that records instead of waiting."""

    def __call__(self, seconds: float) -> None:
        self.append(seconds)


class AsyncSleeps(list[float]):
    async def __call__(self, seconds: float) -> None:
        self.append(seconds)


# --- pure parts -----------------------------------------------------------------------------


def test_backoff_is_exponential_full_jitter_and_capped() -> None:
    assert backoff_delay(1, initial=0.1, maximum=1.0, rng=lambda: 1.0) == pytest.approx(0.1)
    assert backoff_delay(3, initial=0.1, maximum=1.0, rng=lambda: 1.0) == pytest.approx(0.4)
    assert backoff_delay(9, initial=0.1, maximum=1.0, rng=lambda: 1.0) == 1.0
    rng = random.Random(3).random
    delays = [backoff_delay(2, initial=0.1, maximum=1.0, rng=rng) for _ in range(200)]
    assert all(0 <= d <= 0.2 for d in delays)
    assert max(delays) > 0.15


def test_default_socket_path() -> None:
    assert default_socket_path({}) == "/run/cpmgr/cpmgr.sock"
    assert default_socket_path({"CPMGR_SOCKET": ""}) == "/run/cpmgr/cpmgr.sock"
    assert default_socket_path({"CPMGR_SOCKET": "/x/y.sock"}) == "/x/y.sock"


# --- the blocking client --------------------------------------------------------------------


async def test_sync_ops(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    committer = FakeCommitter(flush_result=FlushResult(3))

    def consumer(path: str) -> None:
        with CpmgrClient(path) as client:
            client.ping()
            client.commit("orders", 1, cp(10), consumer="c1")
            assert client.commit_many("orders", {2: cp(20), 3: cp(30)}) == 2
            assert client.commit_many("audit", [(0, cp(1), "a"), (1, cp(2))]) == 2
            client.commit("orders", 4, cp(1), wait=True, timeout=1.5)
            shards = client.get("orders")
            assert [s["shard"] for s in shards] == [1, 2, 3, 4]
            assert client.get("orders", 1)[0]["pending"] == cp(10)
            assert client.status()["groups"]["audit"]["pending"] == 2
            assert client.flush(timeout=2) == 3
            assert client.call("ping") == {"ok": True}

    async with running(config, store, committer=committer) as server:
        await asyncio.to_thread(consumer, server.path)
    assert [(a.group, a.shard, a.consumer) for a in store.snapshot(group="audit")] == [
        ("audit", 0, "a"),
        ("audit", 1, None),
    ]
    assert committer.waits[0][3] == 1.5


async def test_sync_errors_carry_codes(config: Config) -> None:
    committer = FakeCommitter(outcomes={5: Outcome(False, "ConsumerNotMatch", "held", True)})

    def consumer(path: str) -> None:
        with CpmgrClient(path) as client:
            client.commit("orders", 1, cp(10))
            with pytest.raises(CpmgrProtocolError) as info:
                client.commit("orders", 1, cp(9))
            assert info.value.code == "CheckpointRegression"
            assert info.value.answer["ok"] is False
            assert info.value.dropped is None
            with pytest.raises(CpmgrProtocolError, match="UnknownGroup"):
                client.get("nope")
            with pytest.raises(CpmgrProtocolError) as info:
                client.commit("orders", 2, "nope!")
            assert info.value.code == "InvalidShardCheckPoint"
            with pytest.raises(CpmgrProtocolError) as info:
                client.commit("orders", 5, cp(1), wait=True)
            assert (info.value.code, info.value.dropped) == ("ConsumerNotMatch", True)
            client.ping()  # still usable

    async with running(config, committer=committer) as server:
        await asyncio.to_thread(consumer, server.path)


async def test_sync_pipeline_sends_in_order(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])

    def consumer(path: str) -> Sequence[object]:
        with CpmgrClient(path) as client, client.pipeline() as pipe:
            for n in range(50):
                pipe.commit("orders", n % 5, cp(n))
            pipe.commit("nope", 1, cp(1))
            pipe.commit_many("audit", {1: cp(1)})
            pipe.call("get", group="orders", shard=4)
        return pipe.results

    async with running(config, store) as server:
        results = await asyncio.to_thread(consumer, server.path)
    assert results[:50] == [{"ok": True}] * 50
    error = results[50]
    assert isinstance(error, CpmgrProtocolError)
    assert error.code == "UnknownGroup"
    assert results[51] == {"ok": True, "accepted": 1}
    last = results[52]
    assert isinstance(last, dict)
    assert last["shards"][0]["pending"] == cp(49)


async def test_sync_unreachable_after_bounded_backoff(sock_path: Path) -> None:
    sleeps = Sleeps()
    client = CpmgrClient(str(sock_path), reconnect_attempts=3, sleep=sleeps, rng=lambda: 1.0)
    with pytest.raises(CpmgrUnavailable, match="cannot connect"):
        client.ping()
    assert sleeps == pytest.approx([0.05, 0.1, 0.2])


async def test_sync_reconnects_after_a_restart(config: Config) -> None:
    sleeps = Sleeps()
    client = CpmgrClient(config.socket.path, sleep=sleeps, rng=lambda: 0.0)
    try:
        async with running(config) as server:
            await asyncio.to_thread(client.commit, "orders", 1, cp(1))
        async with running(config) as server:
            await asyncio.to_thread(client.commit, "orders", 1, cp(2))
            answer = await asyncio.to_thread(client.get, "orders", 1)
            assert answer[0]["pending"] == cp(2)
            assert server.path == config.socket.path
    finally:
        client.close()
    assert len(sleeps) == 1


async def test_sync_forbidden(sock_path: Path) -> None:
    config = make_config(sock_path, allowed_uids=(os.getuid() + 1,))
    async with running(config) as server:
        client = CpmgrClient(server.path, sleep=Sleeps())
        with pytest.raises(CpmgrProtocolError) as info:
            await asyncio.to_thread(client.ping)
        client.close()
    assert info.value.code == "Forbidden"


async def test_sync_request_too_large_then_usable(sock_path: Path) -> None:
    config = make_config(sock_path, max_line_bytes=200)
    async with running(config) as server:
        client = CpmgrClient(server.path, sleep=Sleeps())
        try:
            big = {shard: cp(shard) for shard in range(50)}
            with pytest.raises(CpmgrProtocolError, match="RequestTooLarge"):
                await asyncio.to_thread(client.commit_many, "orders", big)
            await asyncio.to_thread(client.ping)
        finally:
            client.close()


async def test_sync_timeout_when_the_daemon_does_not_answer(config: Config) -> None:
    committer = FakeCommitter(gate=asyncio.Event())
    async with running(config, committer=committer) as server:
        client = CpmgrClient(server.path, timeout=0.05)
        with pytest.raises(CpmgrUnavailable, match="in time"):
            await asyncio.to_thread(client.flush)
        client.close()


# --- the asyncio client ---------------------------------------------------------------------


async def test_async_concurrent_calls_share_one_connection(config: Config) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_metrics=False)
    store = CheckpointStore(["orders", "audit"])
    async with (
        running(config, store, metrics=metrics) as server,
        AsyncCpmgrClient(server.path) as client,
    ):
        calls = [client.commit("orders", n % 8, cp(n)) for n in range(400)]
        calls.insert(123, client.commit("nope", 1, cp(1)))
        results = await asyncio.gather(*calls, return_exceptions=True)
        errors = [i for i, r in enumerate(results) if r is not None]
        assert errors == [123]
        assert isinstance(results[123], CpmgrProtocolError)
        assert await client.commit_many("audit", [(1, cp(1), "x")]) == 1
        assert (await client.get("orders", 7))[0]["pending"] == cp(399)
        assert (await client.status())["groups"]["orders"]["tracked"] == 8
        assert await client.call("ping") == {"ok": True}
    assert registry.get_sample_value("cpmgr_socket_accepted_connections_total") == 1


async def test_async_wait_and_flush(config: Config) -> None:
    committer = FakeCommitter(
        outcomes={2: Outcome(False, "Timeout", "still pending")}, flush_result=FlushResult(7)
    )
    async with running(config, committer=committer) as server:
        async with AsyncCpmgrClient(server.path) as client:
            await client.commit("orders", 1, cp(1), wait=True, consumer="c", force=True)
            with pytest.raises(CpmgrProtocolError) as info:
                await client.commit("orders", 2, cp(1), wait=True, timeout=0.5)
            assert (info.value.code, info.value.dropped) == ("Timeout", False)
            assert await client.flush("orders", timeout=1) == 7
        assert committer.flushes == [("orders", 1.0)]


async def test_async_reconnects_after_a_restart(config: Config) -> None:
    sleeps = AsyncSleeps()
    client = AsyncCpmgrClient(config.socket.path, sleep=sleeps, rng=lambda: 0.0)
    store = CheckpointStore(["orders"])
    try:
        async with running(config):
            await client.ping()
        async with running(config, store):
            await client.commit("orders", 1, cp(1))
    finally:
        await client.close()
    assert store.pending_count("orders") == 1
    assert sleeps == []  # the reader saw the hang-up: no failed attempt, no backoff


async def test_async_unreachable(sock_path: Path) -> None:
    sleeps = AsyncSleeps()
    client = AsyncCpmgrClient(str(sock_path), reconnect_attempts=2, sleep=sleeps)
    with pytest.raises(CpmgrUnavailable):
        await client.ping()
    assert len(sleeps) == 2
    quick = AsyncCpmgrClient(str(sock_path), reconnect_attempts=0)
    with pytest.raises(CpmgrUnavailable):
        await quick.ping()
    await quick.close()
    await client.close()


async def test_async_close_fails_waiting_calls(config: Config) -> None:
    committer = FakeCommitter(gate=asyncio.Event())
    async with running(config, committer=committer) as server:
        client = AsyncCpmgrClient(server.path)
        flush = asyncio.create_task(client.flush())
        await committer.entered.wait()
        await client.close()
        with pytest.raises(CpmgrUnavailable, match="closed"):
            await flush
        await client.ping()  # a closed client opens a new connection when used again
        await client.close()


async def test_async_forbidden(sock_path: Path) -> None:
    config = make_config(sock_path, allowed_uids=(os.getuid() + 1,))
    async with running(config) as server, AsyncCpmgrClient(server.path) as client:
        results = await asyncio.gather(client.ping(), client.ping(), return_exceptions=True)
    assert [getattr(r, "code", None) for r in results] == ["Forbidden", "Forbidden"]


async def test_async_timeout(config: Config) -> None:
    committer = FakeCommitter(gate=asyncio.Event())
    async with running(config, committer=committer) as server:
        async with AsyncCpmgrClient(server.path, timeout=0.05) as client:
            with pytest.raises(CpmgrUnavailable, match="in time"):
                await client.flush()
        assert committer.gate is not None
        committer.gate.set()


async def test_async_client_uses_cpmgr_socket_env(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CPMGR_SOCKET", config.socket.path)
    async with running(replace(config)), AsyncCpmgrClient() as client:
        await client.ping()


async def test_sync_pipeline_resends_what_a_lost_connection_dropped(sock_path: Path) -> None:
    config = make_config(sock_path, max_line_bytes=200)
    sleeps = Sleeps()
    big = {shard: cp(shard) for shard in range(50)}

    def consumer(path: str) -> Sequence[object]:
        with CpmgrClient(path, sleep=sleeps) as client, client.pipeline() as pipe:
            pipe.commit("orders", 1, cp(1)).commit_many("orders", big).commit("orders", 2, cp(2))
        return pipe.results

    store = CheckpointStore(["orders"])
    async with running(config, store) as server:
        results = await asyncio.to_thread(consumer, server.path)
    assert results[0] == {"ok": True}
    assert getattr(results[1], "code", None) == "RequestTooLarge"
    assert results[2] == {"ok": True}
    assert store.pending_count("orders") == 2
    assert len(sleeps) == 1


async def test_async_calls_lost_with_a_connection_are_retried(sock_path: Path) -> None:
    config = make_config(sock_path, max_line_bytes=200)
    sleeps = AsyncSleeps()
    big = {shard: cp(shard) for shard in range(50)}
    store = CheckpointStore(["orders"])
    async with (
        running(config, store) as server,
        AsyncCpmgrClient(server.path, sleep=sleeps) as client,
    ):
        results = await asyncio.gather(
            client.commit_many("orders", big),
            client.commit("orders", 1, cp(1)),
            client.commit("orders", 2, cp(2)),
            return_exceptions=True,
        )
    assert getattr(results[0], "code", None) == "RequestTooLarge"
    assert list(results[1:]) == [None, None]
    assert store.pending_count("orders") == 2
    assert len(sleeps) >= 1


async def test_cancelling_a_task_inside_close_is_not_swallowed(config: Config) -> None:
    """A consumer task cancelled while its client closes must end cancelled."""
    async with running(config) as server:
        client = AsyncCpmgrClient(server.path)
        await client.ping()
        closing = asyncio.create_task(client.close())
        await asyncio.sleep(0)  # close() is now waiting for the reader task
        closing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await closing
