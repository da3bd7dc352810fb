"""Journaled commits that arrive together are journaled together, and still answered one by
one, in order, each with its own outcome."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from test_ingest import commit, connect, cp, make_config, run_outcome, running

from cpmgr.config import Config
from cpmgr.errors import CpmgrError
from cpmgr.store import CheckpointStore

Entry = tuple[str, int, str, str | None]


@dataclass
class CountingJournal:
    calls: list[list[Entry]] = field(default_factory=list)
    fail: bool = False

    async def record_accepted(self, entries: Sequence[Entry]) -> None:
        if self.fail:
            raise CpmgrError("disk full")
        self.calls.append(list(entries))

    def accept_run(self, group: str, *columns: Any) -> asyncio.Future[CpmgrError | None]:
        return run_outcome(self.record_accepted, group, *columns)

    def entries(self) -> list[Entry]:
        """Every entry journaled, in order."""
        return [entry for call in self.calls for entry in call]


def last_values(entries: Sequence[Entry]) -> dict[int, str]:
    """Each shard's last journaled checkpoint."""
    return {shard: value for _group, shard, value, _consumer in entries}


@dataclass
class GatedJournal:
    """Holds every write until `release` is set."""

    writing: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)

    async def record_accepted(self, entries: Sequence[Entry]) -> None:
        self.writing.set()
        await self.release.wait()

    def accept_run(self, group: str, *columns: Any) -> asyncio.Future[CpmgrError | None]:
        return run_outcome(self.record_accepted, group, *columns)


@dataclass
class BrokenJournal(CountingJournal):
    """Its next `accept_run` raises what no journal should (a bug, not a disk error)."""

    broken: bool = True

    def accept_run(self, group: str, *columns: Any) -> asyncio.Future[CpmgrError | None]:
        if self.broken:
            self.broken = False
            raise RuntimeError("a bug")
        return super().accept_run(group, *columns)


@pytest.fixture
def config() -> Iterator[Config]:
    path = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
    yield make_config(path / "cpmgr.sock")
    shutil.rmtree(path, ignore_errors=True)


def lines(*requests: object) -> bytes:
    return b"".join(
        (r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in requests
    )


async def test_a_burst_of_commits_is_one_journal_write(config: Config) -> None:
    journal = CountingJournal()
    async with running(config, journal=journal) as server, connect(server.path) as peer:
        await peer.send(lines(*(commit(shard=s % 8, number=s, id=s) for s in range(100))))
        answers = [await peer.answer() for _ in range(100)]
    assert [a["id"] for a in answers] == list(range(100))
    assert all(a["ok"] for a in answers)
    assert len(journal.calls) < 5, f"{len(journal.calls)} journal writes for one burst"
    # A shard's values replaced within the write are not written: its newest one is.
    journaled = journal.entries()
    assert last_values(journaled) == {n % 8: cp(n) for n in range(92, 100)}
    assert len(journaled) <= 8 * len(journal.calls)


async def test_each_commit_of_a_burst_keeps_its_own_answer_and_place(config: Config) -> None:
    journal = CountingJournal()
    store = CheckpointStore(g.name for g in config.groups)
    async with running(config, store, journal=journal) as server, connect(server.path) as peer:
        await peer.send(
            lines(
                commit(shard=1, number=10, id="a"),
                commit(shard=1, number=9, id="older"),
                b"not json",
                commit(shard=1, number=11, id="b"),
                {"op": "commit", "group": "nope", "shard": 1, "checkpoint": cp(1), "id": "c"},
                {"op": "get", "group": "orders", "shard": 1, "id": "get"},
                commit(shard=1, number=8, force=True, id="d"),
            )
        )
        answers = [await peer.answer() for _ in range(7)]
    assert [a.get("id") for a in answers] == ["a", "older", None, "b", "c", "get", "d"]
    codes = [a["error"]["code"] if not a["ok"] else "ok" for a in answers]
    assert codes == ["ok", "CheckpointRegression", "BadRequest", "ok", "UnknownGroup", "ok", "ok"]
    assert answers[5]["shards"][0]["pending"] == cp(11)  # sees every commit before it
    assert [e[2] for e in journal.entries()] == [cp(10), cp(11), cp(8)]
    assert store.shard_view("orders", 1).pending == cp(8)  # type: ignore[union-attr]


async def test_a_failed_journal_write_refuses_every_commit_it_held(config: Config) -> None:
    journal = CountingJournal(fail=True)
    store = CheckpointStore(g.name for g in config.groups)
    async with running(config, store, journal=journal) as server, connect(server.path) as peer:
        await peer.send(lines(*(commit(shard=s, number=5, id=s) for s in range(10))))
        answers = [await peer.answer() for _ in range(10)]
        assert {a["error"]["code"] for a in answers} == {"JournalError"}
        journal.fail = False
        assert await peer.ask(commit(shard=0, number=6)) == {"ok": True}
    assert store.tracked_count("orders") == 1


async def test_commits_of_a_group_removed_while_they_are_written_are_not_applied(
    config: Config,
) -> None:
    journal = GatedJournal()
    store = CheckpointStore(g.name for g in config.groups)
    async with running(config, store, journal=journal) as server, connect(server.path) as peer:
        await peer.send(lines(*(commit(shard=s, number=5, id=s) for s in range(3))))
        await asyncio.wait_for(journal.writing.wait(), 5)
        others = tuple(g for g in config.groups if g.name != "orders")
        server.apply_config(dataclasses.replace(config, groups=others))
        journal.release.set()
        answers = [await peer.answer() for _ in range(3)]
    assert [a["id"] for a in answers] == [0, 1, 2]
    assert [a["error"]["code"] for a in answers] == ["UnknownGroup"] * 3
    assert store.shard_views("orders") == []


async def test_a_burst_of_commits_to_one_group_leaves_each_shard_its_newest_value(
    config: Config,
) -> None:
    journal = CountingJournal()
    store = CheckpointStore(g.name for g in config.groups)
    async with running(config, store, journal=journal) as server, connect(server.path) as peer:
        await peer.send(lines(*(commit(shard=n % 4, number=n, id=n) for n in range(40))))
        answers = [await peer.answer() for _ in range(40)]
        await peer.send(lines(commit(shard=1, number=20, id="older")))
        refused = await peer.answer()
    assert all(a["ok"] for a in answers)
    assert refused["error"]["code"] == "CheckpointRegression"
    views = {v.shard: v.pending for v in store.shard_views("orders")}
    assert views == {s: cp(36 + s) for s in range(4)}
    journaled = journal.entries()
    assert last_values(journaled) == views
    assert {value for _group, _shard, value, _consumer in journaled} <= {cp(n) for n in range(40)}


async def test_an_unexpected_journal_error_answers_internal_error_and_holds_nothing_back(
    config: Config,
) -> None:
    journal = BrokenJournal()
    store = CheckpointStore(g.name for g in config.groups)
    async with running(config, store, journal=journal) as server, connect(server.path) as peer:
        await peer.send(lines(*(commit(shard=s, number=9, id=s) for s in range(3))))
        answers = [await peer.answer() for _ in range(3)]
        assert [a["error"]["code"] for a in answers] == ["InternalError"] * 3
        # Nothing was accepted, so nothing stays reserved: an older value is no regression.
        assert await peer.ask(commit(shard=1, number=5)) == {"ok": True}
    assert [e[2] for e in journal.entries()] == [cp(5)]
    assert store.tracked_count("orders") == 1
