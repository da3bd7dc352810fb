"""The complete consumer loops the docs show, run as written against a real daemon and the
emulator: the Python and shell ones from docs/protocol.md ("Membership from a client") and the
Node one from clients/node/README.md, which docs/protocol.md points to. Each is taken from the
Markdown by this test, so the docs cannot rot.

Every loop goes through the same story: it joins and starts each shard at its checkpoint (the
seeded one, or the begin cursor), commits as it reads, releases what a new member's join revokes
at its last read, stops reading at `lost` (SLS unreachable past the timeout), reads again once
its shards come back, and ends with every last read committed at SLS."""

from __future__ import annotations

import asyncio
import base64
import os
import re
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from lifecycle_helpers import LOGSTORE, PROJECT, REPO, cursor, remote_key
from membership_helpers import (
    CONSUMER_GROUP,
    WAIT,
    Consumer,
    RunningDaemon,
    consumer,
    emulator,
    member_config,
    running_daemon,
    until,
)

from cpmgr.emulator import EmulatorHandle

SHARDS = 4
SEEDED = cursor(4_000_000_000_000_000_000)  # shard 0's checkpoint before anyone joins
READ_PAUSE = 0.02  # each synthetic batch "takes" this long: no busy loop on a shared machine
QUIET = 0.5  # no read for this long: the loop has stopped reading

# (time.time() of the read, shard, cursor read from, cursor after the batch)
Read = tuple[float, int, str, str]


def code_block(markdown: Path, language: str, marker: str) -> str:
    """The one ```language block of `markdown` that contains `marker`."""
    blocks = re.findall(rf"^```{language}\n(.*?)^```$", markdown.read_text(), re.M | re.S)
    found = [block for block in blocks if marker in block]
    assert len(found) == 1, f"{markdown}: {len(found)} {language} blocks with {marker!r}"
    return found[0]


def next_cursor(checkpoint: str) -> str:
    return cursor(int(base64.b64decode(checkpoint)) + 1)


def latest(emu: EmulatorHandle, shard: int) -> str | None:
    history = emu.state.history[remote_key(CONSUMER_GROUP, shard)]
    return history[-1] if history else None


def last_reads(reads: list[Read]) -> dict[int, Read]:
    return {read[1]: read for read in reads}


async def drain_assigned(peer: Consumer, count: int) -> dict[int, str]:
    shards: dict[int, str] = {}
    while len(shards) < count:
        event = await peer.event("assigned")
        shards[event["shard"]] = event["checkpoint"]
    return shards


