"""The socket server, from a real Unix socket: every op, error code and edge of docs/protocol.md
that the socket side owns."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import stat
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from cpmgr import __version__
from cpmgr.config import Config, GroupConfig, SLSConfig, SocketConfig
from cpmgr.dispatch import LISTING_CHUNK, JournalEntry
from cpmgr.errors import CpmgrError, SLSError
from cpmgr.ingest import Dispatcher, IngestServer
from cpmgr.metrics import Metrics
from cpmgr.outcomes import CommitOutcome, FlushResult, ShardFailure
from cpmgr.protocol import (
    CommitItem,
    CommitRequest,
    FlushRequest,
    GetRequest,
    PingRequest,
    RequestId,
    StatusRequest,
    encode_ok,
)
from cpmgr.sls.client import RemoteCheckpoint
from cpmgr.store import CheckpointStore, ErrorInfo


def cp(number: int | str) -> str:
    return base64.b64encode(str(number).encode()).decode()


@pytest.fixture
def config(sock_dir: Path) -> Config:
    return make_config(sock_dir / "cpmgr.sock")


def make_config(path: Path, **socket_options: Any) -> Config:
    return Config(
        socket=SocketConfig(path=str(path), **socket_options),
        sls=SLSConfig(endpoint="127.0.0.1:1"),
        groups=(GroupConfig("orders", "p", "ls", "cg"), GroupConfig("audit", "p", "ls2", "cg")),
    )


@asynccontextmanager
async def running(
    config: Config, store: CheckpointStore | None = None, **options: Any
) -> AsyncIterator[IngestServer]:
    store = store if store is not None else CheckpointStore(g.name for g in config.groups)
    server = IngestServer(config, store, **options)
    await server.start()
    try:
        yield server
    finally:
        await server.close(grace=0)


class Peer:
    """A consumer connection speaking raw lines."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    async def answer(self) -> dict[str, Any]:
        line = await self.reader.readline()
        assert line.endswith(b"\n"), f"connection closed early: {line!r}"
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def ask(self, obj: Any) -> dict[str, Any]:
        await self.send(json.dumps(obj).encode() + b"\n")
        return await self.answer()

    async def closed(self) -> bool:
        try:
            return await self.reader.read() == b""
        except ConnectionResetError:
            return True


@asynccontextmanager
async def connect(path: str, *, limit: int = 2**16) -> AsyncIterator[Peer]:
    reader, writer = await asyncio.open_unix_connection(path, limit=limit)
    try:
        yield Peer(reader, writer)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


def commit(shard: int = 3, number: int = 10, **fields: Any) -> dict[str, Any]:
    return {"op": "commit", "group": "orders", "shard": shard, "checkpoint": cp(number), **fields}


# --- ops ------------------------------------------------------------------------------------


