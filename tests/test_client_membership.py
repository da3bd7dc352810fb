"""The client's members, `cpmgr join` and the consumer loops of docs/protocol.md against a real
`cpmgr run` daemon with a membership group and the emulator (no scripted daemon here)."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from lifecycle_helpers import (
    LOGSTORE,
    PROJECT,
    REPO,
    DaemonProcess,
    daemon_config,
    eventually,
    group,
    running_daemon,
    write_yaml,
)

from cpmgr.client import (
    Assigned,
    AsyncCpmgrClient,
    AsyncMember,
    CpmgrClient,
    Lost,
    MemberEvent,
    Revoked,
)
from cpmgr.emulator import EmulatorHandle, GroupSpec, running_emulator

CONSUMER_GROUP = "client-members"
SHARDS = 4
WAIT = 15.0  # the longest one step may take on a loaded machine before the test fails
EXIT_TIMEOUT = 20.0


def cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


def number(checkpoint: str) -> int:
    return int(base64.b64decode(checkpoint))


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:{SHARDS}"],
        consumer_groups=[GroupSpec(PROJECT, LOGSTORE, CONSUMER_GROUP, 2)],
    ) as handle:
        yield handle


@pytest.fixture
async def daemon(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> AsyncIterator[DaemonProcess]:
    data = daemon_config(
        socket_path=sock_dir / "cpmgr.sock",
        endpoint=emulator.url,
        credentials={"access_key_id": "id", "access_key_secret": "secret"},
        groups=[
            group(
                "orders",
                CONSUMER_GROUP,
                membership={
                    "heartbeat_interval": "200ms",
                    "timeout": "2s",
                    "release_timeout": "2s",
                },
            )
        ],
    )
    data["commit"]["request_timeout"] = "300ms"  # heartbeat_interval + it < timeout / 2
    async with running_daemon(write_yaml(tmp_path / "cpmgr.yaml", data)) as process:
        yield process


@pytest.fixture
def socket_path(sock_dir: Path, daemon: DaemonProcess) -> str:
    return str(sock_dir / "cpmgr.sock")


def at_sls(emulator: EmulatorHandle) -> dict[int, str]:
    checkpoints: dict[str, str] = emulator.state.snapshot()["checkpoints"]
    prefix = f"{PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}/"
    return {int(k[len(prefix) :]): v for k, v in checkpoints.items() if k.startswith(prefix)}


async def events_until(
    member: AsyncMember, done: Callable[[list[MemberEvent]], bool]
) -> list[MemberEvent]:
    seen: list[MemberEvent] = []
    while not done(seen):
        event = await member.next_event(timeout=WAIT)
        assert event is not None, f"no event in {WAIT}s after {seen}"
        seen.append(event)
    return seen


def assigned(events: list[MemberEvent]) -> dict[int, str]:
    return {e.shard: e.checkpoint for e in events if isinstance(e, Assigned)}


async def test_a_revoked_shard_reaches_its_new_owner_with_the_final_checkpoint(
    socket_path: str, emulator: EmulatorHandle
) -> None:
    async with AsyncCpmgrClient(socket_path) as client, client.join("orders", "pod-a") as a:
        first = assigned(await events_until(a, lambda seen: len(assigned(seen)) == SHARDS))
        assert sorted(first) == list(range(SHARDS))
        for shard, start in first.items():
            await a.commit(shard, cursor(number(start) + 10))
        async with client.join("orders", "pod-b") as b:
            revoked = [
                e
                for e in await events_until(a, lambda seen: len(seen) == SHARDS // 2)
                if isinstance(e, Revoked)
            ]
            assert len(revoked) == SHARDS // 2 and {e.reason for e in revoked} == {"rebalance"}
            final = {}
            for event in revoked:
                final[event.shard] = cursor(number(first[event.shard]) + 11)
                await a.commit(event.shard, final[event.shard])
                assert await a.release(event.shard) == final[event.shard]
            taken = assigned(await events_until(b, lambda seen: len(seen) == SHARDS // 2))
            assert taken == final  # each arrives with the checkpoint a handed over
            assert {s: at_sls(emulator)[s] for s in final} == final
            assert sorted(a.shards) == sorted(set(first) - set(final))
            assert await a.assignment() == dict.fromkeys(a.shards, "held")
            members = {m["consumer"]: m for m in await client.members("orders")}
            assert sorted(members) == ["pod-a", "pod-b"]
            held_by_b = [s["shard"] for s in members["pod-b"]["shards"]]
            assert sorted(held_by_b) == sorted(final)
            kept = sorted(a.shards)
            assert await a.leave() == len(kept)
            assert [e async for e in a] == []  # the iteration ends with the membership
            rest = assigned(await events_until(b, lambda seen: len(seen) == len(kept)))
            assert rest == {s: cursor(number(first[s]) + 10) for s in kept}


async def test_a_stopping_daemon_revokes_then_the_member_sees_its_connection_drop(
    socket_path: str, daemon: DaemonProcess
) -> None:
    def consumer() -> list[MemberEvent]:
        events: list[MemberEvent] = []
        with CpmgrClient(socket_path) as client, client.join("orders", "pod-s") as member:
            for event in member:
                events.append(event)
                if len(assigned(events)) == SHARDS and len(events) == SHARDS:
                    os.kill(daemon.process.pid, signal.SIGTERM)
                if isinstance(event, Revoked):
                    member.release(event.shard)
        return events

    events = await asyncio.wait_for(asyncio.to_thread(consumer), EXIT_TIMEOUT)
    assert [e.kind for e in events] == ["assigned"] * SHARDS + ["revoked"] * SHARDS + ["lost"]
    assert {e.reason for e in events if isinstance(e, Revoked)} == {"shutdown"}
    assert events[-1] == Lost(
        group="orders", consumer="pod-s", shards=(), reason="disconnected", raw={}
    )
    assert await daemon.exit_code(timeout=EXIT_TIMEOUT) == 0


# --- the consumer loops of docs/protocol.md, run as written -----------------------------------


def doc_example(language: str, marker: str) -> str:
    text = (REPO / "docs" / "protocol.md").read_text(encoding="utf-8")
    blocks = [b for b in re.findall(rf"```{language}\n(.*?)```", text, re.S) if marker in b]
    assert len(blocks) == 1, f"one {language} block with {marker!r} in docs/protocol.md"
    return blocks[0]


class Reader:
    """read_batch for the examples: each shard advances 5 steps from where it was assigned."""

    STEPS = 5

    def __init__(self) -> None:
        self.ends: dict[int, int] = {}
        self.finished: set[int] = set()  # read to the end, every step committed before

    def __call__(self, shard: int, checkpoint: str) -> str | None:
        at = number(checkpoint)
        end = self.ends.setdefault(shard, at + self.STEPS)
        if at < end:
            return cursor(at + 1)
        self.finished.add(shard)
        return None


async def test_the_python_consumer_loop(
    socket_path: str,
    daemon: DaemonProcess,
    emulator: EmulatorHandle,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    namespace: dict[str, Any] = {}
    exec(doc_example("python", "def consume("), namespace)
    monkeypatch.setenv("CPMGR_SOCKET", socket_path)
    reader = Reader()
    consuming = asyncio.create_task(asyncio.to_thread(namespace["consume"], "orders", reader))

    await eventually(
        lambda: len(reader.finished) == SHARDS,
        what="every shard read to its end",
        daemon=daemon,
        timeout=WAIT,
    )
    daemon.send(signal.SIGTERM)  # revokes every shard, then ends the connection
    await asyncio.wait_for(consuming, EXIT_TIMEOUT)  # consume() returns with the membership
    assert await daemon.exit_code(timeout=EXIT_TIMEOUT) == 0
    assert at_sls(emulator) == {s: cursor(end) for s, end in reader.ends.items()}


def reader_ends(directory: Path) -> dict[int, str]:
    """Where the shell example's reader stopped each shard (its `reader.sh.SHARD` files)."""
    files = [p for p in directory.glob("reader.sh.*") if p.suffix != ".done"]
    return {int(p.suffix[1:]): cursor(int(p.read_text())) for p in files}


