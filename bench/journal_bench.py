"""The journal alone, without the socket: the hand-written log (`cpmgr.journal.Journal`) against
the alternative weighed for it (one SQLite row per shard), and the event-loop stall of a
compaction.

    python bench/journal_bench.py [--records N] [--concurrency C] [--shards S] [--dir PATH]
    python bench/journal_bench.py --compaction [--shards S]
    python bench/journal_bench.py --writer [--records N] [--shards S] [--batch B]

Each run gets a fresh directory; `concurrency` writers commit one checkpoint each at a time, as
many consumers on the socket would, spread over `shards` shards. Both candidates hand the
records of one event-loop turn to one writer thread in one write (log) or one transaction
(SQLite), so they differ only in what that thread does. Prints records/s and the fsyncs (log)
or transactions (SQLite: one WAL fsync each with `synchronous=FULL`, none with `OFF`).
`--compaction` fills a journal with `shards` shards, then measures how late a 1 ms probe task
wakes while the writer thread writes the snapshot. `--writer` measures the work per record
without the event loop (for the log: encoding, the state per shard and the write): appends to
the log against SQLite upserts.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sqlite3
import statistics
import tempfile
import threading
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Protocol

from cpmgr.journal import FSYNC_MODES, FsyncMode, Journal
from cpmgr.journal.files import AcceptedRun, JournalFiles
from cpmgr.journal.format import encode_accepted_block

Entry = tuple[str, int, str, str | None]
_SYNCHRONOUS = {"always": "FULL", "batch": "NORMAL", "never": "OFF"}
_UPSERT = (
    "INSERT INTO shards (grp, shard, latest, consumer) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (grp, shard) DO UPDATE SET latest = excluded.latest, consumer = excluded.consumer"
)


class Candidate(Protocol):
    def open(self) -> object: ...
    async def start(self) -> None: ...
    async def record_accepted(self, entries: Sequence[Entry]) -> None: ...
    async def close(self) -> None: ...


class SqliteJournal:
    """The alternative: a WAL database with one row per (group, shard); the upserts of one
    event-loop turn (or of every turn that arrived while the thread was busy) in one
    transaction on one writer thread."""

    def __init__(self, directory: Path, *, fsync: FsyncMode) -> None:
        self._path = directory / "journal.db"
        self._mode = fsync
        self._pending: list[Entry] = []
        self._waiting: asyncio.Future[None] | None = None
        self._busy = False
        self._kicked = False
        self.transactions = 0
        self._db: sqlite3.Connection | None = None

    def open(self) -> object:
        self._db = sqlite3.connect(self._path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[self._mode]}")
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS shards (grp TEXT, shard INTEGER, latest TEXT, "
            "consumer TEXT, committed TEXT, PRIMARY KEY (grp, shard)) WITHOUT ROWID"
        )
        return self._db.execute("SELECT * FROM shards").fetchall()

    async def start(self) -> None:
        pass

    async def record_accepted(self, entries: Sequence[Entry]) -> None:
        loop = asyncio.get_running_loop()
        self._pending.extend(entries)
        if self._waiting is None:
            self._waiting = loop.create_future()
        waiting = self._waiting
        if not self._kicked:
            self._kicked = True
            loop.call_soon(self._kick)
        await asyncio.shield(waiting)

    def _kick(self) -> None:
        self._kicked = False
        if self._busy or not self._pending:
            return
        rows, self._pending = self._pending, []
        waiting, self._waiting = self._waiting, None
        self._busy = True
        done = asyncio.get_running_loop().run_in_executor(None, self._write, rows)
        done.add_done_callback(lambda _: self._written(waiting))

    def _written(self, waiting: asyncio.Future[None] | None) -> None:
        self._busy = False
        if waiting is not None:
            waiting.set_result(None)
        self._kick()

    def _write(self, rows: list[Entry]) -> None:
        assert self._db is not None
        self._db.execute("BEGIN")
        self._db.executemany(_UPSERT, rows)
        self._db.execute("COMMIT")
        self.transactions += 1

    async def close(self) -> None:
        if self._db is not None:
            self._db.close()


class CountingFsync:
    def __init__(self) -> None:
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, fd: int) -> None:
        with self._lock:
            self.calls += 1
        os.fsync(fd)


async def drive(candidate: Candidate, records: int, concurrency: int, shards: int) -> float:
    """Commit `records` checkpoints from `concurrency` writers; the elapsed seconds."""
    candidate.open()
    await candidate.start()
    per_writer = records // concurrency

    async def writer(index: int) -> None:
        for i in range(per_writer):
            shard = (index + i * concurrency) % shards
            await candidate.record_accepted([("bench", shard, f"{i:020d}", f"consumer-{index}")])
            await asyncio.sleep(0)  # a consumer's next line arrives in a later loop turn

    started = time.perf_counter()
    await asyncio.gather(*(writer(index) for index in range(concurrency)))
    elapsed = time.perf_counter() - started
    await candidate.close()
    return elapsed


async def compare(args: argparse.Namespace) -> None:
    done = (args.records // args.concurrency) * args.concurrency
    print(f"{done} records, {args.concurrency} writers, {args.shards} shards")
    for mode in FSYNC_MODES:
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            fsyncs = CountingFsync()
            log = Journal(Path(tmp), fsync=mode, fsync_fn=fsyncs)
            elapsed = await drive(log, args.records, args.concurrency, args.shards)
            print(f"{mode:>6} log:    {done / elapsed:10,.0f} records/s  {fsyncs.calls:6} fsyncs")
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            db = SqliteJournal(Path(tmp), fsync=mode)
            elapsed = await drive(db, args.records, args.concurrency, args.shards)
            print(
                f"{mode:>6} sqlite: {done / elapsed:10,.0f} records/s  "
                f"{db.transactions:6} transactions (synchronous={_SYNCHRONOUS[mode]})"
            )


def writer_work(args: argparse.Namespace) -> None:
    """What the writer thread does per record, without the event loop: `records` updates of
    random shards among `shards` already known, `batch` per write (log) or transaction
    (SQLite), with an fsync per batch (`always`, `synchronous=FULL`) or none (`never`, `OFF`)."""
    rng = random.Random(1)
    entries: list[Entry] = [
        ("bench", rng.randrange(args.shards), f"{i:020d}", f"consumer-{i % 100}")
        for i in range(args.records)
    ]
    batches = [entries[i : i + args.batch] for i in range(0, len(entries), args.batch)]
    print(f"{args.records} updates of {args.shards} shards, {args.batch} per write/transaction")
    for mode in ("always", "never"):
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            files = JournalFiles(
                Path(tmp), mode=mode, compact_bytes=1 << 40, fsync_fn=os.fsync, write_fn=os.write
            )
            files.open()
            files.append([_run(files, [("bench", s, "0" * 20, None) for s in range(args.shards)])])
            took, cpu = _time_log(files, batches, always=mode == "always")
            files.release()
        _report(mode, "log", took, cpu, args.records)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            db = SqliteJournal(Path(tmp), fsync="never")
            db.open()
            db._write([("bench", s, "0" * 20, None) for s in range(args.shards)])
            assert db._db is not None
            db._db.execute(f"PRAGMA synchronous={_SYNCHRONOUS[mode]}")
            took, cpu = _time_sqlite(db, batches)
            db._db.close()
        _report(mode, "sqlite", took, cpu, args.records)


def _time_log(
    files: JournalFiles, batches: list[list[Entry]], *, always: bool
) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        files.append([_run(files, batch)])
        if always:
            files.sync()
    return time.perf_counter() - wall, time.process_time() - cpu


def _run(files: JournalFiles, entries: list[Entry]) -> AcceptedRun:
    """Entries of group `bench` as the event loop hands them over, numbered and encoded (the
    encoding is work per record too, on the loop's thread since the writer only writes)."""
    shards = [shard for _group, shard, _checkpoint, _consumer in entries]
    checkpoints = [checkpoint for _group, _shard, checkpoint, _consumer in entries]
    consumers = [consumer for _group, _shard, _checkpoint, consumer in entries]
    first = files.seq + 1
    data = encode_accepted_block(first, "bench", shards, checkpoints, consumers)
    return AcceptedRun(data, "bench", shards, checkpoints, consumers, first)


def _time_sqlite(db: SqliteJournal, batches: list[list[Entry]]) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        db._write(batch)
    return time.perf_counter() - wall, time.process_time() - cpu


def _report(mode: str, name: str, took: float, cpu: float, records: int) -> None:
    print(
        f"{mode:>6} {name:<6}: {records / took:10,.0f} records/s, "
        f"{cpu / records * 1e6:5.1f} µs CPU per record"
    )


async def probe_lags(work: Awaitable[object]) -> tuple[float, list[float]]:
    """How late a 1 ms sleep wakes, again and again, while `work` runs; its seconds too."""
    lags: list[float] = []
    running = asyncio.ensure_future(work)
    started = time.perf_counter()
    while not running.done():
        before = time.perf_counter()
        await asyncio.sleep(0.001)
        lags.append(time.perf_counter() - before - 0.001)
    await running
    return time.perf_counter() - started, sorted(lags)


def lag_summary(took: float, lags: list[float]) -> str:
    p999 = lags[min(len(lags) - 1, int(len(lags) * 0.999))]
    median = statistics.median(lags)
    return (
        f"{took * 1000:6.0f} ms, {len(lags)} probes: median {median * 1000:.2f} ms,"
        f" p99.9 {p999 * 1000:.1f} ms, max {lags[-1] * 1000:.1f} ms"
    )


async def compaction_stall(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        journal = Journal(Path(tmp), fsync="never", compact_bytes=1 << 40)
        journal.open()
        await journal.start()
        for first in range(0, args.shards, 1000):
            last = min(first + 1000, args.shards)
            await journal.record_accepted(
                [("bench", s, f"{s:020d}", f"consumer-{s % 100}") for s in range(first, last)]
            )
        idle = await probe_lags(asyncio.sleep(1.0))
        compaction = await probe_lags(journal.compact())
        await journal.close()
    print(f"event-loop lag, idle (the machine's own noise): {lag_summary(*idle)}")
    print(f"event-loop lag, compaction of {args.shards} shards: {lag_summary(*compaction)}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--concurrency", type=int, default=100)
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--compaction", action="store_true", help="measure a compaction's stall")
    parser.add_argument("--writer", action="store_true", help="the writer thread's work alone")
    parser.add_argument("--batch", type=int, default=100, help="records per write (--writer)")
    parser.add_argument("--dir", type=Path, default=None, help="parent of the temp dirs")
    args = parser.parse_args()
    if args.writer:
        writer_work(args)
    else:
        await (compaction_stall(args) if args.compaction else compare(args))


if __name__ == "__main__":
    asyncio.run(main())
