"""`cpmgr join` and `cpmgr members` as a shell runs them: a child process against a scripted
daemon (the contract's interleavings exactly), events and answers as JSON lines."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from lifecycle_helpers import REPO
from test_client_member import daemon_script, event, ok, scripted

TIMEOUT = 30.0  # a loaded machine takes seconds to start a Python child


async def spawn(*argv: str, stdin: Any = asyncio.subprocess.PIPE) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr",
        *argv,
        stdin=stdin,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )


async def read_json(process: asyncio.subprocess.Process) -> dict[str, Any]:
    assert process.stdout is not None
    line = await asyncio.wait_for(process.stdout.readline(), TIMEOUT)
    assert line.endswith(b"\n"), line
    parsed: dict[str, Any] = json.loads(line)
    return parsed


async def send(process: asyncio.subprocess.Process, line: str) -> None:
    assert process.stdin is not None
    process.stdin.write(line.encode() + b"\n")
    await process.stdin.drain()


async def finish(process: asyncio.subprocess.Process) -> tuple[int, list[dict[str, Any]], str]:
    out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert process.returncode is not None
    return process.returncode, lines, err.decode()


async def test_join_relays_events_and_answers_in_order(sock_dir: Path) -> None:
    path = str(sock_dir / "s")
    async with scripted(sock_dir / "s", daemon_script) as seen:
        process = await spawn("join", "orders", "pod-1", "--socket", path)
        assert await read_json(process) == {"ok": True, "group": "orders", "consumer": "pod-1"}
        assert await read_json(process) == event("assigned", shard=3, checkpoint="MTA=")
        assert await read_json(process) == event("assigned", shard=5, checkpoint="MjA=")
        await send(process, "commit 3 MTE= wait")
        assert (await read_json(process))["event"] == "revoked"
        assert await read_json(process) == {"event": "future-kind", "x": 1}
        assert await read_json(process) == {"ok": True}
        await send(process, "release 3")
        assert await read_json(process) == {"ok": True, "checkpoint": "MTE="}
        await send(process, "release three")
        refused = await read_json(process)
        assert refused["error"]["code"] == "BadRequest"
        assert "release SHARD" in refused["error"]["message"]
        await send(process, '{"op": "assignment", "id": "mine"}')  # the daemon hangs up after it
        code, lines, err = await finish(process)
    assert lines == [
        {"ok": True, "consumer": "pod-1", "shards": [{"shard": 5, "state": "held"}]},
        {**event("lost", shards=[5]), "reason": "disconnected"},
    ]
    assert (code, err) == (3, "")
    assert seen[1] == {
        "op": "commit",
        "group": "orders",
        "shard": 3,
        "checkpoint": "MTE=",
        "wait": True,
        "id": 2,
    }
    assert seen[3] == {"op": "assignment", "group": "orders", "id": 4}


async def test_end_of_stdin_leaves(sock_dir: Path, tmp_path: Path) -> None:
    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        if request["op"] == "leave":
            return [ok(request, released=1)]
        return daemon_script(request)

    commands = tmp_path / "commands"
    commands.write_text("commit 5 MjE= force\nrelease 3\n")  # a regular file as stdin
    async with scripted(sock_dir / "s", script) as seen:
        with commands.open("rb") as stdin:
            process = await spawn(
                "join", "orders", "pod-1", "--socket", str(sock_dir / "s"), stdin=stdin
            )
            code, lines, err = await finish(process)
    assert code == 0, err
    assert [line.get("event", line.get("ok")) for line in lines] == [
        True,  # joined
        "assigned",
        "assigned",
        "revoked",
        "future-kind",
        True,  # commit
        True,  # release
        True,  # the leave at the end of stdin
    ]
    assert lines[-1] == {"ok": True, "released": 1}
    assert [r["op"] for r in seen] == ["join", "commit", "release", "leave"]


async def test_join_refused_and_unreachable(sock_dir: Path) -> None:
    def script(request: dict[str, Any]) -> list[dict[str, Any]]:
        error = {"code": "ConsumerInUse", "message": "pod-1 is joined on another connection"}
        return [{"ok": False, "error": error, "id": request["id"]}]

    async with scripted(sock_dir / "s", script):
        process = await spawn("join", "orders", "pod-1", "--socket", str(sock_dir / "s"))
        code, lines, err = await finish(process)
    assert code == 1
    assert lines[0]["error"]["code"] == "ConsumerInUse"
    assert err.startswith("cpmgr: ConsumerInUse: ")
    process = await spawn("join", "orders", "pod-1", "--socket", str(sock_dir / "nothing"))
    code, lines, err = await finish(process)
    assert (code, lines) == (3, [])
    assert "could not be reached" in err


async def test_members_table(sock_dir: Path) -> None:
    members = [
        {
            "group": "orders",
            "consumer": "pod-1",
            "shards": [
                {"shard": 3, "state": "held"},
                {"shard": 5, "state": "held"},
                {"shard": 7, "state": "releasing"},
            ],
            "last_heartbeat": 1764130000.25,
        },
        {"group": "orders", "consumer": "pod-2", "shards": [], "last_heartbeat": None},
    ]
    async with scripted(sock_dir / "s", lambda r: [ok(r, members=members)]) as seen:
        process = await spawn("members", "orders", "--socket", str(sock_dir / "s"))
        out, err = await asyncio.wait_for(process.communicate(), TIMEOUT)
    assert process.returncode == 0, err
    assert out.decode().splitlines() == [
        "GROUP   CONSUMER  HELD  RELEASING  LAST_HEARTBEAT",
        "orders  pod-1     3,5   7          2025-11-26T04:06:40.250Z",
        "orders  pod-2     -     -          -",
    ]
    assert seen == [{"op": "members", "group": "orders", "id": 1}]
