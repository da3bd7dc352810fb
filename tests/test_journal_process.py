"""The journal across processes: a live holder's lock, SIGKILL, a kernel file size limit."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import textwrap
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from cpmgr.journal import LOCK_NAME, Journal, JournalLocked, ShardRecord

REPO = Path(__file__).resolve().parents[1]

# Opens a journal, does its part, prints one JSON line, then waits for stdin to close.
CHILD = textwrap.dedent(
    """
    import asyncio, json, resource, signal, sys
    from cpmgr.journal import Journal, JournalError

    async def main(directory, mode, task, count):
        journal = Journal(directory, fsync=mode, compact_bytes=1 << 30)
        journal.open()
        await journal.start()
        accepted, refused = [], 0
        if task == "fill":
            # The kernel refuses to grow any file past this size: a full disk for the log.
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            limit = journal.size_bytes + 2000
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        for shard in range(count):
            try:
                await journal.record_accepted([("g", shard, f"cp{shard}", "c")])
                accepted.append(shard)
            except JournalError:
                refused += 1
        if task == "fill":
            journal.record_committed("g", 0, "cp0")  # refused quietly as well
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY,) * 2)
            await journal.record_accepted([("g", 1000, "after", None)])
            accepted.append(1000)
        print(json.dumps({"accepted": accepted, "refused": refused}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
        await journal.close()

    asyncio.run(main(sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])))
    """
)


@asynccontextmanager
async def child(
    directory: Path, *, mode: str = "never", task: str = "hold", count: int = 0
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, object]]]:
    """A process holding the journal after doing `task`; killed on exit if still alive."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CHILD,
        str(directory),
        mode,
        task,
        str(count),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        assert line, "the child died before it was ready"
        yield proc, json.loads(line)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def replay(directory: Path) -> dict[tuple[str, int], ShardRecord]:
    journal = Journal(directory)
    try:
        return {(r.group, r.shard): r for r in journal.open()}
    finally:
        await journal.close()


async def test_a_live_holder_blocks_us_and_its_lock_is_taken_over_after_sigkill(
    tmp_path: Path,
) -> None:
    async with child(tmp_path) as (proc, _):
        with pytest.raises(JournalLocked) as refused:
            Journal(tmp_path).open()
        assert f"pid {proc.pid}" in str(refused.value)
        assert str(tmp_path) in str(refused.value)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL

    # The kernel dropped the dead holder's flock; its pid is still in the file, that is all.
    journal = Journal(tmp_path)
    journal.open()
    assert (tmp_path / LOCK_NAME).read_text().strip() == str(os.getpid())
    await journal.close()


@pytest.mark.parametrize("mode", ["always", "batch", "never"])
async def test_an_acknowledged_commit_survives_sigkill(tmp_path: Path, mode: str) -> None:
    async with child(tmp_path, mode=mode, task="record", count=50) as (proc, report):
        assert report["accepted"] == list(range(50))
        proc.send_signal(signal.SIGKILL)  # no close(), no final fsync
        await proc.wait()
    restored = await replay(tmp_path)
    assert restored == {
        ("g", shard): ShardRecord("g", shard, f"cp{shard}", "c", None) for shard in range(50)
    }


async def test_a_full_disk_refuses_commits_without_corrupting_the_journal(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with child(tmp_path, mode="always", task="fill", count=60) as (proc, report):
        assert proc.stdin is not None
        proc.stdin.close()  # let it close its journal and exit
        assert await proc.wait() == 0
    accepted = report["accepted"]
    assert isinstance(accepted, list)
    assert 10 < len(accepted) < 60  # some fit, the rest were refused
    assert report["refused"] == 61 - len(accepted)

    with caplog.at_level(logging.WARNING):
        restored = await replay(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert sorted(shard for _, shard in restored) == accepted
