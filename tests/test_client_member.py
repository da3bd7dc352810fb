"""The member shells (sync and asyncio) against a scripted daemon on a real Unix socket:
events between answers, ops on the joined connection, and the end of a membership.

The daemon's own membership side has its end-to-end tests with a real `cpmgr run` and the
emulator (test_client_membership.py); here the daemon is a script, so each interleaving the
contract allows is produced exactly.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cpmgr.client import (
    Assigned,
    AsyncCpmgrClient,
    CpmgrClient,
    CpmgrProtocolError,
    CpmgrUnavailable,
    Lost,
    MemberEvent,
    OtherEvent,
    Revoked,
)

Script = Callable[[dict[str, Any]], list[dict[str, Any]]]


def event(kind: str, **fields: object) -> dict[str, Any]:
    return {"event": kind, "group": "orders", "consumer": "pod-1", **fields}


def ok(request: dict[str, Any], **fields: object) -> dict[str, Any]:
    return {"ok": True, **fields, "id": request["id"]}


def daemon_script(request: dict[str, Any]) -> list[dict[str, Any]]:
    """A daemon that assigns 3 and 5 on join, revokes 3 before answering the first commit,
    and hangs up after `assignment`."""
    op = request["op"]
    if op == "join":
        return [
            ok(request, group="orders", consumer="pod-1"),
            event("assigned", shard=3, checkpoint="MTA="),
            event("assigned", shard=5, checkpoint="MjA="),
        ]
    if op == "commit":
        assert "consumer" not in request  # the joined connection names the member
        revoked = event("revoked", shard=3, reason="rebalance", deadline=10.0)
        return [revoked, {"event": "future-kind", "x": 1}, ok(request)]
    if op == "release":
        return [ok(request, checkpoint="MTE=")]
    if op == "assignment":
        return [ok(request, consumer="pod-1", shards=[{"shard": 5, "state": "held"}]), {}]
    return [ok(request)]


@asynccontextmanager
async def scripted(path: Path, script: Script) -> AsyncIterator[list[dict[str, Any]]]:
    """A Unix socket server answering each request line with `script`'s lines; an empty
    object in them closes the connection. Yields the requests it saw."""
    seen: list[dict[str, Any]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                request = json.loads(line)
                seen.append(request)
                for answer in script(request):
                    if not answer:
                        writer.close()
                        return
                    writer.write(json.dumps(answer).encode() + b"\n")
                await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(serve, path=str(path))
    try:
        yield seen
    finally:
        server.close()
        await server.wait_closed()


def kinds(events: list[MemberEvent]) -> list[str]:
    return [e.kind for e in events]


async def test_sync_member_events_between_answers(sock_dir: Path) -> None:
    path = sock_dir / "s"

    def consumer() -> list[MemberEvent]:
        with CpmgrClient(str(path)) as client, client.join("orders", "pod-1") as member:
            first = member.next_event(timeout=5)
            assert first == Assigned(
                group="orders", consumer="pod-1", shard=3, checkpoint="MTA=", raw={}
            )
            member.commit(3, "MTE=")
            # The revoke arrived before the commit's answer: it waits for next_event.
            assert member.shards == {3: "releasing", 5: "held"}
            assert member.release(3) == "MTE="
            assert member.shards == {5: "held"}
            assert member.assignment() == {5: "held"}
            rest = list(member)  # the daemon hangs up after `assignment`
            assert member.ended
            with pytest.raises(CpmgrUnavailable, match=r"membership .* is over"):
                member.commit(5, "MjE=")
            return [first, *rest]

    async with scripted(path, daemon_script) as seen:
        events = await asyncio.to_thread(consumer)
    assert kinds(events) == ["assigned", "assigned", "revoked", "future-kind", "lost"]
    assert isinstance(events[3], OtherEvent)
    assert events[3].raw == {"event": "future-kind", "x": 1}
    lost = events[4]
    assert isinstance(lost, Lost)
    assert (lost.shards, lost.reason) == ((5,), "disconnected")
    assert [r["op"] for r in seen] == ["join", "commit", "release", "assignment"]
    assert seen[1] == {"op": "commit", "group": "orders", "shard": 3, "checkpoint": "MTE=", "id": 2}


async def test_async_member_events_between_answers(sock_dir: Path) -> None:
    path = sock_dir / "s"
    async with (
        scripted(path, daemon_script) as seen,
        AsyncCpmgrClient(str(path)) as client,
        client.join("orders", "pod-1") as member,
    ):
        events: list[MemberEvent] = []
        async for e in member:
            events.append(e)
            if isinstance(e, Assigned) and e.shard == 3:
                await member.commit(3, "MTE=")
            elif isinstance(e, Revoked):
                assert member.shards == {3: "releasing", 5: "held"}
                assert await member.release(e.shard) == "MTE="
                assert await member.assignment() == {5: "held"}
        assert member.ended
        assert await member.next_event(timeout=0) is None
    assert kinds(events) == ["assigned", "assigned", "revoked", "future-kind", "lost"]
    assert events[-1] == Lost(
        group="orders", consumer="pod-1", shards=(5,), reason="disconnected", raw={}
    )
    assert [r["op"] for r in seen] == ["join", "commit", "release", "assignment"]


async def test_leave_ends_the_iteration_without_a_lost_event(sock_dir: Path) -> None:
    path = sock_dir / "s"

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["op"] == "leave":
            return [ok(request, released=2)]
        return daemon_script(request)

    async with scripted(path, script), AsyncCpmgrClient(str(path)) as client:
        member = await client.join("orders", "pod-1")
        assert await member.next_event(timeout=5) is not None
        assert await member.next_event(timeout=5) is not None
        assert await member.leave() == 2
        assert [e async for e in member] == []
        assert member.shards == {}
        await member.close()

        def sync_leave() -> list[MemberEvent]:
            with CpmgrClient(str(path)) as sync_client:
                joined = sync_client.join("orders", "pod-1")
                assert joined.leave() == 2
                events = list(joined)
                joined.close()
                return events

        assert kinds(await asyncio.to_thread(sync_leave)) == ["assigned", "assigned"]


async def test_a_refused_join_raises_and_closes_its_connection(sock_dir: Path) -> None:
    path = sock_dir / "s"

    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        error = {"code": "NotMembershipGroup", "message": "orders has no membership block"}
        return [{"ok": False, "error": error, "id": request["id"]}]

    async with scripted(path, script), AsyncCpmgrClient(str(path)) as client:
        with pytest.raises(CpmgrProtocolError) as info:
            await client.join("orders", "pod-1")
        assert info.value.code == "NotMembershipGroup"

        def sync_join() -> None:
            with CpmgrClient(str(path)) as sync_client:
                sync_client.join("orders", "pod-1")

        with pytest.raises(CpmgrProtocolError, match="NotMembershipGroup"):
            await asyncio.to_thread(sync_join)


async def test_next_event_times_out_with_none(sock_dir: Path) -> None:
    path = sock_dir / "s"
    async with scripted(path, lambda r: [ok(r)]), AsyncCpmgrClient(str(path)) as client:
        async with client.join("orders", "pod-1") as member:
            assert await member.next_event(timeout=0.01) is None
            assert await member.next_event(timeout=0) is None

        def sync_wait() -> object:
            with CpmgrClient(str(path)) as sync_client, sync_client.join("orders", "p") as m:
                return m.next_event(timeout=0.01), m.next_event(timeout=0)

        assert await asyncio.to_thread(sync_wait) == (None, None)
