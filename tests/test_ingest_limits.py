"""The socket side's limits (docs/protocol.md, "Limits"): connections, idle unfinished lines,
buffered input, shards per group, per-group uids, and the metrics that count them."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from test_ingest import FakeCommitter, FakeJournal, commit, connect, cp, make_config, running
from test_ingest_journal import GatedFsync, started_journal

from cpmgr.config import Config, GroupConfig
from cpmgr.metrics import Metrics
from cpmgr.outcomes import FlushResult
from cpmgr.store import CheckpointStore

UID = os.getuid()


def with_groups(config: Config, **per_group: dict[str, Any]) -> Config:
    groups = tuple(replace(g, **per_group.get(g.name, {})) for g in config.groups)
    return replace(config, groups=groups)


def refused(registry: CollectorRegistry, reason: str) -> float | None:
    return registry.get_sample_value("cpmgr_connections_refused_total", {"reason": reason})


def fresh_metrics() -> tuple[CollectorRegistry, Metrics]:
    registry = CollectorRegistry()
    return registry, Metrics(registry, process_metrics=False)


# --- line length -----------------------------------------------------------------------------


def padded_ping(size: int, request_id: int) -> bytes:
    head = b'{"op":"ping","id":%d,"pad":"' % request_id
    line = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(line) == size
    return line


async def test_a_line_of_exactly_max_line_bytes_with_crlf_is_accepted(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", max_line_bytes=1024)
    async with (
        running(config) as server,
        connect(server.path) as peer,
        connect(server.path) as other,
    ):
        await peer.send(padded_ping(1024, 1) + b"\r\n")
        assert await peer.answer() == {"ok": True, "id": 1}
        # The `\r` may arrive alone at the end of a chunk, its `\n` in the next one.
        await peer.send(padded_ping(1024, 2) + b"\r")
        assert await other.ask({"op": "ping"}) == {"ok": True}  # the server has read it
        await peer.send(b"\n")
        assert await peer.answer() == {"ok": True, "id": 2}
        await peer.send(padded_ping(1025, 3) + b"\r\n")
        assert (await peer.answer())["error"]["code"] == "RequestTooLarge"
        assert await peer.closed()


# --- connections -----------------------------------------------------------------------------


async def test_connections_above_max_connections_get_one_error_line(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", max_connections=2)
    registry, metrics = fresh_metrics()
    assert refused(registry, "max_connections") == 0  # the series exist from the start
    async with (
        running(config, metrics=metrics) as server,
        connect(server.path) as first,
        connect(server.path) as second,
    ):
        assert await first.ask({"op": "ping"}) == {"ok": True}
        assert await second.ask({"op": "ping"}) == {"ok": True}
        async with connect(server.path) as third:
            assert await third.answer() == {
                "ok": False,
                "error": {"code": "TooManyConnections", "message": "too many connections"},
            }
            assert await third.closed()
        assert refused(registry, "max_connections") == 1
        assert await first.ask({"op": "ping", "id": 1}) == {"ok": True, "id": 1}
        assert registry.get_sample_value("cpmgr_socket_connections") == 2
    for reason in ("idle_timeout", "max_buffered_bytes", "forbidden"):
        assert refused(registry, reason) == 0


async def test_a_closed_connection_frees_its_place(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", max_connections=1)
    async with running(config) as server:
        async with connect(server.path) as first:
            assert await first.ask({"op": "ping"}) == {"ok": True}
        for _ in range(3):
            async with connect(server.path) as again:
                assert await again.ask({"op": "ping"}) == {"ok": True}


async def test_socket_level_forbidden_is_counted(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", allowed_uids=(UID + 1,))
    registry, metrics = fresh_metrics()
    async with running(config, metrics=metrics) as server, connect(server.path) as peer:
        assert (await peer.answer())["error"]["code"] == "Forbidden"
        assert await peer.closed()
    assert refused(registry, "forbidden") == 1


# --- idle unfinished lines -----------------------------------------------------------------


async def test_an_unfinished_line_is_closed_after_idle_timeout(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", idle_timeout=0.2)
    registry, metrics = fresh_metrics()
    async with (
        running(config, metrics=metrics) as server,
        connect(server.path) as slow,
        connect(server.path) as quiet,
    ):
        assert await quiet.ask({"op": "ping"}) == {"ok": True}
        await slow.send(b'{"op":"ping","id":1}\n{"op":"pi')
        assert await slow.answer() == {"ok": True, "id": 1}
        answer = await asyncio.wait_for(slow.answer(), 5)
        assert answer["error"]["code"] == "Timeout"
        assert "idle_timeout" in answer["error"]["message"]
        assert await slow.closed()
        # A connection with nothing unfinished is kept however long it is quiet.
        assert await quiet.ask({"op": "ping", "id": 2}) == {"ok": True, "id": 2}
    assert refused(registry, "idle_timeout") == 1


async def test_a_steady_stream_split_mid_line_is_not_idle(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", idle_timeout=0.3)
    async with running(config) as server, connect(server.path) as peer:
        line = json.dumps({"op": "ping"}).encode() + b"\n"
        loop = asyncio.get_running_loop()
        end = loop.time() + 0.8
        sent = 0
        while loop.time() < end:
            # Every chunk ends inside a line, each line finished by the next chunk.
            await peer.send(line[5:] + line[:5] if sent else line[:5])
            sent += 1
            await asyncio.sleep(0.02)
        await peer.send(line[5:])
        answers = [await peer.answer() for _ in range(sent)]
        assert all(a == {"ok": True} for a in answers)


# --- buffered input ------------------------------------------------------------------------


async def test_buffered_input_over_the_cap_closes_the_largest_holder(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", max_line_bytes=1024, max_buffered_bytes=2900)
    registry, metrics = fresh_metrics()
    async with (
        running(config, metrics=metrics) as server,
        connect(server.path) as small,
        connect(server.path) as large,
        connect(server.path) as last,
    ):
        await small.send(b'{"op":"ping","pad":"' + b"a" * 950)
        await large.send(b'{"op":"ping","pad":"' + b"b" * 1000)
        assert await last.ask({"op": "ping"}) == {"ok": True}  # both partials are now held
        await last.send(b'{"op":"ping","id":"l","pad":"' + b"c" * 960)
        answer = await asyncio.wait_for(large.answer(), 5)
        assert answer["error"]["code"] == "RequestTooLarge"
        assert "max_buffered_bytes" in answer["error"]["message"]
        assert await large.closed()
        await last.send(b'"}\n')
        assert (await last.answer())["id"] == "l"
    assert refused(registry, "max_buffered_bytes") == 1


# --- shards per group --------------------------------------------------------------------


async def test_commits_beyond_max_shards_are_refused_whole(sock_dir: Path) -> None:
    config = with_groups(make_config(sock_dir / "s"), orders={"max_shards": 3})
    store = CheckpointStore(g.name for g in config.groups)
    async with running(config, store) as server, connect(server.path) as peer:
        for shard in range(3):
            assert await peer.ask(commit(shard=shard, number=1)) == {"ok": True}
        answer = await peer.ask(commit(shard=3, number=1, id=4))
        assert answer["error"]["code"] == "TooManyShards"
        assert answer["id"] == 4
        assert await peer.ask(commit(shard=1, number=2)) == {"ok": True}  # tracked: fine
        items = [{"shard": 2, "checkpoint": cp(5)}, {"shard": 7, "checkpoint": cp(5)}]
        batch = await peer.ask({"op": "commit", "group": "orders", "checkpoints": items})
        assert batch["error"]["code"] == "TooManyShards"
        other = {"op": "commit", "group": "audit", "shard": 9, "checkpoint": cp(1)}
        assert await peer.ask(other) == {"ok": True}  # the limit is per group
    assert store.tracked_count("orders") == 3
    assert store.shard_view("orders", 2).pending == cp(1)  # type: ignore[union-attr]


@asynccontextmanager
async def journaled_limit_of_5(
    sock_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[CheckpointStore, GatedFsync, str]]:
    """A daemon with a journal whose fsync the test holds, and `orders` limited to 5 shards:
    (store, fsync gate, socket path)."""
    config = with_groups(make_config(sock_dir / "s"), orders={"max_shards": 5})
    store = CheckpointStore(g.name for g in config.groups)
    fsync = GatedFsync()
    async with (
        started_journal(tmp_path / "state", fsync) as journal,
        running(config, store, journal=journal) as server,
    ):
        yield store, fsync, server.path


def numbered_commits(count: int) -> list[bytes]:
    return [json.dumps(commit(shard=s, number=1, id=s)).encode() + b"\n" for s in range(count)]


async def test_concurrent_journaled_commits_cannot_overshoot_max_shards(
    sock_dir: Path, tmp_path: Path
) -> None:
    async with (
        journaled_limit_of_5(sock_dir, tmp_path) as (store, fsync, path),
        connect(path) as peer,
    ):
        lines = numbered_commits(8)
        await peer.send(b"".join(lines))
        await asyncio.to_thread(fsync.entered.wait, 10)  # written, their fsync held
        fsync.gate.set()
        answers = [await peer.answer() for _ in range(8)]
    codes = [a.get("error", {}).get("code", "ok") for a in answers]
    assert codes == ["ok"] * 5 + ["TooManyShards"] * 3
    assert store.tracked_count("orders") == 5


async def test_new_shards_held_by_one_connection_count_against_another(
    sock_dir: Path, tmp_path: Path
) -> None:
    async with (
        journaled_limit_of_5(sock_dir, tmp_path) as (store, fsync, path),
        connect(path) as first,
        connect(path) as second,
    ):
        lines = numbered_commits(6)
        await first.send(b"".join(lines[:3]))
        await asyncio.to_thread(fsync.entered.wait, 10)  # its 3 new shards held, not yet stored
        await second.send(b"".join(lines[3:]))
        fsync.gate.set()
        held = [await first.answer() for _ in range(3)]
        later = [await second.answer() for _ in range(3)]
    assert all(a["ok"] for a in held)
    codes = [a.get("error", {}).get("code", "ok") for a in later]
    assert codes == ["ok", "ok", "TooManyShards"]
    assert store.tracked_count("orders") == 5


# --- per-group uids ------------------------------------------------------------------------


async def test_a_group_refuses_peers_outside_its_allowed_uids(sock_dir: Path) -> None:
    config = with_groups(
        make_config(sock_dir / "s"),
        orders={"allowed_uids": (UID,)},
        audit={"allowed_uids": (UID + 1,)},
    )
    store = CheckpointStore(g.name for g in config.groups)
    store.accept("audit", 1, cp(7))
    committer = FakeCommitter(flush_result=FlushResult(1))
    async with (
        running(config, store, committer=committer) as server,
        connect(server.path) as peer,
    ):
        audit_commit = {"op": "commit", "group": "audit", "shard": 1, "checkpoint": cp(1), "id": 1}
        for request in (
            audit_commit,
            {**audit_commit, "force": True},
            {"op": "get", "group": "audit", "id": 1},
            {"op": "get", "group": "audit", "shard": 1, "remote": True, "id": 1},
            {"op": "flush", "group": "audit", "id": 1},
        ):
            answer = await peer.ask(request)
            assert answer["error"]["code"] == "Forbidden", request
            assert answer["id"] == 1
        # The connection stays, and the permitted group works.
        assert await peer.ask(commit(shard=2, number=3)) == {"ok": True}
        status = await peer.ask({"op": "status"})
        assert list(status["groups"]) == ["orders"]
        assert await peer.ask({"op": "flush"}) == {"ok": True, "committed": 1}
        unknown = await peer.ask({"op": "get", "group": "nope"})
        assert unknown["error"]["code"] == "UnknownGroup"
    assert committer.flushes == [("orders", config.commit.wait_timeout)]
    assert store.shard_view("audit", 1).pending == cp(7)  # type: ignore[union-attr]


async def test_a_peer_listed_for_every_group_sees_every_group(sock_dir: Path) -> None:
    config = with_groups(
        make_config(sock_dir / "s"),
        orders={"allowed_uids": (UID,)},
        audit={"allowed_uids": (UID + 1, UID)},
    )
    committer = FakeCommitter()
    async with running(config, committer=committer) as server, connect(server.path) as peer:
        other = {"op": "commit", "group": "audit", "shard": 1, "checkpoint": cp(1)}
        assert await peer.ask(other) == {"ok": True}
        assert sorted((await peer.ask({"op": "status"}))["groups"]) == ["audit", "orders"]
        assert (await peer.ask({"op": "flush"}))["ok"]
    assert committer.flushes == [(None, config.commit.wait_timeout)]


async def test_group_uids_follow_a_reload(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s")
    async with running(config, journal=FakeJournal()) as server, connect(server.path) as peer:
        assert await peer.ask(commit()) == {"ok": True}
        server.apply_config(with_groups(config, orders={"allowed_uids": (UID + 1,)}))
        assert (await peer.ask(commit(number=11)))["error"]["code"] == "Forbidden"
        server.apply_config(replace(config, groups=(GroupConfig("orders", "p", "l", "c"),)))
        assert await peer.ask(commit(number=12)) == {"ok": True}
