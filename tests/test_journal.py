"""The journal in one process: replay, damage, compaction, the lock, failures, fsync modes."""

from __future__ import annotations

import asyncio
import base64
import errno
import logging
import os
import stat
import threading
import time
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from cpmgr.journal import (
    LOCK_NAME,
    LOG_NAME,
    SNAPSHOT_NAME,
    Journal,
    JournalError,
    JournalLocked,
    ShardRecord,
)


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    return tmp_path / "state"


@asynccontextmanager
async def opened(directory: Path, **options: Any) -> AsyncIterator[Journal]:
    journal = Journal(directory, **options)
    journal.open()
    await journal.start()
    try:
        yield journal
    finally:
        await journal.close()


async def replay(directory: Path) -> dict[tuple[str, int], ShardRecord]:
    """What a restarted daemon gets back."""
    journal = Journal(directory, fsync="never")
    try:
        return {(r.group, r.shard): r for r in journal.open()}
    finally:
        await journal.close()


def by_shard(item: tuple[tuple[str, int], ShardRecord]) -> int:
    return item[0][1]


def log_lines(directory: Path) -> list[bytes]:
    return (directory / LOG_NAME).read_bytes().splitlines(keepends=True)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


class Fsyncs:
    """An fsync that counts calls and can be told to fail."""

    def __init__(self) -> None:
        self.calls = 0
        self.fail_next: list[OSError] = []

    def __call__(self, fd: int) -> None:
        self.calls += 1
        if self.fail_next:
            raise self.fail_next.pop(0)
        os.fsync(fd)


# --- replay ----------------------------------------------------------------------------------


async def test_new_directory_is_private_and_locked_with_our_pid(state_dir: Path) -> None:
    async with opened(state_dir / "nested"):
        mode = stat.S_IMODE((state_dir / "nested").stat().st_mode)
        assert mode == 0o700
        assert (state_dir / "nested" / LOCK_NAME).read_text().strip() == str(os.getpid())


async def test_replay_restores_latest_consumer_and_committed(state_dir: Path) -> None:
    async with opened(state_dir) as journal:
        await journal.record_accepted([("orders", 0, "MTA=", "c1"), ("orders", 1, "MTE=", None)])
        await journal.record_accepted([("orders", 0, "MTI=", "c2")])
        journal.record_committed("orders", 0, "MTA=")
        journal.record_committed("orders", 1, "MTE=")
        await journal.record_accepted([("billing", 7, "Nw==", "c9")])

    restored = Journal(state_dir)
    assert restored.open() == [
        ShardRecord("billing", 7, "Nw==", "c9", None),
        ShardRecord("orders", 0, "MTI=", "c2", "MTA="),
        ShardRecord("orders", 1, "MTE=", None, "MTE="),
    ]
    await restored.close()


async def test_any_string_round_trips_without_breaking_the_framing(state_dir: Path) -> None:
    nasty = ["a\nb", 'q"uo\\te', "\r\n\x00\u2028", "ünï 💥", "\ud800", "} 0000 {"]
    async with opened(state_dir) as journal:
        await journal.record_accepted([(s, i, s + "cp", s) for i, s in enumerate(nasty)])
    assert len(log_lines(state_dir)) == len(nasty)
    restored = await replay(state_dir)
    assert [(r.group, r.latest, r.consumer) for _, r in sorted(restored.items(), key=by_shard)] == [
        (s, s + "cp", s) for s in nasty
    ]