async def story(
    emu: EmulatorHandle, daemon: RunningDaemon, reads: Callable[[], list[Read]]
) -> None:
    """The loop under test is running as a member of `orders` on `daemon`; `reads()` is what
    its reader was asked to read so far."""
    # Joined; each shard read from its checkpoint: the seeded one, else the begin cursor.
    await until(lambda: len(last_reads(reads())) == SHARDS, "the loop reads every shard")
    first: dict[int, str] = {}
    for _, shard, start, _ in reads():
        first.setdefault(shard, start)
    begin = {s: emu.state.get_cursor(PROJECT, LOGSTORE, s, "begin") for s in range(1, SHARDS)}
    assert first == {0: SEEDED, **begin}
    # It commits as it reads: every shard's checkpoint at SLS moves past its start.
    await until(
        lambda: all(latest(emu, s) not in (None, SEEDED) for s in range(SHARDS)),
        "the loop's commits reach SLS",
    )
    async with consumer(daemon.socket_path) as peer:
        # A second member joins: the loop releases the revoked shards at its last read.
        answer = await peer.ask({"op": "join", "group": "orders", "consumer": "peer"})
        assert answer["ok"], answer
        taken = await drain_assigned(peer, SHARDS // 2)
        handed_at = time.time()
        for shard, checkpoint in taken.items():
            when, _, _, after = last_reads(r for r in reads() if r[1] == shard)[shard]
            assert checkpoint == after, f"shard {shard} handed over behind the loop's last read"
            assert when < handed_at, f"shard {shard} read after it was handed over"
        # SLS unreachable past the timeout: `lost` for every shard, and the loop stops at once.
        emu.faults.update({"reset_rate": 1.0})
        await peer.event("lost")
        await until(lambda: time.time() - reads()[-1][0] > QUIET, "the loop stops at lost")
        emu.faults.update({"reset_rate": 0.0})
        back = time.time()
        await until(lambda: reads()[-1][0] > back, "the loop reads again once SLS is back")
    # The peer is gone (its shards are released): the loop gets and reads every shard again.
    gone = time.time()
    await until(
        lambda: len(last_reads(r for r in reads() if r[0] > gone)) == SHARDS,
        "the loop takes the peer's shards over",
    )


def assert_last_reads_committed(emu: EmulatorHandle, reads: list[Read]) -> None:
    """The loop ended (released or left): each shard's last read is its checkpoint at SLS."""
    ends = {shard: after for shard, (_, _, _, after) in last_reads(reads).items()}
    assert {s: latest(emu, s) for s in range(SHARDS)} == ends


async def finished(task: Awaitable[object], what: str) -> None:
    try:
        await asyncio.wait_for(task, WAIT)
    except TimeoutError:
        pytest.fail(f"{what} did not end within {WAIT}s")


@pytest.fixture
async def cluster(sock_dir: Path) -> AsyncIterator[tuple[EmulatorHandle, RunningDaemon]]:
    async with emulator(SHARDS) as emu:
        emu.state.update_checkpoint(
            PROJECT,
            LOGSTORE,
            CONSUMER_GROUP,
            shard=0,
            checkpoint=SEEDED,
            consumer="",
            force_success=True,
        )
        # A generous release deadline: a loop that releases in time has every last read
        # committed, even on a loaded machine (past the deadline later commits are refused).
        data = member_config(
            sock_dir / "cpmgr.sock",
            emu.url,
            membership={"release_timeout": "5s"},
            interval="100ms",
            shutdown_timeout="20s",
        )
        async with running_daemon(data) as daemon:
            yield emu, daemon


async def test_the_python_consumer_loop_of_the_docs(
    cluster: tuple[EmulatorHandle, RunningDaemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    emu, daemon = cluster
    code = code_block(REPO / "docs" / "protocol.md", "python", "def consume(")
    namespace: dict[str, object] = {}
    exec(compile(code, "docs/protocol.md", "exec"), namespace)
    consume = namespace["consume"]
    assert callable(consume)
    reads: list[Read] = []

    def read_batch(shard: int, checkpoint: str) -> str | None:
        time.sleep(READ_PAUSE)
        after = next_cursor(checkpoint)
        reads.append((time.time(), shard, checkpoint, after))
        return after

    monkeypatch.setenv("CPMGR_SOCKET", daemon.socket_path)
    loop = asyncio.create_task(asyncio.to_thread(consume, "orders", read_batch))
    await story(emu, daemon, lambda: list(reads))
    # The daemon stops: it revokes every shard (shutdown), the loop releases them; then the
    # connection drops and consume() returns.
    assert await daemon.shut_down() == 0
    await finished(loop, "consume()")
    assert_last_reads_committed(emu, reads)


def reads_from(log: Path) -> list[Read]:
    if not log.exists():
        return []
    reads = []
    for line in log.read_text().splitlines():
        when, shard, start, after = line.split()
        reads.append((float(when), int(shard), start, after))
    return reads


SHELL_READER = """#!/usr/bin/env bash
# READER SHARD CURSOR: "reads" one batch and prints the cursor after it; logs each read.
sleep {pause}
next=$(printf '%s' "$(( $(printf '%s' "$2" | base64 -d) + 1 ))" | base64)
printf '%s %s %s %s\\n' "$(date +%s.%N)" "$1" "$2" "$next" >> "{log}"
printf '%s\\n' "$next"
"""


async def test_the_shell_consumer_loop_of_the_docs(
    cluster: tuple[EmulatorHandle, RunningDaemon], tmp_path: Path
) -> None:
    emu, daemon = cluster
    script = tmp_path / "consumer.sh"
    script.write_text(code_block(REPO / "docs" / "protocol.md", "bash", "cpmgr join"))
    log = tmp_path / "reads.log"
    reader = tmp_path / "reader.sh"
    reader.write_text(SHELL_READER.format(pause=READ_PAUSE, log=log))
    reader.chmod(0o755)
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "CPMGR_SOCKET": daemon.socket_path,
    }
    process = await asyncio.create_subprocess_exec(
        "bash", str(script), "orders", str(reader), env=env, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        await story(emu, daemon, lambda: reads_from(log))
        assert await daemon.shut_down() == 0
        await finished(process.wait(), "consumer.sh")
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert_last_reads_committed(emu, reads_from(log))


NODE_DRIVER = """
import { appendFileSync } from "node:fs";
import { setTimeout as sleep } from "node:timers/promises";
import { consume } from "./consume.mjs";

// The README's readShard contract: read from `cursor`, await onBatch(next) after each batch,
// return once `signal` aborts. Each batch is one step of the cursor, logged for the test.
async function readShard(shard, cursor, signal, onBatch) {
  while (!signal.aborted) {
    await sleep(PAUSE_MS);
    const next = Buffer.from(String(BigInt(Buffer.from(cursor, "base64").toString()) + 1n))
      .toString("base64");
    const when = Date.now() / 1000;
    await onBatch(next);
    appendFileSync(LOG, `${when} ${shard} ${cursor} ${next}\\n`);
    cursor = next;
  }
}

const stop = new AbortController();
process.on("SIGTERM", () => stop.abort());
await consume("orders", readShard, { stop: stop.signal });
"""


def node_binary() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: the Node client's tests need Node.js 20 or newer")
    return node


async def test_the_node_consumer_loop_of_the_node_readme(
    cluster: tuple[EmulatorHandle, RunningDaemon], tmp_path: Path
) -> None:
    emu, daemon = cluster
    readme = REPO / "clients" / "node" / "README.md"
    (tmp_path / "consume.mjs").write_text(code_block(readme, "js", "export async function consume"))
    log = tmp_path / "reads.log"
    driver = NODE_DRIVER.replace("PAUSE_MS", str(int(READ_PAUSE * 1000)))
    (tmp_path / "driver.mjs").write_text(driver.replace("LOG", repr(str(log))))
    # `import ... from "cpmgr-client"` resolves as after `npm install clients/node`.
    (tmp_path / "node_modules").mkdir()
    (tmp_path / "node_modules" / "cpmgr-client").symlink_to(REPO / "clients" / "node")
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "CPMGR_SOCKET": daemon.socket_path}
    process = await asyncio.create_subprocess_exec(
        node_binary(), "driver.mjs", cwd=tmp_path, env=env, stdin=asyncio.subprocess.DEVNULL
    )
    try:
        await story(emu, daemon, lambda: reads_from(log))
        # SIGTERM aborts `stop`: the loop halts its readers and leaves (every last read
        # committed, then the shards released), and returns.
        process.terminate()
        await finished(process.wait(), "the Node consumer")
        assert process.returncode == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert_last_reads_committed(emu, reads_from(log))
    assert await daemon.shut_down() == 0