async def test_ping_commit_get_status(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    async with running(config, store) as server, connect(server.path) as peer:
        assert await peer.ask({"op": "ping"}) == {"ok": True}
        assert await peer.ask(commit(consumer="c1", id=1)) == {"ok": True, "id": 1}
        answer = await peer.ask({"op": "get", "group": "orders", "shard": 3})
        assert answer == {
            "ok": True,
            "shards": [
                {
                    "group": "orders",
                    "shard": 3,
                    "pending": cp(10),
                    "committed": None,
                    "committed_at": None,
                    "last_error": None,
                    "lag": None,
                }
            ],
        }
        status = await peer.ask({"op": "status"})
        assert status["version"] == __version__
        assert status["uptime_seconds"] >= 0
        assert status["groups"] == {
            "orders": {"pending": 1, "tracked": 1, "failures": 0, "last_success": None},
            "audit": {"pending": 0, "tracked": 0, "failures": 0, "last_success": None},
        }
    attempt = store.snapshot()[0]
    assert (attempt.checkpoint, attempt.consumer) == (cp(10), "c1")


async def test_get_shows_committed_values_and_errors(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    store.accept("orders", 2, cp(5))
    store.accept("orders", 0, cp(7))
    attempts = store.snapshot()
    store.on_success(attempts[0], at=1764130000.5)
    store.on_permanent_failure(attempts[1], ErrorInfo("InvalidShardCheckPoint", "bad", 17.0))
    async with running(config, store) as server, connect(server.path) as peer:
        answer = await peer.ask({"op": "get", "group": "orders"})
        assert answer["shards"] == [
            {
                "group": "orders",
                "shard": 0,
                "pending": None,
                "committed": cp(7),
                "committed_at": 1764130000.5,
                "last_error": None,
                "lag": None,
            },
            {
                "group": "orders",
                "shard": 2,
                "pending": None,
                "committed": None,
                "committed_at": None,
                "last_error": {"code": "InvalidShardCheckPoint", "message": "bad", "at": 17.0},
                "lag": None,
            },
        ]
        unseen = await peer.ask({"op": "get", "group": "orders", "shard": 9})
        assert unseen["shards"] == [
            {
                "group": "orders",
                "shard": 9,
                "pending": None,
                "committed": None,
                "committed_at": None,
                "last_error": None,
                "lag": None,
            }
        ]
        assert await peer.ask({"op": "get", "group": "audit"}) == {"ok": True, "shards": []}


async def test_status_comes_from_the_given_callable(config: Config) -> None:
    def status() -> dict[str, Any]:
        return {"ok": True, "version": "x", "groups": {}, "ready": True}

    async with running(config, status=status) as server, connect(server.path) as peer:
        assert await peer.ask({"op": "status", "id": "s"}) == {
            "ok": True,
            "version": "x",
            "groups": {},
            "ready": True,
            "id": "s",
        }


async def test_batch_commit_counts_distinct_shards(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    async with running(config, store) as server, connect(server.path) as peer:
        answer = await peer.ask(
            {
                "op": "commit",
                "group": "orders",
                "checkpoints": [
                    {"shard": 1, "checkpoint": cp(1)},
                    {"shard": 2, "checkpoint": cp(2), "consumer": "b"},
                    {"shard": 1, "checkpoint": cp(3)},
                ],
                "id": "batch",
            }
        )
        assert answer == {"ok": True, "accepted": 2, "id": "batch"}
    assert [(a.shard, a.checkpoint, a.consumer) for a in store.snapshot()] == [
        (1, cp(3), None),
        (2, cp(2), "b"),
    ]


# --- errors keep the connection usable ------------------------------------------------------


def _line(**fields: Any) -> bytes:
    return json.dumps({"op": "commit", "group": "orders", "id": 5, **fields}).encode()


@pytest.mark.parametrize(
    ("raw", "code", "echo"),
    [
        (b"this is not json", "BadRequest", False),
        (b"[1, 2]", "BadRequest", False),
        (_line(shard="3", checkpoint=cp(1)), "BadRequest", True),
        (_line(shard=True, checkpoint=cp(1)), "BadRequest", True),
        (_line(shard=3.0, checkpoint=cp(1)), "BadRequest", True),
        (_line(shard=-1, checkpoint=cp(1)), "BadRequest", True),
        (_line(checkpoint=cp(1)), "BadRequest", True),
        (_line(shard=1, checkpoint="MTA"), "InvalidShardCheckPoint", True),
        (_line(shard=1, checkpoint=""), "InvalidShardCheckPoint", True),
        (_line(group="nope", shard=1, checkpoint=cp(1)), "UnknownGroup", True),
        (b'{"op":"get","group":"nope","id":5}', "UnknownGroup", True),
        (b'{"op":"flush","group":"nope","id":5}', "UnknownGroup", True),
        (b'{"op":"explode","id":5}', "UnknownOp", True),
        (_line(shard=1, checkpoint=cp(1), timeout=0), "BadRequest", True),
        (_line(checkpoints=[]), "BadRequest", True),
        (b'{"op":"ping","x":' + b"[" * 40 + b"]" * 40 + b',"id":5}', "BadRequest", False),
        (b'{"op":"ping","id":"\xff"}', "BadRequest", False),
    ],
)
async def test_refused_requests_answer_their_code(
    config: Config, raw: bytes, code: str, echo: bool
) -> None:
    async with running(config) as server, connect(server.path) as peer:
        await peer.send(raw + b"\n")
        answer = await peer.answer()
        assert answer["ok"] is False
        assert answer["error"]["code"] == code
        assert answer["error"]["message"]
        assert ("id" in answer) == echo
        if echo:
            assert answer["id"] == 5
        assert await peer.ask({"op": "ping"}) == {"ok": True}


async def test_regression_is_refused_unless_forced(config: Config) -> None:
    async with running(config) as server, connect(server.path) as peer:
        assert (await peer.ask(commit(number=10)))["ok"]
        answer = await peer.ask(commit(number=9, id="r"))
        assert answer["error"]["code"] == "CheckpointRegression"
        assert answer["id"] == "r"
        assert await peer.ask(commit(number=9, force=True)) == {"ok": True}
        get = await peer.ask({"op": "get", "group": "orders", "shard": 3})
        assert get["shards"][0]["pending"] == cp(9)


async def test_batch_is_refused_as_a_whole(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    store.accept("orders", 2, cp(50))
    async with running(config, store) as server, connect(server.path) as peer:
        items = [
            {"shard": 1, "checkpoint": cp(1)},
            {"shard": 2, "checkpoint": cp(40)},
            {"shard": 3, "checkpoint": cp(3)},
        ]
        answer = await peer.ask({"op": "commit", "group": "orders", "checkpoints": items})
        assert answer["error"]["code"] == "CheckpointRegression"
        assert answer["error"]["message"].startswith("checkpoints[1]:")
        items[1] = {"shard": 2, "checkpoint": "not base64"}
        answer = await peer.ask({"op": "commit", "group": "orders", "checkpoints": items})
        assert answer["error"]["code"] == "InvalidShardCheckPoint"
        assert answer["error"]["message"].startswith("checkpoints[1].checkpoint")
    assert store.tracked_count("orders") == 1
    assert store.shard_view("orders", 2).pending == cp(50)  # type: ignore[union-attr]


async def test_unexpected_handler_error_answers_internal_error(config: Config) -> None:
    class Broken(Dispatcher):
        async def ping(self, request: PingRequest) -> dict[str, object]:
            raise RuntimeError("boom")

    store = CheckpointStore(["orders"])
    handlers = Broken(store, config=config)
    async with running(config, store, handlers=handlers) as server, connect(server.path) as peer:
        answer = await peer.ask({"op": "ping", "id": 1})
        assert answer["error"]["code"] == "InternalError"
        assert answer["id"] == 1
        assert (await peer.ask({"op": "status"}))["ok"]


# --- framing and pipelining -----------------------------------------------------------------


async def test_pipelined_answers_come_in_order_with_ids(config: Config) -> None:
    lines = []
    for n in range(300):
        if n % 50 == 7:
            lines.append(b"garbage")
        elif n % 50 == 8:
            lines.append(b"   ")
        else:
            lines.append(json.dumps(commit(shard=n % 4, number=n, id=n)).encode())
    expected = [n for n in range(300) if n % 50 not in (7, 8)]
    async with running(config) as server, connect(server.path) as peer:
        await peer.send(b"\r\n".join(lines) + b"\r\n")
        answers = [await peer.answer() for _ in range(len(expected) + 6)]
        assert await peer.ask({"op": "ping", "id": "last"}) == {"ok": True, "id": "last"}
    with_ids = [a for a in answers if "id" in a]
    assert [a["id"] for a in with_ids] == expected
    assert all(a["ok"] for a in with_ids)
    garbage = [i for i, a in enumerate(answers) if "id" not in a]
    assert garbage == [7 + 49 * k for k in range(6)]  # each bad line answered where it was


async def test_pipelined_burst_is_written_at_once(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[bytes] = []
    # The server writes through the event loop's socket transport; count its writes.
    transport_class: Any = asyncio.selector_events._SelectorSocketTransport  # type: ignore[attr-defined]
    original = transport_class.write

    def counting_write(self: asyncio.Transport, data: bytes) -> None:
        writes.append(bytes(data))
        original(self, data)

    monkeypatch.setattr(transport_class, "write", counting_write)
    burst = b"".join(json.dumps({"op": "ping", "id": n}).encode() + b"\n" for n in range(100))
    loop = asyncio.get_running_loop()
    async with running(config) as server:
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.setblocking(False)
        try:
            await loop.sock_connect(client, server.path)
            await loop.sock_sendall(client, burst)  # one send: no StreamWriter on this side
            received = b""
            while received.count(b"\n") < 100:
                received += await loop.sock_recv(client, 65536)
        finally:
            client.close()
    assert [json.loads(line)["id"] for line in received.splitlines()] == list(range(100))
    assert len(writes) == 1


async def test_last_line_without_newline_is_answered(config: Config) -> None:
    async with running(config) as server, connect(server.path) as peer:
        await peer.send(b'{"op":"ping","id":1}\n{"op":"ping","id":2}')
        peer.writer.write_eof()
        assert await peer.answer() == {"ok": True, "id": 1}
        assert await peer.answer() == {"ok": True, "id": 2}
        assert await peer.closed()


async def test_oversized_line_is_refused_and_closed(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", max_line_bytes=1024)
    ping = b'{"op":"ping","id":0}'
    exact = ping[:-1] + b"," + b'"pad":"' + b"x" * (1024 - len(ping) - 9) + b'"}'
    assert len(exact) == 1024
    async with running(config) as server, connect(server.path) as peer:
        await peer.send(exact + b"\n")
        assert await peer.answer() == {"ok": True, "id": 0}
        await peer.send(b'{"op":"ping","id":1}\n' + b'{"op":"ping","pad":"' + b"y" * 5000)
        assert await peer.answer() == {"ok": True, "id": 1}
        answer = await peer.answer()
        assert answer["error"]["code"] == "RequestTooLarge"
        assert "id" not in answer
        assert await peer.closed()
        async with connect(server.path) as again:
            assert await again.ask({"op": "ping"}) == {"ok": True}


async def test_line_one_byte_over_the_limit_is_refused(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", max_line_bytes=64)
    line = b'{"op":"ping","pad":"' + b"z" * (65 - 22) + b'"}'
    assert len(line) == 65
    async with running(config) as server, connect(server.path) as peer:
        await peer.send(line + b"\n")
        assert (await peer.answer())["error"]["code"] == "RequestTooLarge"
        assert await peer.closed()


# --- peers ----------------------------------------------------------------------------------


async def test_allowed_uid_is_served(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", allowed_uids=(os.getuid(),))
    async with running(config) as server, connect(server.path) as peer:
        assert await peer.ask({"op": "ping"}) == {"ok": True}


async def test_other_uid_is_forbidden_and_closed(sock_dir: Path) -> None:
    config = make_config(sock_dir / "s", allowed_uids=(os.getuid() + 1, os.getuid() + 2))
    store = CheckpointStore(["orders", "audit"])
    async with running(config, store) as server, connect(server.path) as peer:
        answer = await peer.answer()  # sent on connect, before any request is read
        assert answer == {
            "ok": False,
            "error": {"code": "Forbidden", "message": "peer uid is not allowed"},
        }
        assert await peer.closed()
    assert store.tracked_count("orders") == 0


# --- lifecycle ------------------------------------------------------------------------------


async def test_socket_mode_and_cleanup(sock_dir: Path) -> None:
    path = sock_dir / "deeper" / "cp.sock"
    config = make_config(path, mode=0o600)
    server = IngestServer(config, CheckpointStore(["orders"]))
    await server.start()
    try:
        info = os.stat(path)
        assert stat.S_ISSOCK(info.st_mode)
        assert stat.S_IMODE(info.st_mode) == 0o600
        assert stat.S_IMODE(os.stat(path.parent).st_mode) & 0o777 == 0o755 & ~_umask()
    finally:
        await server.close()
        await server.close()
    assert not path.exists()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


async def test_group_readable_mode(config: Config) -> None:
    config = replace(config, socket=replace(config.socket, mode=0o660))
    async with running(config) as server:
        assert stat.S_IMODE(os.stat(server.path).st_mode) == 0o660


async def test_stale_socket_is_replaced(config: Config) -> None:
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(config.socket.path)
    stale.close()  # the file stays, nobody listens
    async with running(config) as server, connect(server.path) as peer:
        assert await peer.ask({"op": "ping"}) == {"ok": True}


async def test_live_socket_is_an_error(config: Config) -> None:
    async with running(config) as first:
        second = IngestServer(config, CheckpointStore(["orders"]))
        with pytest.raises(CpmgrError, match="already listening"):
            await second.start()
        await second.close()
        async with connect(first.path) as peer:
            assert await peer.ask({"op": "ping"}) == {"ok": True}


async def test_a_file_that_is_not_a_socket_is_left_alone(config: Config) -> None:
    path = config.socket.path
    with open(path, "w") as precious:  # noqa: ASYNC230 - a tiny local file
        precious.write("precious")
    server = IngestServer(config, CheckpointStore(["orders"]))
    with pytest.raises(CpmgrError, match="not a socket"):
        await server.start()
    with open(path) as precious:  # noqa: ASYNC230
        assert precious.read() == "precious"


async def test_close_leaves_a_replaced_socket_file_alone(config: Config) -> None:
    server = IngestServer(config, CheckpointStore(["orders"]))
    await server.start()
    os.unlink(server.path)
    newcomer = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    newcomer.bind(server.path)
    try:
        await server.close()
        assert stat.S_ISSOCK(os.stat(server.path).st_mode)
    finally:
        newcomer.close()


async def test_stop_accepting_refuses_commits_only(config: Config) -> None:
    async with running(config) as server, connect(server.path) as peer:
        assert (await peer.ask(commit(number=1)))["ok"]
        server.stop_accepting()
        answer = await peer.ask(commit(number=2, id=3))
        assert answer == {
            "ok": False,
            "error": {"code": "ShuttingDown", "message": "the daemon is shutting down"},
            "id": 3,
        }
        assert await peer.ask({"op": "ping"}) == {"ok": True}
        get = await peer.ask({"op": "get", "group": "orders", "shard": 3})
        assert get["shards"][0]["pending"] == cp(1)


async def test_close_closes_idle_connections(config: Config) -> None:
    server = IngestServer(config, CheckpointStore(["orders"]))
    await server.start()
    async with connect(server.path) as peer:
        assert await peer.ask({"op": "ping"}) == {"ok": True}
        await server.close()
        assert await peer.closed()


async def test_apply_config_updates_the_groups(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    async with running(config, store) as server, connect(server.path) as peer:
        store.add_group("fresh")
        answer = await peer.ask({"op": "commit", "group": "fresh", "shard": 0, "checkpoint": cp(1)})
        assert answer["error"]["code"] == "UnknownGroup"
        groups = (*config.groups, GroupConfig("fresh", "p", "ls3", "cg"))
        server.apply_config(replace(config, groups=groups))
        answer = await peer.ask({"op": "commit", "group": "fresh", "shard": 0, "checkpoint": cp(1)})
        assert answer == {"ok": True}


# --- the committer and journal seams ------------------------------------------------------


# The committer's real outcome types, under the names these tests use.
Outcome = CommitOutcome
Failure = ShardFailure
Remote = RemoteCheckpoint


@dataclass
class FakeCommitter:
    """Answers as scripted; `gate` holds flushes until set."""

    outcomes: dict[int, Outcome] = field(default_factory=dict)
    flush_result: FlushResult = field(default_factory=lambda: FlushResult(0))
    remote_entries: dict[int, Remote] = field(default_factory=dict)
    remote_error: SLSError | None = None
    waits: list[tuple[str, int, int, float]] = field(default_factory=list)
    flushes: list[tuple[str | None, float]] = field(default_factory=list)
    gate: asyncio.Event | None = None
    entered: asyncio.Event = field(default_factory=asyncio.Event)

    async def wait_for(self, group: str, shard: int, seq: int, timeout: float) -> Outcome:
        self.waits.append((group, shard, seq, timeout))
        return self.outcomes.get(shard, Outcome(ok=True))

    async def flush(self, *, group: str | None = None, timeout: float) -> FlushResult:
        self.flushes.append((group, timeout))
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        return self.flush_result

    async def remote(self, group: str, shard: int | None = None) -> dict[int, Remote]:
        if self.remote_error is not None:
            raise self.remote_error
        entries = self.remote_entries
        return {s: e for s, e in entries.items() if shard is None or s == shard}


async def test_wait_flush_remote_without_committer_are_not_available(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    async with running(config, store) as server, connect(server.path) as peer:
        for request in (
            commit(wait=True),
            {"op": "flush"},
            {"op": "get", "group": "orders", "remote": True},
        ):
            answer = await peer.ask(request)
            assert answer["error"]["code"] == "BadRequest"
            assert "not available" in answer["error"]["message"]
    assert store.tracked_count("orders") == 0  # the waited commit was not accepted


async def test_commit_wait_succeeds(config: Config) -> None:
    committer = FakeCommitter()
    store = CheckpointStore(["orders", "audit"])
    async with (
        running(config, store, committer=committer) as server,
        connect(server.path) as peer,
    ):
        assert await peer.ask(commit(wait=True, timeout=2, id=1)) == {"ok": True, "id": 1}
        assert await peer.ask(commit(number=11, wait=True)) == {"ok": True}
    seq = store.pending_seqs()[0][2]
    assert committer.waits[-1] == ("orders", 3, seq, config.commit.wait_timeout)
    assert committer.waits[0][3] == 2.0


@pytest.mark.parametrize("dropped", [True, False])
async def test_commit_wait_failure_carries_dropped(config: Config, dropped: bool) -> None:
    committer = FakeCommitter(outcomes={3: Outcome(False, "ConsumerNotMatch", "nope", dropped)})
    async with running(config, committer=committer) as server, connect(server.path) as peer:
        assert await peer.ask(commit(wait=True, id=1)) == {
            "ok": False,
            "error": {"code": "ConsumerNotMatch", "message": "nope", "dropped": dropped},
            "id": 1,
        }


async def test_commit_wait_timeout(config: Config) -> None:
    committer = FakeCommitter(outcomes={3: Outcome(False, "Timeout", "value still pending")})
    async with running(config, committer=committer) as server, connect(server.path) as peer:
        answer = await peer.ask(commit(wait=True, timeout=0.5))
        assert answer["error"] == {
            "code": "Timeout",
            "message": "value still pending",
            "dropped": False,
        }


async def test_batch_wait_failure_lists_failed_shards(config: Config) -> None:
    committer = FakeCommitter(
        outcomes={
            1: Outcome(False, "Timeout", "still pending"),
            2: Outcome(False, "ShardNotExist", "gone", True),
        }
    )
    async with running(config, committer=committer) as server, connect(server.path) as peer:
        items = [{"shard": s, "checkpoint": cp(s)} for s in (0, 1, 2)]
        answer = await peer.ask(
            {"op": "commit", "group": "orders", "checkpoints": items, "wait": True}
        )
    gone = {"code": "ShardNotExist", "message": "gone", "dropped": True}
    assert answer == {
        "ok": False,
        "failed": [{"group": "orders", "shard": 2, **gone}],
        "error": {**gone, "message": "shard 2: gone"},
    }


async def test_flush_answers(config: Config) -> None:
    committer = FakeCommitter(flush_result=FlushResult(4))
    async with running(config, committer=committer) as server, connect(server.path) as peer:
        assert await peer.ask({"op": "flush", "id": 1}) == {"ok": True, "committed": 4, "id": 1}
        committer.flush_result = FlushResult(
            2, (Failure("orders", 5, "ProjectNotExist", "no project", True),), timed_out=True
        )
        answer = await peer.ask({"op": "flush", "group": "orders", "timeout": 3})
        assert answer == {
            "ok": False,
            "committed": 2,
            "failed": [
                {
                    "group": "orders",
                    "shard": 5,
                    "code": "ProjectNotExist",
                    "message": "no project",
                    "dropped": True,
                }
            ],
            "error": {
                "code": "CommitFailed",
                "message": "1 shard(s) could not be committed (and some timed out)",
            },
        }
        committer.flush_result = FlushResult(1, timed_out=True)
        answer = await peer.ask({"op": "flush"})
        assert answer["error"]["code"] == "Timeout"
        assert answer["committed"] == 1
    assert committer.flushes == [
        (None, config.commit.wait_timeout),
        ("orders", 3.0),
        (None, config.commit.wait_timeout),
    ]


async def test_get_remote_merges_both_views(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    store.accept("orders", 1, cp(9))
    committer = FakeCommitter(
        remote_entries={
            0: Remote(0, cp(3), 1764130000000000, "c0"),
            1: Remote(1, cp(8), 1764130000000001, "c1"),
        }
    )
    async with (
        running(config, store, committer=committer) as server,
        connect(server.path) as peer,
    ):
        answer = await peer.ask({"op": "get", "group": "orders", "remote": True})
        shards = answer["shards"]
        assert [(s["shard"], s["pending"]) for s in shards] == [(0, None), (1, cp(9))]
        assert shards[0]["remote"] == {
            "checkpoint": cp(3),
            "update_time": 1764130000000000,
            "consumer": "c0",
        }
        one = await peer.ask({"op": "get", "group": "orders", "shard": 7, "remote": True})
        assert one["shards"][0]["remote"] is None
        committer.remote_error = SLSError("ConsumerGroupNotExist", 404, "no such group")
        failed = await peer.ask({"op": "get", "group": "orders", "remote": True})
        assert failed["error"] == {"code": "ConsumerGroupNotExist", "message": "no such group"}


async def test_close_answers_the_request_in_flight(config: Config) -> None:
    committer = FakeCommitter(flush_result=FlushResult(2), gate=asyncio.Event())
    server = IngestServer(config, CheckpointStore(["orders"]), committer=committer)
    await server.start()
    async with connect(server.path) as busy, connect(server.path) as idle:
        await busy.send(b'{"op":"flush","id":"f"}\n')
        await committer.entered.wait()
        closer = asyncio.create_task(server.close())
        await asyncio.sleep(0)  # let close() start: it must now wait for the flush
        assert not closer.done()
        assert await idle.closed()
        assert committer.gate is not None
        committer.gate.set()
        assert await busy.answer() == {"ok": True, "committed": 2, "id": "f"}
        assert await busy.closed()
        await closer


async def test_close_after_grace_answers_shutting_down(config: Config) -> None:
    committer = FakeCommitter(gate=asyncio.Event())
    server = IngestServer(config, CheckpointStore(["orders"]), committer=committer)
    await server.start()
    async with connect(server.path) as busy:
        await busy.send(b'{"op":"flush","id":"f"}\n')
        await committer.entered.wait()
        await server.close(grace=0)
        answer = await busy.answer()
        assert answer["error"]["code"] == "ShuttingDown"
        assert answer["id"] == "f"
        assert await busy.closed()


@dataclass
class FakeJournal:
    entries: list[tuple[str, int, str, str | None]] = field(default_factory=list)
    fail: bool = False

    async def record_accepted(self, entries: Any) -> None:
        if self.fail:
            raise CpmgrError("disk full")
        self.entries.extend(entries)

    def accept_run(self, group: str, *columns: Any) -> asyncio.Future[CpmgrError | None]:
        return run_outcome(self.record_accepted, group, *columns)


def run_outcome(
    record: Callable[[list[JournalEntry]], Awaitable[None]],
    group: str,
    shards: Sequence[int],
    checkpoints: Sequence[str],
    consumers: Sequence[str | None],
) -> asyncio.Future[CpmgrError | None]:
    """A fake journal's `accept_run`: its `record_accepted` of the same entries, as the future
    of its outcome."""

    async def outcome() -> CpmgrError | None:
        try:
            entries = zip(repeat(group, len(shards)), shards, checkpoints, consumers, strict=True)
            await record(list(entries))
        except CpmgrError as exc:
            return exc
        return None

    return asyncio.ensure_future(outcome())


async def test_commits_are_journaled_before_they_are_accepted(config: Config) -> None:
    journal = FakeJournal()
    store = CheckpointStore(["orders", "audit"])
    async with running(config, store, journal=journal) as server, connect(server.path) as peer:
        assert await peer.ask(commit(consumer="c")) == {"ok": True}
        answer = await peer.ask(commit(number=5))
        assert answer["error"]["code"] == "CheckpointRegression"
        journal.fail = True
        answer = await peer.ask(commit(number=11, id=2))
        assert answer["error"]["code"] == "JournalError"
        assert answer["id"] == 2
    assert journal.entries == [("orders", 3, cp(10), "c")]
    assert store.shard_view("orders", 3).pending == cp(10)  # type: ignore[union-attr]


async def test_metrics_count_the_socket_side(config: Config) -> None:
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_metrics=False)
    async with running(config, metrics=metrics) as server, connect(server.path) as peer:
        assert await peer.ask({"op": "ping"}) == {"ok": True}
        assert registry.get_sample_value("cpmgr_socket_connections") == 1
        items = [{"shard": s, "checkpoint": cp(s)} for s in range(3)]
        await peer.ask({"op": "commit", "group": "orders", "checkpoints": items})
        await peer.ask(commit())
        await peer.ask({"op": "bogus"})
        sample = registry.get_sample_value
        assert sample("cpmgr_checkpoints_received_total", {"group": "orders"}) == 4
        assert sample("cpmgr_socket_request_errors_total", {"code": "UnknownOp"}) == 1


async def test_dispatcher_routes_every_op_without_a_socket(config: Config) -> None:
    dispatcher = Dispatcher(CheckpointStore(["orders"]), config=config)
    assert await dispatcher.ping(PingRequest()) == {}
    assert (await dispatcher.status(StatusRequest()))["version"] == __version__
    assert await dispatcher.get(GetRequest("orders")) == {"shards": []}
    with pytest.raises(Exception, match="not available"):
        await dispatcher.flush(FlushRequest())
    accepted = await dispatcher.commit(CommitRequest("orders", (CommitItem(1, cp(1)),)))
    assert accepted == {}


async def test_an_id_too_large_for_a_float_is_refused_and_answered(config: Config) -> None:
    async with running(config) as server, connect(server.path) as peer:
        await peer.send(b'{"op":"ping","id":1e400}\n')
        answer = await peer.answer()
        assert answer["error"]["code"] == "BadRequest" and "id" not in answer
        assert (await peer.ask({"op": "ping", "id": 1}))["ok"]  # the connection stays usable


async def test_batch_regression_names_the_index_as_sent_with_a_repeated_shard(
    config: Config,
) -> None:
    async with running(config) as server, connect(server.path) as peer:
        assert (await peer.ask(commit(shard=2, number=50)))["ok"]
        items = [
            {"shard": 1, "checkpoint": cp(5)},
            {"shard": 1, "checkpoint": cp(6)},
            {"shard": 2, "checkpoint": cp(40)},
        ]
        answer = await peer.ask({"op": "commit", "group": "orders", "checkpoints": items})
        assert answer["error"]["code"] == "CheckpointRegression"
        assert answer["error"]["message"].startswith("checkpoints[2]: shard 2")


async def test_a_large_whole_group_get_is_answered_in_order_and_in_full(config: Config) -> None:
    # Built and encoded a chunk of shards per loop turn (11 MB at 100,000 shards), and still
    # answered in request order, byte for byte what the one-go encoding writes.
    store = CheckpointStore(["orders", "audit"])
    for shard in range(LISTING_CHUNK * 2 + 5):
        store.accept("orders", shard, cp(shard + 1))
    expected = encode_ok(
        RequestId.of(1),
        shards=[
            {
                "group": "orders",
                "shard": shard,
                "pending": cp(shard + 1),
                "committed": None,
                "committed_at": None,
                "last_error": None,
                "lag": None,
            }
            for shard in range(LISTING_CHUNK * 2 + 5)
        ],
    )
    async with running(config, store) as server, connect(server.path, limit=2**24) as peer:
        await peer.send(b'{"op":"get","group":"orders","id":1}\n{"op":"ping","id":2}\n')
        assert await peer.reader.readline() == expected
        assert await peer.answer() == {"ok": True, "id": 2}