async def test_torn_last_record_is_dropped_and_earlier_ones_kept(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(state_dir) as journal:
        await journal.record_accepted([("g", 0, "first", None)])
        await journal.record_accepted([("g", 1, "second", None)])
    log_path = state_dir / LOG_NAME
    good_size = log_path.stat().st_size
    torn = log_lines(state_dir)[1][:-9]  # a crash in the middle of writing a third record
    with log_path.open("ab") as f:
        f.write(torn.replace(b"second", b"third!"))

    with caplog.at_level(logging.WARNING):
        async with opened(state_dir) as journal:
            assert log_path.stat().st_size == good_size  # the tail was cut off
            await journal.record_accepted([("g", 2, "after", None)])
    assert any(f"offset {good_size}" in w and "torn" in w for w in warnings(caplog))
    restored = await replay(state_dir)
    assert {k: r.latest for k, r in restored.items()} == {
        ("g", 0): "first",
        ("g", 1): "second",
        ("g", 2): "after",
    }


async def test_corrupt_record_in_the_middle_is_skipped_and_later_ones_kept(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with opened(state_dir) as journal:
        for shard in range(4):
            await journal.record_accepted([("g", shard, f"cp{shard}", None)])
    lines = log_lines(state_dir)
    lines[1] = lines[1].replace(b"cp1", b"cp7")  # a flipped bit: the checksum no longer matches
    lines[2] = b"zz" + lines[2][2:]  # a damaged checksum field
    (state_dir / LOG_NAME).write_bytes(b"".join(lines))

    with caplog.at_level(logging.WARNING):
        restored = await replay(state_dir)
    assert {k: r.latest for k, r in restored.items()} == {("g", 0): "cp0", ("g", 3): "cp3"}
    offsets = [len(lines[0]), len(lines[0]) + len(lines[1])]
    for offset in offsets:
        assert any(f"corrupt record at offset {offset}" in w for w in warnings(caplog))

    # The damaged files were rewritten at that start: the next start is clean and the same.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert await replay(state_dir) == restored
    assert warnings(caplog) == []


def cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


def damage(directory: Path, line: int) -> None:
    """Flip a byte inside the checkpoint of log line `line`: its checksum no longer matches."""
    lines = log_lines(directory)
    lines[line] = lines[line].replace(b'"c":"', b'"c":"!', 1)
    (directory / LOG_NAME).write_bytes(b"".join(lines))


async def test_a_damaged_accepted_record_between_two_commits_does_not_rewind_sls(
    state_dir: Path,
) -> None:
    # accept(100) commit(100) accept(200)* commit(200): replay used to restore 100 as pending,
    # and SLS got [100, 200, 100].
    async with opened(state_dir, fsync="never") as journal:
        await journal.record_accepted([("g", 0, cursor(100), "c")])
        journal.record_committed("g", 0, cursor(100))
        await journal.record_accepted([("g", 0, cursor(200), "c")])
        journal.record_committed("g", 0, cursor(200))
    damage(state_dir, 2)
    restored = await replay(state_dir)
    assert restored[("g", 0)] == ShardRecord("g", 0, cursor(200), None, cursor(200))


async def test_a_damaged_record_costs_only_its_own_value(state_dir: Path) -> None:
    async with opened(state_dir, fsync="never") as journal:
        for shard in (0, 1):
            for value in (100, 200, 300):
                await journal.record_accepted([("g", shard, cursor(value), "c")])
            journal.record_committed("g", shard, cursor(200))  # landed while 300 was accepted
    damage(state_dir, 2)  # shard 0's 300: 200 stays, committed, the baseline
    damage(state_dir, 5)  # shard 1's 200 (the committed one): 300 stays pending
    restored = await replay(state_dir)
    assert restored[("g", 0)] == ShardRecord("g", 0, cursor(200), "c", cursor(200))
    assert restored[("g", 1)] == ShardRecord("g", 1, cursor(300), "c", cursor(200))


async def test_two_damaged_records_still_never_leave_an_older_value_pending(
    state_dir: Path,
) -> None:
    async with opened(state_dir, fsync="never") as journal:
        for value in (100, 200, 300):
            await journal.record_accepted([("g", 0, cursor(value), "c")])
        journal.record_committed("g", 0, cursor(200))  # landed while 300 was accepted
    damage(state_dir, 1)
    damage(state_dir, 2)  # only 100 is left of what was accepted, older than what SLS has
    restored = await replay(state_dir)
    assert restored[("g", 0)] == ShardRecord("g", 0, cursor(200), None, cursor(200))


async def test_unreadable_format_version_stops_the_start(state_dir: Path) -> None:
    async with opened(state_dir) as journal:
        await journal.record_accepted([("g", 0, "cp", None)])
        assert await journal.compact()
    snapshot = state_dir / SNAPSHOT_NAME
    lines = snapshot.read_bytes().splitlines(keepends=True)
    header = b'{"t":"snap","v":99,"seq":1,"shards":1}'  # written by a future version
    lines[0] = b"%08x %s\n" % (zlib.crc32(header), header)
    snapshot.write_bytes(b"".join(lines))
    for _ in range(2):  # the failed start released its lock: the second fails the same way
        with pytest.raises(JournalError, match="version 99"):
            Journal(state_dir).open()


# --- compaction ------------------------------------------------------------------------------


async def test_compaction_keeps_the_directory_small_over_a_long_run(state_dir: Path) -> None:
    shards, compact_bytes = 64, 16 * 1024
    written = 0
    peak = 0
    async with opened(state_dir, fsync="never", compact_bytes=compact_bytes) as journal:
        for i in range(20_000):
            shard = i % shards
            await journal.record_accepted([("orders", shard, f"{i:012d}", f"consumer-{shard}")])
            written += 100
            if i % 3 == 0:
                journal.record_committed("orders", shard, f"{i:012d}")
            peak = max(peak, journal.size_bytes)
        final_size = journal.size_bytes
    snapshot_size = (state_dir / SNAPSHOT_NAME).stat().st_size
    assert written > 50 * peak  # traffic went far beyond what stayed on disk
    assert peak < compact_bytes + 2 * snapshot_size + 1024
    assert final_size <= peak

    restored = await replay(state_dir)
    assert len(restored) == shards
    for shard in range(shards):
        last = max(i for i in range(20_000) if i % shards == shard)
        committed = max(i for i in range(20_000) if i % shards == shard and i % 3 == 0)
        assert restored[("orders", shard)] == ShardRecord(
            "orders", shard, f"{last:012d}", f"consumer-{shard}", f"{committed:012d}"
        )


async def test_compaction_waits_for_the_threshold(state_dir: Path) -> None:
    async with opened(state_dir, fsync="never", compact_bytes=1000) as journal:
        await journal.record_accepted([("g", 0, "a", None)])
        assert not await journal.compact(force=False)
        before = journal.size_bytes
        await journal.record_accepted([("g", 0, f"{i}", None) for i in range(30)])
        # crossing the threshold compacted on its own (nothing is left to do after it):
        # one shard left on disk
        assert not await journal.compact(force=False)
        assert journal.size_bytes < before + 200
        assert not (state_dir / LOG_NAME).read_bytes()
    assert (await replay(state_dir))[("g", 0)].latest == "29"


async def test_snapshot_renamed_but_log_not_truncated_replays_nothing_twice(
    state_dir: Path,
) -> None:
    async with opened(state_dir, fsync="never") as journal:
        await journal.record_accepted([("g", 0, "5", None)])
        await journal.record_accepted([("g", 0, "3", None)])  # a forced move backwards
        old_log = (state_dir / LOG_NAME).read_bytes()
        assert await journal.compact()
        await journal.record_accepted([("g", 1, "9", None)])
        new_log = (state_dir / LOG_NAME).read_bytes()
    # As if the truncation never reached the disk before a crash.
    (state_dir / LOG_NAME).write_bytes(old_log + new_log)
    restored = await replay(state_dir)
    assert {k: r.latest for k, r in restored.items()} == {("g", 0): "3", ("g", 1): "9"}


# --- the lock --------------------------------------------------------------------------------


async def test_a_second_journal_on_the_same_directory_is_refused(state_dir: Path) -> None:
    async with opened(state_dir):
        with pytest.raises(JournalLocked) as refused:
            Journal(state_dir).open()
        assert f"pid {os.getpid()}" in str(refused.value)
        assert str(state_dir) in str(refused.value)
    # Released on close: the next daemon starts.
    async with opened(state_dir):
        pass


async def test_open_twice_and_use_after_close_are_errors(state_dir: Path) -> None:
    journal = Journal(state_dir)
    journal.open()
    with pytest.raises(JournalError):
        journal.open()
    await journal.close()
    await journal.close()  # idempotent
    with pytest.raises(JournalError):
        await journal.record_accepted([("g", 0, "cp", None)])
    journal.record_committed("g", 0, "cp")  # ignored, not raised


# --- failures --------------------------------------------------------------------------------


class FullDisk:
    """A write that stores `room` more bytes, then fails with ENOSPC until `room` is raised."""

    def __init__(self) -> None:
        self.room: int | None = None

    def __call__(self, fd: int, data: memoryview) -> int:
        if self.room is None:
            return os.write(fd, data)
        if self.room == 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        written = os.write(fd, data[: self.room])
        self.room -= written
        return written


async def test_a_full_disk_refuses_commits_and_the_journal_keeps_serving(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    disk = FullDisk()
    async with opened(state_dir, fsync="always", write_fn=disk) as journal:
        await journal.record_accepted([("g", 0, "kept", None)])
        disk.room = 20  # half a record fits, then the disk is full
        with caplog.at_level(logging.WARNING):
            for shard in range(5):
                with pytest.raises(JournalError, match="No space left"):
                    await journal.record_accepted([("g", shard, "refused", None)])
            journal.record_committed("g", 0, "kept")  # logged, not raised
            disk.room = None  # space freed
            await journal.record_accepted([("g", 1, "after", None)])
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1  # one line per outage, not per refused commit
    assert "No space left" in errors[0].getMessage()
    assert any("writable again" in w for w in warnings(caplog))

    caplog.clear()
    with caplog.at_level(logging.WARNING):
        restored = await replay(state_dir)
    assert warnings(caplog) == []  # the half record was cut off, nothing corrupt on disk
    assert {k: r.latest for k, r in restored.items()} == {("g", 0): "kept", ("g", 1): "after"}


async def test_a_partial_record_that_cannot_be_cut_off_is_fenced_by_a_newline(
    state_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    disk = FullDisk()
    async with opened(state_dir, fsync="never", write_fn=disk) as journal:
        await journal.record_accepted([("g", 0, "kept", None)])
        disk.room = 15

        def no_truncate(fd: int, length: int) -> None:
            raise OSError(errno.EIO, "I/O error")

        monkeypatch.setattr(os, "ftruncate", no_truncate)
        with pytest.raises(JournalError):
            await journal.record_accepted([("g", 1, "refused", None)])
        monkeypatch.undo()
        disk.room = None
        await journal.record_accepted([("g", 2, "after", None)])

    with caplog.at_level(logging.WARNING):
        restored = await replay(state_dir)
    assert {k: r.latest for k, r in restored.items()} == {("g", 0): "kept", ("g", 2): "after"}
    assert any("corrupt record" in w for w in warnings(caplog))


async def test_a_failed_fsync_refuses_its_commits_and_they_never_come_back(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    saved_log: list[bytes] = []
    fsyncs = Fsyncs()

    def fsync(fd: int) -> None:
        if fsyncs.fail_next:  # keep what the kernel might still write out after the failure
            saved_log.append((state_dir / LOG_NAME).read_bytes())
        fsyncs(fd)

    async with opened(state_dir, fsync="always", fsync_fn=fsync) as journal:
        await journal.record_accepted([("g", 0, "old", "c1")])
        fsyncs.fail_next.append(OSError(errno.EIO, "Input/output error"))
        with caplog.at_level(logging.ERROR):
            results = await asyncio.gather(
                journal.record_accepted([("g", 0, "refused", "c2")]),
                journal.record_accepted([("g", 1, "refused", None)]),
                return_exceptions=True,
            )
        assert all(isinstance(r, JournalError) for r in results)
        assert any("fsync failed" in r.getMessage() for r in caplog.records)
        # Still serving, and what it accepts now is durable.
        await journal.record_accepted([("g", 2, "new", None)])

    assert {k: r.latest for k, r in (await replay(state_dir)).items()} == {
        ("g", 0): "old",
        ("g", 2): "new",
    }
    # Even if the refused records reached the disk after all, replay leaves them out.
    (state_dir / LOG_NAME).write_bytes(saved_log[0] + (state_dir / LOG_NAME).read_bytes())
    restored = await replay(state_dir)
    assert restored[("g", 0)] == ShardRecord("g", 0, "old", "c1", None)
    assert ("g", 1) not in restored


async def test_a_write_giving_a_shard_several_values_keeps_the_last_and_undoes_whole(
    state_dir: Path,
) -> None:
    fsyncs = Fsyncs()
    async with opened(state_dir, fsync="always", fsync_fn=fsyncs) as journal:
        await journal.record_accepted([("g", 0, "a1", "c1"), ("g", 1, "b1", None)])
        journal.record_committed("g", 0, "a1")
        await journal.record_accepted(
            [("g", 0, "a2", None), ("g", 1, "b2", "c2"), ("g", 0, "a3", "c3"), ("g", 2, "x", None)]
        )
        fsyncs.fail_next.append(OSError(errno.EIO, "Input/output error"))
        with pytest.raises(JournalError):
            await journal.record_accepted([("g", 0, "no1", None), ("g", 0, "no2", None)])
        journal.record_committed("g", 0, "a3")
        await journal.compact()  # the snapshot is the state in memory
    expected = {
        ("g", 0): ShardRecord("g", 0, "a3", "c3", "a3"),
        ("g", 1): ShardRecord("g", 1, "b2", "c2", None),
        ("g", 2): ShardRecord("g", 2, "x", None, None),
    }
    assert await replay(state_dir) == expected

    other = state_dir.parent / "other"  # every value is in the log, in order, all the same
    async with opened(other, fsync="never") as journal:
        await journal.record_accepted([("g", 5, "y1", None), ("g", 5, "y2", "c5")])
    assert [line.split(b" ", 1)[1] for line in log_lines(other)] == [
        b'{"t":"a","n":1,"g":"g","s":5,"c":"y1","u":null}\n',
        b'{"t":"a","n":2,"g":"g","s":5,"c":"y2","u":"c5"}\n',
    ]
    assert await replay(other) == {("g", 5): ShardRecord("g", 5, "y2", "c5", None)}


# --- fsync modes -----------------------------------------------------------------------------


async def test_always_shares_one_fsync_among_a_burst_of_commits(state_dir: Path) -> None:
    fsyncs = Fsyncs()
    async with opened(state_dir, fsync="always", fsync_fn=fsyncs) as journal:
        before = fsyncs.calls
        await asyncio.gather(
            *(journal.record_accepted([("g", i % 10, f"{i}", None)]) for i in range(1000))
        )
        assert fsyncs.calls - before == 1
    assert (await replay(state_dir))[("g", 9)].latest == "999"


async def test_always_answers_no_commit_before_the_fsync_covering_it(state_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    gates = [threading.Event(), threading.Event()]
    started = [asyncio.Event(), asyncio.Event()]
    fsync_calls: list[int] = []

    def blocking_fsync(fd: int) -> None:
        if threading.current_thread() is threading.main_thread():
            return  # the directory's, at open
        n = len(fsync_calls)
        fsync_calls.append(fd)
        loop.call_soon_threadsafe(started[n].set)
        assert gates[n].wait(10)
        os.fsync(fd)

    def commits(shards: range) -> list[asyncio.Task[None]]:
        return [
            asyncio.create_task(journal.record_accepted([("g", s, "cp", None)])) for s in shards
        ]

    async with opened(state_dir, fsync="always", fsync_fn=blocking_fsync) as journal:
        first = commits(range(10))
        await started[0].wait()
        assert not any(t.done() for t in first)
        second = commits(range(10, 20))  # they arrive while the first fsync runs:
        for _ in range(2):  # a turn to record them, one to hand them to the writer thread
            await asyncio.sleep(0)
        gates[0].set()
        await asyncio.gather(*first)
        await started[1].wait()
        assert not any(t.done() for t in second)  # the first fsync did not cover them
        gates[1].set()
        await asyncio.gather(*second)
        assert len(fsync_calls) == 2


async def test_batch_answers_at_once_and_fsyncs_in_the_background(state_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    synced = asyncio.Event()
    calls: list[str] = []

    def fsync(fd: int) -> None:
        os.fsync(fd)
        if threading.current_thread() is not threading.main_thread():  # the log, not the dir
            calls.append(threading.current_thread().name)
            loop.call_soon_threadsafe(synced.set)

    async with opened(state_dir, fsync="batch", fsync_interval=0.01, fsync_fn=fsync) as journal:
        await journal.record_accepted([("g", 0, "cp", None)])
        assert calls == []  # the answer did not wait for the disk
        await asyncio.wait_for(synced.wait(), 5)
        assert len(calls) == 1
    assert (await replay(state_dir))[("g", 0)].latest == "cp"


async def test_batch_recovers_from_a_failed_fsync_by_rewriting_a_snapshot(
    state_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    loop = asyncio.get_running_loop()
    fsyncs = Fsyncs()
    rewritten = asyncio.Event()

    def fsync(fd: int) -> None:
        fsyncs(fd)
        if (state_dir / SNAPSHOT_NAME).exists():
            loop.call_soon_threadsafe(rewritten.set)

    async with opened(state_dir, fsync="batch", fsync_interval=0.01, fsync_fn=fsync) as journal:
        fsyncs.fail_next.append(OSError(errno.EIO, "Input/output error"))
        with caplog.at_level(logging.ERROR):
            await journal.record_accepted([("g", 0, "acknowledged", None)])
            await asyncio.wait_for(rewritten.wait(), 5)
        assert any("fsync failed" in r.getMessage() for r in caplog.records)
    assert (await replay(state_dir))[("g", 0)].latest == "acknowledged"


@pytest.mark.parametrize("mode", ["always", "batch", "never"])
async def test_close_fsyncs_what_batch_left(state_dir: Path, mode: str) -> None:
    fsyncs = Fsyncs()
    async with opened(state_dir, fsync=mode, fsync_fn=fsyncs) as journal:
        await journal.record_accepted([("g", 0, "cp", "c")])
        before = fsyncs.calls
    assert (fsyncs.calls > before) == (mode == "batch")  # always: done already; never: never
    assert (await replay(state_dir))[("g", 0)] == ShardRecord("g", 0, "cp", "c", None)


def test_bad_options_are_refused(state_dir: Path) -> None:
    bad: list[Callable[[], Journal]] = [
        lambda: Journal(state_dir, fsync="sometimes"),  # type: ignore[arg-type]
        lambda: Journal(state_dir, fsync_interval=0),
        lambda: Journal(state_dir, compact_bytes=0),
    ]
    for make in bad:
        with pytest.raises(ValueError):
            make()


async def test_a_dropped_value_is_not_pending_after_a_restart(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    journal = Journal(directory, fsync="never")
    journal.open()
    await journal.record_accepted([("g", 0, "MTA=", None), ("g", 1, "MTA=", "c1")])
    journal.record_committed("g", 1, "MTA=")
    await journal.record_accepted([("g", 1, "MjA=", "c1")])
    journal.record_dropped("g", 0, "MTA=")  # never committed: the shard is forgotten
    journal.record_dropped("g", 1, "MjA=")  # back to the committed value as the baseline
    await journal.close()
    records = {(r.group, r.shard): r for r in Journal(directory).open()}
    assert ("g", 0) not in records
    assert records["g", 1].latest == records["g", 1].committed == "MTA="


async def test_outcomes_of_many_loop_turns_share_a_write_and_need_no_other(
    state_dir: Path,
) -> None:
    writes: list[int] = []

    def counting_write(fd: int, data: memoryview) -> int:
        writes.append(len(data))
        return os.write(fd, data)

    async with opened(state_dir, fsync="never", write_fn=counting_write) as journal:
        await journal.record_accepted([("g", shard, "MTA=", None) for shard in range(100)])
        before = len(writes)
        for shard in range(100):  # a commit cycle: an outcome or two per loop turn
            journal.record_committed("g", shard, "MTA=")
            await asyncio.sleep(0)
        deadline = time.monotonic() + 5
        while len(log_lines(state_dir)) < 200:  # written without anything else to write
            assert time.monotonic() < deadline, "the outcomes were not written within 5 s"
            await asyncio.sleep(0.01)
        assert len(writes) - before <= 10, f"{len(writes) - before} writes for 100 outcomes"
    restored = await replay(state_dir)
    assert all(r.committed == "MTA=" for r in restored.values())


async def test_a_drop_does_not_touch_a_newer_accepted_value(tmp_path: Path) -> None:
    directory = tmp_path / "state"
    journal = Journal(directory, fsync="never")
    journal.open()
    await journal.record_accepted([("g", 0, "MTA=", None)])
    await journal.record_accepted([("g", 0, "MjA=", None)])
    journal.record_dropped("g", 0, "MTA=")
    await journal.compact()  # the snapshot keeps the newer value too
    await journal.close()
    [record] = Journal(directory).open()
    assert record.latest == "MjA=" and record.committed is None