async def test_the_shell_consumer_loop(
    socket_path: str, daemon: DaemonProcess, emulator: EmulatorHandle, tmp_path: Path
) -> None:
    script = tmp_path / "consumer.sh"
    script.write_text(doc_example("bash", "cpmgr join"), encoding="utf-8")
    reader = tmp_path / "reader.sh"
    # One batch: the next cursor, until 5 steps past where the shard started.
    reader.write_text(
        "#!/usr/bin/env bash\n"
        'n=$(printf %s "$2" | base64 -d); end="$0.$1"\n'
        '[[ -f $end ]] || echo $((n + 5)) > "$end"\n'
        '(( n < $(cat "$end") )) && { printf %s $((n + 1)) | base64; exit 0; }\n'
        'touch "$end.done"\n',  # read to the end, every step committed before
        encoding="utf-8",
    )
    reader.chmod(0o755)
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '/usr/bin:/bin')}",
        "CPMGR_SOCKET": socket_path,
        "PYTHONPATH": str(REPO),
    }
    process = await asyncio.create_subprocess_exec(
        "bash", str(script), "orders", str(reader), env=env, stderr=asyncio.subprocess.PIPE
    )

    try:
        await eventually(
            lambda: len(list(tmp_path.glob("reader.sh.*.done"))) == SHARDS,
            what="every shard read to its end",
            daemon=daemon,
            timeout=WAIT,
        )
        daemon.send(signal.SIGTERM)  # revokes every shard, then ends the connection
        _, err = await asyncio.wait_for(process.communicate(), EXIT_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, err.decode()
    assert await daemon.exit_code(timeout=EXIT_TIMEOUT) == 0
    ends = reader_ends(tmp_path)
    assert len(ends) == SHARDS
    assert at_sls(emulator) == ends
