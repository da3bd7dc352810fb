"""The journal's directory: the lock, replay, appends, fsyncs and compaction, and the state per
shard they imply. Synchronous: the opener uses it, then only the writer thread."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cpmgr.errors import CpmgrError
from cpmgr.gcpolicy import untrack
from cpmgr.journal.format import (
    JournalError,
    Record,
    Scan,
    SnapshotHeader,
    encode,
    scan,
    snapshot_header,
    snapshot_lines,
    warn_damage,
)
from cpmgr.journal.state import (
    Dropped,
    LogRecord,
    ShardRecord,
    Shards,
    Undo,
    accept_columns,
    apply,
    by_key,
    committed_record,
    public,
    undo,
)

log = logging.getLogger("cpmgr.journal")

FsyncMode = Literal["always", "batch", "never"]
LOG_NAME = "journal.log"
SNAPSHOT_NAME = "journal.snapshot"
SNAPSHOT_TMP_NAME = "journal.snapshot.tmp"
LOCK_NAME = "lock"
_SNAPSHOT_CHUNK = 500

WriteFn = Callable[[int, memoryview], int]
Outcome = tuple[Literal["c", "d"], str, int, str, int]
"""What SLS did with a value: took it ("c") or refused it for good ("d"); group, shard,
checkpoint, and the record's sequence number."""


@dataclass(frozen=True, slots=True)
class AcceptedRun:
    """Accepted records of one group, numbered and encoded on the event loop: their lines,
    and their shards, checkpoints and consumers (columns, so that a run holds a few lists
    while it waits for the writer, not an object per record for the garbage collector)."""

    data: bytes
    group: str
    shards: Sequence[int]
    checkpoints: Sequence[str]
    consumers: Sequence[str | None]
    first_seq: int

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.shards) - 1


Part = AcceptedRun | Outcome
"""What is written, in order: a run of accepted records, or one outcome."""


class JournalLocked(CpmgrError):
    """Another live process holds the lock on the state directory."""


