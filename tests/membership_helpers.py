"""Daemons with membership groups, in this process, against the in-process emulator; and a
consumer connection that tells answers from events."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lifecycle_helpers import LOGSTORE, PROJECT, REPO, daemon_config, group, remote_key

from cpmgr.config import parse_config
from cpmgr.daemon import Daemon, run
from cpmgr.emulator import EmulatorHandle, GroupSpec, running_emulator

KEY_ID, SECRET = "member-id", "member-secret"
CONSUMER_GROUP = "members"
WAIT = 10.0  # the longest any step may take before a test fails


@contextlib.asynccontextmanager
async def emulator(shards: int = 8, *, timeout: int = 2) -> AsyncIterator[EmulatorHandle]:
    """Logstore PROJECT/LOGSTORE with `shards` shards and the consumer group CONSUMER_GROUP,
    whose members SLS drops after `timeout` seconds without a heartbeat."""
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:{shards}"],
        consumer_groups=[GroupSpec(PROJECT, LOGSTORE, CONSUMER_GROUP, timeout)],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
    ) as handle:
        yield handle


def member_config(
    socket_path: Path, endpoint: str, *, membership: dict[str, object] | None = None, **extra: Any
) -> dict[str, Any]:
    """A daemon with one membership group `orders` on the emulator's consumer group."""
    settings = {
        "heartbeat_interval": "200ms",
        "timeout": "2s",
        "release_timeout": "1s",
        **(membership or {}),
    }
    data = daemon_config(
        socket_path=socket_path,
        endpoint=endpoint,
        groups=[group("orders", CONSUMER_GROUP, membership=settings)],
        credentials={"access_key_id": KEY_ID, "access_key_secret": SECRET},
        **extra,
    )
    data["commit"]["request_timeout"] = "300ms"
    return data


@dataclass
class RunningDaemon:
    daemon: Daemon
    socket_path: str
    stop: asyncio.Event
    task: asyncio.Task[int]

    async def shut_down(self) -> int:
        self.stop.set()
        return await asyncio.wait_for(self.task, WAIT)


@contextlib.asynccontextmanager
async def running_daemon(data: dict[str, Any]) -> AsyncIterator[RunningDaemon]:
    config = parse_config(data, {})
    stop = asyncio.Event()
    started: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(run(config, shutdown_trigger=stop.wait, started=started.set_result))
    daemon = await asyncio.wait_for(asyncio.shield(started), WAIT)
    running = RunningDaemon(daemon, config.socket.path, stop, task)
    try:
        yield running
    finally:
        if not task.done():
            stop.set()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, WAIT)


@dataclass
class Consumer:
    """One socket connection: answers in order, events as they come."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    answers: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    events: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    held: set[int] = field(default_factory=set)
    log: list[dict[str, Any]] = field(default_factory=list)
    _pump: asyncio.Task[None] | None = None

    async def _read(self) -> None:
        while line := await self.reader.readline():
            message = json.loads(line)
            message["_at"] = time.monotonic()
            self.log.append(message)
            if "event" in message:
                assert "ok" not in message, message
                self._track(message)
                self.events.put_nowait(message)
            else:
                self.answers.put_nowait(message)

    def _track(self, event: dict[str, Any]) -> None:
        if event["event"] == "assigned":
            self.held.add(event["shard"])
        elif event["event"] in ("revoked", "ended"):
            pass  # still held until released
        elif event["event"] == "lost":
            self.held -= set(event["shards"])

    async def ask(self, request: dict[str, Any], *, timeout: float = WAIT) -> dict[str, Any]:
        self.send(request)
        answer = await asyncio.wait_for(self.answers.get(), timeout)
        answer.pop("_at", None)
        return answer

    def send(self, request: dict[str, Any]) -> None:
        self.writer.write(json.dumps(request).encode() + b"\n")

    async def event(self, kind: str | None = None, *, timeout: float = WAIT) -> dict[str, Any]:
        """The next event (of `kind`; others before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            event = await asyncio.wait_for(self.events.get(), max(left, 0.001))
            if kind is None or event["event"] == kind:
                return event

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()
        if self._pump is not None:
            self._pump.cancel()


@contextlib.asynccontextmanager
async def consumer(socket_path: str) -> AsyncIterator[Consumer]:
    reader, writer = await asyncio.open_unix_connection(socket_path)
    peer = Consumer(reader, writer)
    peer._pump = asyncio.create_task(peer._read())
    try:
        yield peer
    finally:
        await peer.close()


async def join(peer: Consumer, name: str) -> None:
    """Join group `orders` as `name`; the answer must be ok."""
    answer = await peer.ask({"op": "join", "group": "orders", "consumer": name})
    assert answer["ok"], answer


async def assigned(peer: Consumer, count: int) -> dict[int, str]:
    """The next `count` shards assigned to the peer: {shard: where to start}."""
    shards = {}
    while len(shards) < count:
        event = await peer.event("assigned")
        shards[event["shard"]] = event["checkpoint"]
    return shards


def history(emu: EmulatorHandle, shard: int) -> list[str]:
    """Every checkpoint SLS accepted for the shard of CONSUMER_GROUP, oldest first."""
    return emu.state.history[remote_key(CONSUMER_GROUP, shard)]


async def until(condition: Callable[[], bool], what: str, timeout: float = WAIT) -> None:
    """Wait for a condition another task brings about (the emulator or daemon's state)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout}s: {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def emulator_process(*arguments: str) -> AsyncIterator[str]:
    """`cpmgr emulator` in its own process (as SLS is: not on the daemon's event loop); its URL."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr",
        "emulator",
        "--listen",
        "127.0.0.1:0",
        "--access-key-id",
        KEY_ID,
        "--access-key-secret",
        SECRET,
        *arguments,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), WAIT)).decode()
        assert " listening on " in line, line
        yield line.rsplit(" ", 1)[1].strip()
    finally:
        if proc.returncode is None:
            proc.terminate()
            await asyncio.wait_for(proc.wait(), WAIT)


@contextlib.asynccontextmanager
async def one_member(
    sock_dir: Path, *, options: dict[str, Any] | None = None, **membership: object
) -> AsyncIterator[tuple[EmulatorHandle, RunningDaemon, Consumer]]:
    """An emulator, a daemon (with `options` of daemon_config), and a consumer joined as
    `pod-a` holding all 8 shards."""
    async with emulator() as emu:
        data = member_config(
            sock_dir / "a.sock", emu.url, membership=membership or None, **(options or {})
        )
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            await assigned(peer, 8)
            yield emu, daemon, peer
