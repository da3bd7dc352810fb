"""The crash-safe journal of accepted checkpoints: an append-only checksummed log in `state.dir`,
compacted into a snapshot of the latest state per shard, replayed at start. Its file I/O runs
on one writer thread, so a stalled disk never stalls the event loop.

Decisions where the contract is silent:
- A commit waits at most `write_timeout` (5 s) for the journal; then it is refused with
  `JournalError` and what was written for it is taken back (rewritten out of the files before
  anything else is made durable), so "not accepted" holds after a restart too.
- `writable` (and with it `/readyz`) is False while a write, fsync or compaction has run longer
  than `write_timeout`, and from a failed write or fsync until one succeeds again.
- Records of one event-loop turn go to the disk in one write (one fsync with `always`); turns
  that arrive while the writer is busy are written together next. `c` and `d` records, which
  nobody waits for, go with the next accepted records or at most 50 ms later.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import operator
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from cpmgr.errors import CpmgrError
from cpmgr.journal.files import (
    LOCK_NAME,
    LOG_NAME,
    SNAPSHOT_NAME,
    SNAPSHOT_TMP_NAME,
    AcceptedRun,
    FsyncMode,
    JournalFiles,
    JournalLocked,
    Part,
    WriteFn,
)
from cpmgr.journal.format import (
    FORMAT_VERSION,
    JournalError,
    encode_accepted_block,
)
from cpmgr.journal.state import Entry, ShardRecord, Undo

__all__ = [
    "FORMAT_VERSION",
    "FSYNC_MODES",
    "LOCK_NAME",
    "LOG_NAME",
    "SNAPSHOT_NAME",
    "SNAPSHOT_TMP_NAME",
    "FsyncMode",
    "Journal",
    "JournalError",
    "JournalLocked",
    "ShardRecord",
]

log = logging.getLogger(__name__)

_GROUP = operator.itemgetter(0)

FSYNC_MODES: tuple[FsyncMode, ...] = ("always", "batch", "never")
# Outcome records (`c`, `d`) nobody waits for are written with the next accepted records or
# after this long: in a commit cycle they come a few per loop turn, and waking the writer
# thread for every turn cost more than what it wrote (and held the GIL the loop needs).
_OUTCOME_DELAY: Final = 0.05


@dataclass(eq=False)
class _Batch:
    """The records of one event-loop turn, and the writers waiting for them."""

    parts: list[Part] = field(default_factory=list)
    submit: asyncio.Handle | None = None  # hands it to the writer
    awaited: bool = False  # a writer waits for it: it goes at the end of the loop turn
    done: asyncio.Future[CpmgrError | None] | None = None
    timer: asyncio.TimerHandle | None = None
    round: _Round | None = None
    """Set (under the lock) when the writer thread takes the batch."""


@dataclass(eq=False)
class _Round:
    """The batches the writer thread writes in one go."""

    batches: list[_Batch]
    abandoned: bool = False
    """Their writers were told the journal failed (it took too long)."""
    finished: bool = False


@dataclass(eq=False)
class _Compaction:
    force: bool
    done: asyncio.Future[bool]


_Item = _Batch | _Compaction


class Journal:
    """Append-only, checksummed, compacted log of accepted checkpoints in one directory.

    `open()` (sync, before the socket opens) locks the directory and replays it; `start()`
    starts the writer thread (the first record starts it too). Call `record_accepted` (or
    `accept_run`, its form for a chunk of one group without a coroutine) before acknowledging
    a commit and `record_committed` once SLS took one. Records are numbered and the accepted
    ones encoded on the event loop; the writer thread applies them to its state per shard
    (which compaction writes out) and does the I/O. Every mode writes a
    record before its writer returns, so a process crash loses nothing acknowledged. With
    `always`, no writer returns before the fsync that covers its record; `batch` fsyncs at most
    `fsync_interval` after a write (a power loss costs at most that window); `never` leaves it
    to the kernel. Compaction fsyncs in every mode: the snapshot replaces the log.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        fsync: FsyncMode = "batch",
        fsync_interval: float = 0.1,
        compact_bytes: int = 4 * 1024 * 1024,
        write_timeout: float = 5.0,
        fsync_fn: Callable[[int], None] = os.fsync,
        write_fn: WriteFn = os.write,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        if fsync_interval <= 0 or compact_bytes <= 0 or write_timeout <= 0:
            raise ValueError("fsync_interval, compact_bytes and write_timeout must be > 0")
        self._dir = Path(directory)
        self._mode: FsyncMode = fsync
        self._interval = fsync_interval
        self._write_timeout = write_timeout
        self._files = JournalFiles(
            self._dir, mode=fsync, compact_bytes=compact_bytes, fsync_fn=fsync_fn, write_fn=write_fn
        )
        self._opened = False
        self._closed = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopped: asyncio.Future[None] | None = None
        self._turn: _Batch | None = None  # what this loop turn recorded so far
        self._seq = 0  # of the last record numbered (records are numbered on the loop)
        self._timed_out = False  # writers were refused for it; until a write completes
        # Shared with the writer thread, under the lock:
        self._wake = threading.Condition()
        self._queue: list[_Item] = []
        self._closing = False
        # Written by the writer thread only:
        self._busy_since: float | None = None
        self._dirty_since: float | None = None  # first write not yet fsynced (batch)

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def size_bytes(self) -> int:
        """Bytes of the files in the directory (once it exists), for tests and metrics."""
        total = 0
        with os.scandir(self._dir) as entries:
            for entry in entries:
                # The writer thread may rename or remove a file meanwhile (compaction).
                with contextlib.suppress(FileNotFoundError):
                    if entry.is_file(follow_symlinks=False):
                        total += entry.stat().st_size
        return total

    @property
    def writable(self) -> bool:
        """Whether the journal can persist now: False while its last write or fsync failed,
        or one has been running for `write_timeout` or longer (a stalled disk: from the
        first writer refused for it until a write completes)."""
        if not self._opened or self._closed:
            return False
        busy = self._busy_since
        stalled = busy is not None and time.monotonic() - busy >= self._write_timeout
        return not (stalled or self._timed_out or self._files.failing)

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> list[ShardRecord]:
        """Create (0700) and lock the directory, replay snapshot and log, return the state.

        Raises JournalLocked if another live process holds the directory, JournalError if it
        cannot be used."""
        if self._closed or self._opened:
            raise JournalError(f"journal in {self._dir} was already opened")
        records = self._files.open()
        self._seq = self._files.seq
        self._opened = True
        return records

    async def start(self) -> None:
        """Start the writer thread."""
        self._start_writer()

    def _start_writer(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
            self._stopped = self._loop.create_future()
            self._thread = threading.Thread(
                target=self._run, name="cpmgr-journal-writer", daemon=True
            )
            self._thread.start()
        return self._loop

    async def close(self) -> None:
        """Write and fsync what is queued, stop the writer thread, release the lock. Waits
        at most `write_timeout` for a stalled disk (the lock goes with the process then)."""
        if self._closed:
            return
        self._closed = True
        if self._stopped is None:
            self._files.release()
            return
        self._submit()
        with self._wake:
            self._closing = True
            self._wake.notify()
        try:
            await asyncio.wait_for(asyncio.shield(self._stopped), self._write_timeout)
        except TimeoutError:
            log.error(
                "journal in %s: the disk did not finish writing within %gs; leaving it",
                self._dir,
                self._write_timeout,
            )

    # --- recording (on the event loop) -----------------------------------------------------

    async def record_accepted(self, entries: Sequence[Entry]) -> None:
        """Persist accepted (group, shard, checkpoint, consumer) entries before they are
        acknowledged; JournalError means they were not persisted and must not be accepted."""
        self._require_open()
        if not entries:
            return
        # One run per group; every run of this loop turn shares one future.
        done = [
            self.accept_run(group, *_columns(run))
            for group, run in itertools.groupby(entries, key=_GROUP)
        ]
        error = await asyncio.shield(done[-1])
        if error is not None:
            raise JournalError(str(error))

    def accept_run(
        self,
        group: str,
        shards: Sequence[int],
        checkpoints: Sequence[str],
        consumers: Sequence[str | None],
    ) -> asyncio.Future[CpmgrError | None]:
        """Queue accepted checkpoints of one group, given as columns, to be persisted before
        they are acknowledged: `record_accepted` without a coroutine. The future, shared by
        the loop turn's writers (do not cancel it), resolves to None once they are written
        (and, with `always`, fsynced), or to the JournalError refusing them. Raises
        JournalError if the journal is not open."""
        self._require_open()
        if not shards:
            done: asyncio.Future[CpmgrError | None] = self._start_writer().create_future()
            done.set_result(None)
            return done
        first = self._seq + 1
        self._seq += len(shards)
        data = encode_accepted_block(first, group, shards, checkpoints, consumers)
        return self._add(AcceptedRun(data, group, shards, checkpoints, consumers, first))

    def _require_open(self) -> None:
        if not self._opened or self._closed:
            raise JournalError(f"journal in {self._dir} is not open")

    def _add(self, run: AcceptedRun) -> asyncio.Future[CpmgrError | None]:
        batch = self._batch(awaited=True)
        batch.parts.append(run)
        if batch.done is None:
            batch.done = self._start_writer().create_future()
        return batch.done

    def record_committed(self, group: str, shard: int, checkpoint: str) -> None:
        """Note a value SLS confirmed; not fsynced (losing it only repeats an idempotent
        commit). Errors are logged, not raised."""
        if self._opened and not self._closed:
            self._seq += 1
            self._batch(awaited=False).parts.append(("c", group, shard, checkpoint, self._seq))

    def record_dropped(self, group: str, shard: int, checkpoint: str) -> None:
        """Note a value SLS refused for good, so a restart does not make it pending again.
        Not fsynced (losing it only repeats a refused commit). Errors are logged, not raised."""
        if self._opened and not self._closed:
            self._seq += 1
            self._batch(awaited=False).parts.append(("d", group, shard, checkpoint, self._seq))

    async def compact(self, *, force: bool = True) -> bool:
        """Have the writer compact now (or, without `force`, if the log outgrew its
        threshold) after what is queued; whether a new snapshot was written."""
        self._require_open()
        done: asyncio.Future[bool] = self._start_writer().create_future()
        self._submit()
        self._enqueue(_Compaction(force, done))
        return await done

    def _batch(self, *, awaited: bool) -> _Batch:
        """The batch being filled: handed to the writer once this loop turn's callbacks ran if
        a writer waits for it, else within _OUTCOME_DELAY."""
        batch = self._turn
        if batch is None:
            batch = self._turn = _Batch()
        if batch.submit is None or (awaited and not batch.awaited):
            if batch.submit is not None:
                batch.submit.cancel()
            loop = self._start_writer()
            if awaited:
                batch.submit = loop.call_soon(self._submit)
            else:
                batch.submit = loop.call_later(_OUTCOME_DELAY, self._submit)
            batch.awaited = awaited
        return batch

    def _submit(self) -> None:
        batch, self._turn = self._turn, None
        if batch is None:
            return
        if batch.submit is not None:
            batch.submit.cancel()  # when called directly (close, compact)
        if batch.done is not None and self._loop is not None:
            batch.timer = self._loop.call_later(self._write_timeout, self._expire, batch)
        self._enqueue(batch)

    def _enqueue(self, item: _Item) -> None:
        with self._wake:
            self._queue.append(item)
            self._wake.notify()

    def _expire(self, batch: _Batch) -> None:
        """The batch's writers waited `write_timeout`: refuse them, and have the writer thread
        take back whatever it writes for them."""
        with self._wake:
            taken = batch.round
            if taken is None:  # still queued: only the outcomes are written
                batch.parts = [p for p in batch.parts if not isinstance(p, AcceptedRun)]
            elif taken.finished:
                return  # written in time; its answer is on the way
            else:
                taken.abandoned = True
        self._timed_out = True
        error = self._error(
            TimeoutError(f"the disk did not finish writing within {self._write_timeout:g}s")
        )
        for refused in [batch] if taken is None else taken.batches:
            _answer(refused, error)

    def _resolve(self, done: _Round, error: BaseException | None) -> None:
        refusal = None
        if error is None:
            self._timed_out = False  # the disk moves again
        else:
            refusal = self._error(error)
        for batch in done.batches:
            _answer(batch, refusal)

    def _error(self, error: BaseException) -> JournalError:
        return JournalError(f"could not persist to the journal in {self._dir}: {error}")

    # --- the writer thread -----------------------------------------------------------------

    def _run(self) -> None:
        try:
            while (items := self._take()) is not None:
                self._handle(items)
            if self._mode != "never" and self._files.unsynced:
                with contextlib.suppress(OSError):  # logged
                    self._files.sync()
        except BaseException:
            log.exception("journal writer in %s failed", self._dir)
            raise
        finally:
            self._files.release()
            self._post(_finish, self._stopped)

    def _take(self) -> list[_Item] | None:
        """Everything queued (marked taken); [] when a batch-mode fsync is due; None once
        closing with nothing left."""
        with self._wake:
            while not self._queue:
                if self._closing:
                    return None
                due = self._sync_due_in()
                if due is not None and due <= 0:
                    return []
                self._wake.wait(due)
            items, self._queue = self._queue, []
            taken = _Round([item for item in items if isinstance(item, _Batch)])
            for batch in taken.batches:
                batch.round = taken
            return items

    def _sync_due_in(self) -> float | None:
        if self._mode != "batch" or self._dirty_since is None:
            return None
        return self._dirty_since + self._interval - time.monotonic()

    def _handle(self, items: list[_Item]) -> None:
        batches = [item for item in items if isinstance(item, _Batch)]
        self._busy_since = time.monotonic()
        try:
            if batches:
                self._write_round(batches)
            self._sync_if_due()
            self._files.maybe_compact()
            for item in items:
                if isinstance(item, _Compaction):
                    compacted = self._files.maybe_compact(force=item.force)
                    self._post(_answer_compaction, item, compacted)
        finally:
            self._busy_since = None

    def _write_round(self, batches: list[_Batch]) -> None:
        taken = batches[0].round
        assert taken is not None
        parts = [part for batch in batches for part in batch.parts]
        changes: list[Undo] = []
        error: OSError | None = None
        try:
            changes = self._write(parts)
        except OSError as exc:
            error = exc
        with self._wake:
            taken.finished = True
            abandoned = taken.abandoned
        if abandoned and error is None:
            self._files.retract(changes)
        self._post(self._resolve, taken, error)

    def _write(self, parts: list[Part]) -> list[Undo]:
        if not parts:
            return []
        changes = self._files.append(parts)
        if self._mode == "batch" and self._dirty_since is None:
            self._dirty_since = time.monotonic()
        if self._mode == "always" and any(isinstance(part, AcceptedRun) for part in parts):
            try:
                self._files.sync()
            except OSError:
                self._files.retract(changes)
                self._files.maybe_compact()  # the rewrite, before anything else is written
                raise
        return changes

    def _sync_if_due(self) -> None:
        due = self._sync_due_in()
        if due is None or due > 0:
            return
        try:
            self._files.sync()
            self._dirty_since = None
        except OSError:
            self._dirty_since = time.monotonic()  # try again (with a rewrite) next interval

    def _post(self, callback: Callable[..., Any], *args: Any) -> None:
        """Run `callback` on the event loop (not at all if it is gone)."""
        assert self._loop is not None
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(callback, *args)


def _columns(entries: Iterable[Entry]) -> tuple[list[int], list[str], list[str | None]]:
    shards, checkpoints, consumers = [], [], []
    for _group, shard, checkpoint, consumer in entries:
        shards.append(shard)
        checkpoints.append(checkpoint)
        consumers.append(consumer)
    return shards, checkpoints, consumers


def _answer(batch: _Batch, error: CpmgrError | None) -> None:
    if batch.timer is not None:
        batch.timer.cancel()
    if batch.done is not None and not batch.done.done():
        batch.done.set_result(error)


def _answer_compaction(item: _Compaction, compacted: bool) -> None:
    if not item.done.done():
        item.done.set_result(compacted)


def _finish(stopped: asyncio.Future[None] | None) -> None:
    if stopped is not None and not stopped.done():
        stopped.set_result(None)