def _write_all(write: WriteFn, fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write made no progress")
        view = view[written:]


def _acquire_lock(path: Path) -> int:
    """Take the exclusive lock on `path` and write our pid into it; the fd holds the lock."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            raise JournalLocked(
                f"state dir {path.parent} is locked by another cpmgr (pid {holder})"
            ) from None
        # flock is released by the kernel when its holder dies, so a stale file is simply ours.
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
    except BaseException:
        os.close(fd)
        raise
    return fd


class JournalFiles:
    """The files of one state directory and the state per shard they hold.

    After a failed fsync the kernel may have dropped the pages while later fsyncs report
    success, so the whole state is rewritten into a new snapshot before anything is made
    durable again (`needs_rewrite`).
    """

    def __init__(
        self,
        directory: Path,
        *,
        mode: FsyncMode,
        compact_bytes: int,
        fsync_fn: Callable[[int], None],
        write_fn: WriteFn,
    ) -> None:
        self.directory = directory
        self._mode: FsyncMode = mode
        self._compact_bytes = compact_bytes
        self._fsync = fsync_fn
        self._write = write_fn
        self.shards: Shards = {}
        self.seq = 0  # of the last record written
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        self._offset = 0  # size of the log; every write appends
        self._compact_at = compact_bytes
        self._resync = False  # a partial record could not be cut off: start the next with \n
        self.unsynced = False
        self.needs_rewrite = False
        self.failing = False

    # --- lock and replay -------------------------------------------------------------------

    def open(self) -> list[ShardRecord]:
        """Create (0700) and lock the directory, replay snapshot and log, return the state."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = _acquire_lock(self.directory / LOCK_NAME)
        except OSError as exc:
            raise JournalError(f"cannot use state dir {self.directory}: {exc}") from exc
        try:
            self._replay()
        except OSError as exc:
            self.release()
            raise JournalError(f"cannot replay the journal in {self.directory}: {exc}") from exc
        except BaseException:
            self.release()
            raise
        return [public(shard) for shard in by_key(self.shards.values())]

    def release(self) -> None:
        for fd in (self._log_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # closing the lock's only fd releases the flock
        self._log_fd = self._lock_fd = None

    def _replay(self) -> None:
        self.shards.clear()
        with contextlib.suppress(FileNotFoundError):
            (self.directory / SNAPSHOT_TMP_NAME).unlink()  # left by an interrupted compaction
        covers, snap_damaged = self._replay_snapshot(self.directory / SNAPSHOT_NAME)
        log_path = self.directory / LOG_NAME
        found = scan(log_path)
        warn_damage(log_path, found)
        skipped = self._replay_log(found.records, covers)
        if found.torn_at is not None:
            os.truncate(log_path, found.good_end)
        self._open_log(log_path)
        untrack(self.shards)
        # Rewrite clean files now rather than warn (or skip) at every start. The daemon logs
        # the one "journal replayed" line, with what it restored.
        self.maybe_compact(force=snap_damaged or bool(found.corrupt) or bool(skipped))

    def _replay_snapshot(self, path: Path) -> tuple[int | None, bool]:
        """Load the snapshot; return the last log sequence number it holds (None if it cannot
        be trusted to hold them all) and whether it is damaged."""
        found: Scan = scan(path)
        warn_damage(path, found)
        shards = [r for r in found.records if isinstance(r, ShardRecord)]
        first = found.records[0] if found.records else None
        header = first if isinstance(first, SnapshotHeader) else None
        seq = header.seq if header else 0  # every value in it is at most that new
        self.shards.update(
            ((r.group, r.shard), (r.group, r.shard, r.latest, r.consumer, r.committed, seq))
            for r in shards
        )
        whole = header is not None and header.shards == len(shards)
        if header is not None and not whole:
            log.warning("journal %s holds %d of %d shards", path, len(shards), header.shards)
        damaged = found.damaged or (bool(found.records) and not whole)
        self.seq = seq
        # A damaged snapshot may miss what the log still has: re-apply the whole log then.
        return (header.seq if header and not damaged else None), damaged

    def _replay_log(self, records: Iterable[Record], covers: int | None) -> int:
        """Apply the log records the snapshot does not hold; return how many it did hold."""
        skipped = 0
        for rec in records:
            if isinstance(rec, SnapshotHeader | ShardRecord):
                continue
            self.seq = max(self.seq, rec.seq)
            if covers is not None and rec.seq <= covers:
                skipped += 1
            else:
                apply(self.shards, rec)
        return skipped

    def _open_log(self, path: Path) -> None:
        created = not path.exists()
        self._log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._offset = os.fstat(self._log_fd).st_size
        if created and self._mode != "never":
            self._fsync_dir()  # make the new file's directory entry durable

    def _fsync_dir(self) -> None:
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    # --- writing ---------------------------------------------------------------------------

    def _outcome(self, outcome: Outcome) -> LogRecord:
        kind, group, shard, checkpoint, seq = outcome
        if kind == "c":
            return committed_record(self.shards, seq, group, shard, checkpoint)
        return Dropped(seq, group, shard, checkpoint)

    def append(self, parts: Sequence[Part]) -> list[Undo]:
        """Apply `parts` to the state and write them at the end of the log in one write; return
        what undoes them. On failure the state is restored, whatever got written is cut off
        and the OSError raised."""
        assert self._log_fd is not None
        changes: list[Undo] = []
        chunks = [b"\n"] if self._resync else []
        shards = self.shards
        for part in parts:
            if isinstance(part, AcceptedRun):  # the common records, encoded already
                columns = (part.shards, part.checkpoints, part.consumers)
                accept_columns(shards, part.group, columns, part.first_seq, changes)
                chunks.append(part.data)
                self.seq = part.last_seq
            else:
                rec = self._outcome(part)
                changes.append(apply(shards, rec))
                chunks.append(encode(rec))
                self.seq = rec.seq
        # Its keys and values are plain tuples, which cannot refer back to it: the garbage
        # collector need not walk its entry per shard (storing a new tuple tracks it again).
        untrack(shards)
        data = b"".join(chunks)
        start = self._offset
        try:
            _write_all(self._write, self._log_fd, data)
        except OSError as exc:
            undo(self.shards, changes)
            self._discard_tail(self._log_fd, start)
            self.note_failure("write", exc)
            raise
        self._offset += len(data)
        self._resync = False
        self.unsynced = True
        self.note_success()
        return changes

    def _discard_tail(self, fd: int, start: int) -> None:
        try:
            os.ftruncate(fd, start)
        except OSError:
            # The partial record stays; a newline before the next one makes replay skip it
            # as a corrupt line instead of gluing it to a valid record.
            self._resync = True
            with contextlib.suppress(OSError):
                self._offset = os.fstat(fd).st_size

    def retract(self, changes: Sequence[Undo]) -> None:
        """Undo written records that must not count (their writers were told they failed):
        the state forgets them now, the files at the rewrite that must come first."""
        undo(self.shards, changes)
        self.needs_rewrite = True

    def sync(self) -> None:
        """Make everything written so far durable; raises the OSError (logged) if it fails."""
        if self.needs_rewrite and not self.maybe_compact():
            raise OSError(errno.EIO, "the journal could not be rewritten after a failed fsync")
        fd = self._log_fd
        if fd is None or not self.unsynced:
            return
        self.unsynced = False
        try:
            self._fsync(fd)
        except OSError as exc:
            self.unsynced = self.needs_rewrite = True
            self.note_failure("fsync", exc)
            raise

    def note_failure(self, what: str, exc: OSError) -> None:
        # One error line per outage, not one per refused commit.
        if self.failing:
            log.debug("journal %s failed in %s: %s", what, self.directory, exc)
        else:
            log.error("journal %s failed in %s: %s", what, self.directory, exc)
        self.failing = True

    def note_success(self) -> None:
        if self.failing and not self.needs_rewrite:
            log.warning("journal in %s is writable again", self.directory)
            self.failing = False

    # --- compaction ------------------------------------------------------------------------

    def maybe_compact(self, *, force: bool = False) -> bool:
        """Compact when the log outgrew its threshold, must be rewritten or `force`; return
        whether a new snapshot was written. Failures are logged, not raised."""
        due = force or self.needs_rewrite or self._offset >= self._compact_at
        if self._log_fd is None or not due:
            return False
        try:
            self._compact(self._log_fd)
        except OSError as exc:
            self.note_failure("compaction", exc)
            # Retry after another threshold's worth of log, not on every record.
            self._compact_at = self._offset + self._compact_bytes
            return False
        return True

    def _compact(self, log_fd: int) -> None:
        """Write the state per shard into a new snapshot (tmp, fsync, rename, fsync dir), then
        empty the log. Bounded by the number of shards, and rare."""
        data = self._snapshot()
        self._write_snapshot(data)
        self.needs_rewrite = self.unsynced = False
        self.note_success()
        self._compact_at = self._offset + max(self._compact_bytes, len(data))
        try:
            os.ftruncate(log_fd, 0)
        except OSError as exc:
            # The snapshot's sequence number already makes replay skip those records.
            self.note_failure("truncation", exc)
            return
        self._offset = 0
        self._resync = False  # the partial record went with the rest
        self._compact_at = max(self._compact_bytes, len(data))
        log.debug("journal compacted: %d shards, %d bytes", len(self.shards), len(data))

    def _snapshot(self) -> bytes:
        """The snapshot of the state now, built in chunks with the GIL released in between, so
        the event loop's thread gets it at least every chunk (about a millisecond of work)."""
        # In the dict's order, not sorted: a sort of 100k keys is one C call that holds the GIL
        # for tens of milliseconds; replay does not care about the order.
        shards = list(self.shards.values())
        parts = [snapshot_header(len(shards), self.seq)]
        for start in range(0, len(shards), _SNAPSHOT_CHUNK):
            parts.append(snapshot_lines(shards[start : start + _SNAPSHOT_CHUNK]))
            time.sleep(0)
        return b"".join(parts)

    def _write_snapshot(self, data: bytes) -> None:
        tmp = self.directory / SNAPSHOT_TMP_NAME
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(self._write, fd, data)
            self._fsync(fd)
        except OSError:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        os.close(fd)
        os.replace(tmp, self.directory / SNAPSHOT_NAME)
        self._fsync_dir()
