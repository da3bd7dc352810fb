"""The socket with a journal: group commit, durability before the answer, concurrent order."""

from __future__ import annotations

import asyncio
import errno
import json
import shutil
import tempfile
import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from test_ingest import commit, connect, cp, make_config, running

from cpmgr.config import Config
from cpmgr.journal import Journal
from cpmgr.metrics import Metrics
from cpmgr.store import CheckpointStore


@pytest.fixture
def config() -> Iterator[Config]:
    path = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
    yield make_config(path / "cpmgr.sock")
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def state_dir(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path / "state"  # created by Journal.open()


class GatedFsync:
    """An fsync that blocks (in its worker thread) until released, and counts calls."""

    def __init__(self) -> None:
        self.calls = 0
        self.entered = threading.Event()  # an fsync is waiting at the gate
        self.gate = threading.Event()
        self.gate.set()  # open() and start() fsync too; tests close the gate afterwards
        self.fail = False

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if not self.gate.is_set():
            self.entered.set()
        self.gate.wait(timeout=10)
        if self.fail:
            raise OSError(errno.ENOSPC, "No space left on device")


@asynccontextmanager
async def started_journal(
    state_dir: Path, fsync: GatedFsync | None = None
) -> AsyncIterator[Journal]:
    """A journal with fsync: always, opened and started; with `fsync`, its gate is closed
    once start-up is done, so the tests decide when fsyncs finish."""
    journal = Journal(state_dir, fsync="always", **({"fsync_fn": fsync} if fsync else {}))
    journal.open()
    await journal.start()
    if fsync is not None:
        fsync.gate.clear()
        fsync.calls = 0
    try:
        yield journal
    finally:
        if fsync is not None:
            fsync.gate.set()
        await journal.close()


def journaled(state_dir: Path, shard: int) -> str:
    """The latest value the journal in `state_dir` would restore for orders/`shard`."""
    records = {(r.group, r.shard): r for r in Journal(state_dir).open()}
    return records["orders", shard].latest


async def test_commits_share_fsyncs_and_answer_after_them(config: Config, state_dir: Path) -> None:
    fsync = GatedFsync()
    async with (
        started_journal(state_dir, fsync) as journal,
        running(config, journal=journal) as server,
        connect(server.path) as peer,
    ):
        lines = b"".join(
            json.dumps(commit(shard=s, number=100 + s, id=s)).encode() + b"\n" for s in range(200)
        )
        await peer.send(lines)
        first = asyncio.ensure_future(peer.answer())
        await asyncio.to_thread(fsync.entered.wait, 10)  # the burst is written
        await asyncio.sleep(0.05)  # a wrong early answer would arrive now
        assert not first.done(), "answered before the fsync covering it"
        fsync.gate.set()
        answers = [await first] + [await peer.answer() for _ in range(199)]
    assert [a["id"] for a in answers] == list(range(200))
    assert all(a["ok"] for a in answers)
    assert fsync.calls < 20, f"{fsync.calls} fsyncs for 200 commits: no group commit"


async def test_older_value_racing_a_newer_one_is_refused_not_journaled(
    config: Config, state_dir: Path
) -> None:
    fsync = GatedFsync()
    store = CheckpointStore(g.name for g in config.groups)
    async with (
        started_journal(state_dir, fsync) as journal,
        running(config, store, journal=journal) as server,
        connect(server.path) as newer,
        connect(server.path) as older,
    ):
        await newer.send(json.dumps(commit(shard=1, number=200)).encode() + b"\n")
        pending = asyncio.ensure_future(newer.answer())
        await asyncio.to_thread(fsync.entered.wait, 10)  # written, its fsync held
        answer = await older.ask(commit(shard=1, number=150))
        assert answer["error"]["code"] == "CheckpointRegression"
        fsync.gate.set()
        assert (await pending)["ok"]
    assert journaled(state_dir, 1) == cp(200)


async def test_journal_failure_answers_journal_error_and_accepts_nothing(
    config: Config, state_dir: Path
) -> None:
    fsync = GatedFsync()
    registry = CollectorRegistry()
    metrics = Metrics(registry, process_metrics=False)
    store = CheckpointStore(g.name for g in config.groups)
    async with (
        started_journal(state_dir, fsync) as journal,
        running(config, store, journal=journal, metrics=metrics) as server,
        connect(server.path) as peer,
    ):
        fsync.gate.set()
        fsync.fail = True
        answer = await peer.ask(commit(shard=2, number=7))
        assert answer["error"]["code"] == "JournalError"
        assert store.pending_count("orders") == 0
        fsync.fail = False
        assert (await peer.ask(commit(shard=2, number=8)))["ok"]  # keeps serving
    assert registry.get_sample_value("cpmgr_journal_errors_total") == 1.0


async def test_get_after_pipelined_commits_sees_them(config: Config, state_dir: Path) -> None:
    async with (
        started_journal(state_dir) as journal,
        running(config, journal=journal) as server,
        connect(server.path) as peer,
    ):
        lines = [commit(shard=4, number=n, id=n) for n in (5, 6, 7)]
        lines.append({"op": "get", "group": "orders", "shard": 4, "id": "get"})
        await peer.send(b"".join(json.dumps(line).encode() + b"\n" for line in lines))
        answers = [await peer.answer() for _ in lines]
    assert [a["id"] for a in answers] == [5, 6, 7, "get"]
    assert answers[-1]["shards"][0]["pending"] == cp(7)


async def test_a_peer_that_half_closes_gets_every_answer_and_journal_matches_store(
    config: Config, state_dir: Path
) -> None:
    store = CheckpointStore(g.name for g in config.groups)
    async with (
        started_journal(state_dir) as journal,
        running(config, store, journal=journal) as server,
        connect(server.path) as peer,
    ):
        assert (await peer.ask(commit(shard=0, number=10, id=1)))["ok"]
        await peer.send(json.dumps(commit(shard=0, number=3, force=True, id=2)).encode())
        peer.writer.write_eof()  # the last line has no newline, then EOF: like `echo | socat`
        answer = await peer.answer()
        assert answer == {"ok": True, "id": 2}
    view = store.shard_view("orders", 0)
    assert view is not None and view.pending == cp(3)
    assert journaled(state_dir, 0) == cp(3)


async def test_a_commit_cut_off_by_close_during_its_fsync_still_reaches_the_store(
    config: Config, state_dir: Path
) -> None:
    fsync = GatedFsync()
    store = CheckpointStore(g.name for g in config.groups)
    async with (
        started_journal(state_dir, fsync) as journal,
        running(config, store, journal=journal) as server,
        connect(server.path) as peer,
    ):
        await peer.send(json.dumps(commit(shard=5, number=9, id=1)).encode() + b"\n")
        answer = asyncio.ensure_future(peer.answer())
        await asyncio.to_thread(fsync.entered.wait, 10)  # written, its fsync held
        await server.close(grace=0)  # cuts the commit off while it waits for the fsync
        assert (await answer)["error"]["code"] == "ShuttingDown"
    view = store.shard_view("orders", 5)
    assert view is not None and view.pending == cp(9)  # store and journal agree
    assert journaled(state_dir, 5) == cp(9)
