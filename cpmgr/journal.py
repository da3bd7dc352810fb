"""The crash-safe journal of accepted checkpoints: an append-only checksummed log in `state.dir`,
compacted into a snapshot of the latest state per shard, replayed at start."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import fcntl
import json
import logging
import os
import re
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cpmgr.errors import CpmgrError
from cpmgr.protocol import decode_cursor

log = logging.getLogger(__name__)

FsyncMode = Literal["always", "batch", "never"]
FSYNC_MODES: tuple[FsyncMode, ...] = ("always", "batch", "never")

# On-disk format, one record per line: `<crc32 of the JSON, 8 lower-case hex digits> <JSON>\n`.
# json.dumps escapes control characters and (ensure_ascii) everything non-ASCII, so no value can
# put a newline inside a record: after a torn write or a flipped bit, the next newline is a
# resynchronisation point and only the damaged line is lost.
#   log:      {"t":"a","n":SEQ,"g":GROUP,"s":SHARD,"c":CHECKPOINT,"u":CONSUMER|null}  accepted
#             {"t":"c","n":SEQ,"g":GROUP,"s":SHARD,"c":CHECKPOINT,"l"|"o":SEQ}  committed to SLS
#             {"t":"d","n":SEQ,"g":GROUP,"s":SHARD,"c":CHECKPOINT}  refused for good by SLS
#   snapshot: {"t":"snap","v":1,"seq":SEQ,"shards":N}  first line
#             {"t":"s","g":GROUP,"s":SHARD,"l":LATEST,"u":CONSUMER|null,"k":COMMITTED|null}
# Every log record has a sequence number and a snapshot holds every record up to its `seq`, so
# replay skips those: a crash between a snapshot's rename and the log's truncation re-applies
# nothing, and records refused after a failed fsync stay out even if the kernel kept them.
# A committed record names the record that set the shard's latest value when it was written:
# `l` if the committed value is that latest value, `o` if it is older (neither in journals
# written before they existed). Replay that does not hold the named record knows it was damaged,
# and never keeps a value older than the committed one as pending: that would rewind SLS.
FORMAT_VERSION = 1
LOG_NAME = "journal.log"
SNAPSHOT_NAME = "journal.snapshot"
SNAPSHOT_TMP_NAME = "journal.snapshot.tmp"
LOCK_NAME = "lock"
_LINE = re.compile(rb"([0-9a-f]{8}) (\{[^\n]*\})\n")

_Key = tuple[str, int]
WriteFn = Callable[[int, memoryview], int]


@dataclass(frozen=True)
class ShardRecord:
    """What replay restores per (group, shard)."""

    group: str
    shard: int
    latest: str
    """Newest accepted checkpoint: the regression baseline."""
    consumer: str | None
    """The consumer that came with `latest`."""
    committed: str | None
    """Last value known committed to SLS (None if unknown)."""


@dataclass(frozen=True, slots=True)
class _Shard:
    """A shard's state in memory: its ShardRecord plus `seq`, the sequence number of the record
    that set `latest` (or, for a snapshot's shards, of the snapshot)."""

    group: str
    shard: int
    latest: str
    consumer: str | None
    committed: str | None
    seq: int

    def public(self) -> ShardRecord:
        return ShardRecord(self.group, self.shard, self.latest, self.consumer, self.committed)


_Undo = tuple[_Key, _Shard, _Shard | None]


class JournalLocked(CpmgrError):
    """Another live process holds the lock on the state directory."""


class JournalError(CpmgrError):
    """The journal could not persist (write or fsync failed, disk full) or could not be read."""


class _Malformed(Exception):
    """A line passed its checksum but does not hold a record this version understands."""


@dataclass(frozen=True)
class _SnapshotHeader:
    seq: int
    shards: int


@dataclass(frozen=True)
class _Accepted:
    seq: int
    group: str
    shard: int
    checkpoint: str
    consumer: str | None


@dataclass(frozen=True)
class _Committed:
    seq: int
    group: str
    shard: int
    checkpoint: str
    latest_seq: int | None = None
    """The committed value was the shard's latest, set by the record with this `seq`."""
    older_than: int | None = None
    """The committed value is older than the shard's latest, set by the record with this `seq`."""


@dataclass(frozen=True)
class _Dropped:
    """SLS refused this value for good: it is no longer pending (nor a baseline)."""

    seq: int
    group: str
    shard: int
    checkpoint: str


_LogRecord = _Accepted | _Committed | _Dropped
_Record = _SnapshotHeader | _LogRecord | ShardRecord


@dataclass
class _Scan:
    """The valid records of one file and where it is damaged."""

    records: list[_Record] = field(default_factory=list)
    good_end: int = 0
    """Offset just past the last valid record."""
    corrupt: list[int] = field(default_factory=list)
    """Offsets of damaged lines followed by valid ones (skipped)."""
    torn_at: int | None = None
    """Offset of the damaged tail after the last valid record, if any."""

    @property
    def damaged(self) -> bool:
        return bool(self.corrupt) or self.torn_at is not None


@dataclass
class _SyncGroup:
    """Writers waiting for one fsync, with what to undo in memory if it fails."""

    done: asyncio.Future[OSError | None]
    undo: list[_Undo] = field(default_factory=list)


# --- encoding ------------------------------------------------------------------------------


def _frame(payload: dict[str, Any]) -> bytes:
    body = json.dumps(payload, separators=(",", ":"), ensure_ascii=True).encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(body), body)


def _encode(rec: _LogRecord) -> bytes:
    if isinstance(rec, _Accepted):
        return _frame(
            {
                "t": "a",
                "n": rec.seq,
                "g": rec.group,
                "s": rec.shard,
                "c": rec.checkpoint,
                "u": rec.consumer,
            }
        )
    if isinstance(rec, _Committed):
        fields: dict[str, Any] = {"t": "c", "n": rec.seq, "g": rec.group, "s": rec.shard}
        fields["c"] = rec.checkpoint
        if rec.latest_seq is not None:
            fields["l"] = rec.latest_seq
        if rec.older_than is not None:
            fields["o"] = rec.older_than
        return _frame(fields)
    return _frame({"t": "d", "n": rec.seq, "g": rec.group, "s": rec.shard, "c": rec.checkpoint})


def _snapshot_bytes(shards: Sequence[_Shard], seq: int) -> bytes:
    lines = [_frame({"t": "snap", "v": FORMAT_VERSION, "seq": seq, "shards": len(shards)})]
    lines.extend(
        _frame(
            {"t": "s", "g": r.group, "s": r.shard, "l": r.latest, "u": r.consumer, "k": r.committed}
        )
        for r in shards
    )
    return b"".join(lines)


# --- decoding ------------------------------------------------------------------------------


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Malformed(key)
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Malformed(key)
    return value


def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Malformed(key)
    return value


def _opt_count(obj: dict[str, Any], key: str) -> int | None:
    return None if obj.get(key) is None else _count(obj, key)


def _decode(obj: dict[str, Any], path: Path) -> _Record:
    kind = obj.get("t")
    if kind == "a":
        return _Accepted(
            _count(obj, "n"), _str(obj, "g"), _count(obj, "s"), _str(obj, "c"), _opt_str(obj, "u")
        )
    if kind == "c":
        return _Committed(
            _count(obj, "n"),
            _str(obj, "g"),
            _count(obj, "s"),
            _str(obj, "c"),
            _opt_count(obj, "l"),
            _opt_count(obj, "o"),
        )
    if kind == "d":
        return _Dropped(_count(obj, "n"), _str(obj, "g"), _count(obj, "s"), _str(obj, "c"))
    if kind == "s":
        return ShardRecord(
            _str(obj, "g"), _count(obj, "s"), _str(obj, "l"), _opt_str(obj, "u"), _opt_str(obj, "k")
        )
    if kind == "snap":
        if obj.get("v") != FORMAT_VERSION:
            raise JournalError(f"{path}: format version {obj.get('v')!r} is not supported")
        return _SnapshotHeader(_count(obj, "seq"), _count(obj, "shards"))
    raise _Malformed("t")


def _parse_line(line: bytes, path: Path) -> _Record | None:
    """One framed line to a record, or None if it is torn, corrupt or not understood."""
    match = _LINE.fullmatch(line)
    if match is None or zlib.crc32(match[2]) != int(match[1], 16):
        return None
    try:
        obj = json.loads(match[2])
        return _decode(obj, path) if isinstance(obj, dict) else None
    except (ValueError, _Malformed):
        return None


def _scan(path: Path) -> _Scan:
    """Read every line of a journal file, keeping the valid records and noting the damage."""
    scan = _Scan()
    offset = 0
    bad: list[int] = []  # damaged lines since the last valid record
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        for line in f:
            start, offset = offset, offset + len(line)
            if line == b"\n":
                continue  # the resynchronisation newline written after an uncut partial write
            record = _parse_line(line, path)
            if record is None:
                bad.append(start)
                continue
            scan.corrupt.extend(bad)
            bad.clear()
            scan.records.append(record)
            scan.good_end = offset
    scan.torn_at = bad[0] if bad else None
    return scan


def _warn_damage(path: Path, scan: _Scan) -> None:
    for offset in scan.corrupt:
        log.warning("journal %s: corrupt record at offset %d skipped", path, offset)
    if scan.torn_at is not None:
        log.warning(
            "journal %s: torn or corrupt tail from offset %d dropped (valid records end at %d)",
            path,
            scan.torn_at,
            scan.good_end,
        )


# --- in-memory state -----------------------------------------------------------------------


def _accept(shards: dict[_Key, _Shard], rec: _Accepted) -> _Undo:
    """Apply an accepted record; return what undoes it."""
    key = (rec.group, rec.shard)
    prev = shards.get(key)
    committed = prev.committed if prev else None
    new = _Shard(rec.group, rec.shard, rec.checkpoint, rec.consumer, committed, rec.seq)
    shards[key] = new
    return key, new, prev


def _commit(shards: dict[_Key, _Shard], rec: _Committed) -> None:
    key = (rec.group, rec.shard)
    prev = shards.get(key)
    if prev is None or _lost_newer_than(prev, rec):
        # Replay lacks the record that held the latest value when this one was written, so
        # what it has instead may be older than the committed value, and committing that
        # would move SLS backwards: the committed value is the baseline.
        seq = rec.latest_seq if rec.latest_seq is not None else rec.seq
        shards[key] = _Shard(rec.group, rec.shard, rec.checkpoint, None, rec.checkpoint, seq)
    else:
        shards[key] = dataclasses.replace(prev, committed=rec.checkpoint)


def _lost_newer_than(prev: _Shard, rec: _Committed) -> bool:
    """Whether `prev` misses the latest value `rec` was written against and is older than the
    committed value (when it was older than that latest, cursors tell the order)."""
    if rec.latest_seq is not None:
        return prev.seq < rec.latest_seq
    if rec.older_than is None or prev.seq >= rec.older_than:
        return False
    ours, committed = decode_cursor(prev.latest), decode_cursor(rec.checkpoint)
    return ours is not None and committed is not None and ours < committed


def _drop(shards: dict[_Key, _Shard], rec: _Dropped) -> None:
    """The dropped value stops being pending and a baseline, as in the store; a newer value
    accepted since stays."""
    key = (rec.group, rec.shard)
    prev = shards.get(key)
    if prev is None or prev.latest != rec.checkpoint:
        return
    if prev.committed is None:
        del shards[key]
    else:
        shards[key] = dataclasses.replace(prev, latest=prev.committed, consumer=None, seq=rec.seq)


def _undo(shards: dict[_Key, _Shard], undo: Iterable[_Undo]) -> None:
    for key, new, prev in reversed(list(undo)):
        if shards.get(key) is not new:
            continue  # a newer accepted value replaced it
        if prev is None:
            del shards[key]
        else:
            shards[key] = prev


# --- files ---------------------------------------------------------------------------------


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


def _sorted(shards: Iterable[_Shard]) -> list[_Shard]:
    return sorted(shards, key=lambda r: (r.group, r.shard))


class Journal:
    """Append-only, checksummed, compacted log of accepted checkpoints in one directory.

    `open()` (sync, before the socket opens) locks the directory and replays it; then `start()`.
    Call `record_accepted` before acknowledging a commit and `record_committed` once SLS took
    one. With `always`, no writer returns before the fsync that covers its record and all writers
    of one loop turn share that fsync; `batch` fsyncs at most `fsync_interval` after a write, in
    the background (a process crash loses nothing, a power loss at most that window); `never`
    leaves it to the kernel. Compaction fsyncs in every mode: the snapshot replaces the log.

    After a failed fsync the kernel may have dropped the pages while later fsyncs report success,
    so the journal rewrites its whole state into a new snapshot before it calls anything durable
    again. Records refused that way are left out of it (a crash before that rewrite may still
    replay them).
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        fsync: FsyncMode = "batch",
        fsync_interval: float = 0.1,
        compact_bytes: int = 4 * 1024 * 1024,
        fsync_fn: Callable[[int], None] = os.fsync,
        write_fn: WriteFn = os.write,
    ) -> None:
        if fsync not in FSYNC_MODES:
            raise ValueError(f"fsync must be one of {', '.join(FSYNC_MODES)}, not {fsync!r}")
        if fsync_interval <= 0 or compact_bytes <= 0:
            raise ValueError("fsync_interval and compact_bytes must be > 0")
        self._dir = Path(directory)
        self._mode: FsyncMode = fsync
        self._interval = fsync_interval
        self._compact_bytes = compact_bytes
        self._fsync = fsync_fn
        self._write = write_fn
        self._shards: dict[_Key, _Shard] = {}
        self._seq = 0  # of the last record written
        self._lock_fd: int | None = None
        self._log_fd: int | None = None
        self._offset = 0  # size of the log; every write appends
        self._compact_at = compact_bytes
        self._resync = False  # a partial record could not be cut off: start the next with \n
        self._unsynced = False
        self._needs_rewrite = False
        self._failing = False
        self._closed = False
        self._next_sync: _SyncGroup | None = None
        self._sync_task: asyncio.Task[None] | None = None
        self._batch_task: asyncio.Task[None] | None = None
        self._dirty = asyncio.Event()
        self._dirty_since = 0.0  # monotonic time of the first write not yet fsynced (batch)
        self._closing = asyncio.Event()

    @property
    def directory(self) -> Path:
        return self._dir

    @property
    def size_bytes(self) -> int:
        """Bytes of the files in the directory (once it exists), for tests and metrics."""
        with os.scandir(self._dir) as entries:
            return sum(e.stat().st_size for e in entries if e.is_file(follow_symlinks=False))

    # --- lifecycle -------------------------------------------------------------------------

    def open(self) -> list[ShardRecord]:
        """Create (0700) and lock the directory, replay snapshot and log, return the state.

        Raises JournalLocked if another live process holds the directory, JournalError if it
        cannot be used."""
        if self._closed or self._lock_fd is not None:
            raise JournalError(f"journal in {self._dir} was already opened")
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = _acquire_lock(self._dir / LOCK_NAME)
        except OSError as exc:
            raise JournalError(f"cannot use state dir {self._dir}: {exc}") from exc
        try:
            self._replay()
        except OSError as exc:
            self._release()
            raise JournalError(f"cannot replay the journal in {self._dir}: {exc}") from exc
        except BaseException:
            self._release()
            raise
        return [shard.public() for shard in _sorted(self._shards.values())]

    async def start(self) -> None:
        """Start the background fsync task (batch mode only)."""
        if self._mode == "batch" and self._batch_task is None and not self._closed:
            self._batch_task = asyncio.get_running_loop().create_task(
                self._batch_loop(), name="cpmgr-journal-fsync"
            )

    async def close(self) -> None:
        """Answer waiting writers, fsync what is left, stop tasks, release the lock."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._dirty.set()
        if self._batch_task is not None:
            await self._batch_task
        if self._sync_task is not None:
            await self._sync_task
        if self._log_fd is not None and self._mode != "never":
            error = await self._sync_log()
            if error is not None:
                log.error("journal in %s: final fsync failed: %s", self._dir, error)
        self._release()

    def _release(self) -> None:
        for fd in (self._log_fd, self._lock_fd):
            if fd is not None:
                os.close(fd)  # closing the lock's only fd releases the flock
        self._log_fd = self._lock_fd = None

    # --- replay ----------------------------------------------------------------------------

    def _replay(self) -> None:
        self._shards.clear()
        with contextlib.suppress(FileNotFoundError):
            (self._dir / SNAPSHOT_TMP_NAME).unlink()  # left by an interrupted compaction
        covers, snap_damaged = self._replay_snapshot(self._dir / SNAPSHOT_NAME)
        log_path = self._dir / LOG_NAME
        scan = _scan(log_path)
        _warn_damage(log_path, scan)
        skipped = self._replay_log(scan.records, covers)
        if scan.torn_at is not None:
            os.truncate(log_path, scan.good_end)
        self._open_log(log_path)
        if snap_damaged or scan.corrupt or skipped:
            # Rewrite clean files now rather than warn (or skip) at every start.
            self.maybe_compact(force=True)
        else:
            self.maybe_compact()
        log.info(
            "journal replayed from %s: %d shards, %d pending",
            self._dir,
            len(self._shards),
            sum(1 for r in self._shards.values() if r.latest != r.committed),
        )

    def _replay_snapshot(self, path: Path) -> tuple[int | None, bool]:
        """Load the snapshot; return the last log sequence number it holds (None if it cannot
        be trusted to hold them all) and whether it is damaged."""
        scan = _scan(path)
        _warn_damage(path, scan)
        shards = [r for r in scan.records if isinstance(r, ShardRecord)]
        first = scan.records[0] if scan.records else None
        header = first if isinstance(first, _SnapshotHeader) else None
        seq = header.seq if header else 0  # every value in it is at most that new
        self._shards.update(
            ((r.group, r.shard), _Shard(r.group, r.shard, r.latest, r.consumer, r.committed, seq))
            for r in shards
        )
        whole = header is not None and header.shards == len(shards)
        if header is not None and not whole:
            log.warning("journal %s holds %d of %d shards", path, len(shards), header.shards)
        damaged = scan.damaged or (bool(scan.records) and not whole)
        self._seq = header.seq if header else 0
        # A damaged snapshot may miss what the log still has: re-apply the whole log then.
        return (header.seq if header and not damaged else None), damaged

    def _replay_log(self, records: Iterable[_Record], covers: int | None) -> int:
        """Apply the log records the snapshot does not hold; return how many it did hold."""
        skipped = 0
        for rec in records:
            if not isinstance(rec, _Accepted | _Committed | _Dropped):
                continue
            self._seq = max(self._seq, rec.seq)
            if covers is not None and rec.seq <= covers:
                skipped += 1
            elif isinstance(rec, _Accepted):
                _accept(self._shards, rec)
            elif isinstance(rec, _Committed):
                _commit(self._shards, rec)
            else:
                _drop(self._shards, rec)
        return skipped

    def _open_log(self, path: Path) -> None:
        created = not path.exists()
        self._log_fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        self._offset = os.fstat(self._log_fd).st_size
        if created and self._mode != "never":
            self._fsync_dir()  # make the new file's directory entry durable

    def _fsync_dir(self) -> None:
        fd = os.open(self._dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            self._fsync(fd)
        finally:
            os.close(fd)

    # --- writing ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._log_fd is None or self._closed:
            raise JournalError(f"journal in {self._dir} is not open")

    def _append(self, records: Sequence[_LogRecord]) -> None:
        """Write whole records at the end of the log; on failure cut off whatever got written."""
        assert self._log_fd is not None
        data = b"".join(_encode(rec) for rec in records)
        if self._resync:
            data = b"\n" + data
        start = self._offset
        try:
            _write_all(self._write, self._log_fd, data)
        except OSError:
            self._discard_tail(self._log_fd, start)
            raise
        self._offset += len(data)
        self._resync = False
        self._unsynced = True

    def _discard_tail(self, fd: int, start: int) -> None:
        try:
            os.ftruncate(fd, start)
        except OSError:
            # The partial record stays; a newline before the next one makes replay skip it
            # as a corrupt line instead of gluing it to a valid record.
            self._resync = True
            with contextlib.suppress(OSError):
                self._offset = os.fstat(fd).st_size

    def _next_seq(self) -> int:
        self._seq += 1
        return self._seq

    async def record_accepted(self, entries: Sequence[tuple[str, int, str, str | None]]) -> None:
        """Persist accepted (group, shard, checkpoint, consumer) entries before they are
        acknowledged; JournalError means they were not persisted and must not be accepted."""
        self._check_open()
        if not entries:
            return
        records = [_Accepted(self._next_seq(), g, s, c, u) for g, s, c, u in entries]
        try:
            self._append(records)
        except OSError as exc:
            self._note_failure("write", exc)
            raise JournalError(f"could not write the journal in {self._dir}: {exc}") from exc
        self._note_success()
        undo = [_accept(self._shards, rec) for rec in records]
        self.maybe_compact()
        if self._mode == "always":
            await self._await_sync(undo)
        elif self._mode == "batch":
            self._mark_dirty()

    def _mark_dirty(self) -> None:
        if not self._dirty.is_set():
            self._dirty_since = time.monotonic()
            self._dirty.set()

    def record_committed(self, group: str, shard: int, checkpoint: str) -> None:
        """Note a value SLS confirmed; not fsynced (losing it only repeats an idempotent
        commit). Errors are logged, not raised."""
        state = self._shards.get((group, shard))
        is_latest = state is not None and state.latest == checkpoint
        self._note_outcome(
            _Committed(
                self._next_seq(),
                group,
                shard,
                checkpoint,
                latest_seq=state.seq if state and is_latest else None,
                older_than=state.seq if state and not is_latest else None,
            )
        )

    def record_dropped(self, group: str, shard: int, checkpoint: str) -> None:
        """Note a value SLS refused for good, so a restart does not make it pending again.
        Not fsynced (losing it only repeats a refused commit). Errors are logged, not raised."""
        self._note_outcome(_Dropped(self._next_seq(), group, shard, checkpoint))

    def _note_outcome(self, rec: _Committed | _Dropped) -> None:
        if self._log_fd is None or self._closed:
            return
        if isinstance(rec, _Committed):
            _commit(self._shards, rec)
        else:
            _drop(self._shards, rec)
        try:
            self._append([rec])
        except OSError as exc:
            self._note_failure("write", exc)
            return
        self._note_success()
        self.maybe_compact()

    def _note_failure(self, what: str, exc: OSError) -> None:
        # One error line per outage, not one per refused commit.
        if self._failing:
            log.debug("journal %s failed in %s: %s", what, self._dir, exc)
        else:
            log.error("journal %s failed in %s: %s", what, self._dir, exc)
        self._failing = True

    def _note_success(self) -> None:
        if self._failing:
            log.warning("journal in %s is writable again", self._dir)
        self._failing = False

    # --- fsync -----------------------------------------------------------------------------

    async def _await_sync(self, undo: list[_Undo]) -> None:
        group = self._next_sync
        if group is None:
            loop = asyncio.get_running_loop()
            group = self._next_sync = _SyncGroup(loop.create_future())
            if self._sync_task is None:
                # Scheduled, not run: every writer of this loop turn joins the group first.
                self._sync_task = loop.create_task(self._sync_loop(), name="cpmgr-journal-sync")
        group.undo.extend(undo)
        error = await asyncio.shield(group.done)
        if error is not None:
            raise JournalError(f"could not fsync the journal in {self._dir}: {error}") from error

    async def _sync_loop(self) -> None:
        """One fsync per group; writers that arrive during an fsync form the next group."""
        try:
            while (group := self._next_sync) is not None:
                self._next_sync = None
                try:
                    error = await self._sync_log()
                except BaseException:
                    group.done.set_result(OSError(errno.EIO, "journal fsync was interrupted"))
                    raise
                if error is not None:
                    _undo(self._shards, group.undo)
                    self.maybe_compact()  # the rewrite, before anything else is written
                group.done.set_result(error)
        finally:
            self._sync_task = None
            if (pending := self._next_sync) is not None:  # only if this task was interrupted
                self._next_sync = None
                pending.done.set_result(OSError(errno.EIO, "journal fsync was interrupted"))

    async def _sync_log(self) -> OSError | None:
        """Make everything written so far durable; return the error instead of raising it."""
        if self._needs_rewrite and not self.maybe_compact():
            return OSError(errno.EIO, "the journal could not be rewritten after a failed fsync")
        fd = self._log_fd
        if fd is None or not self._unsynced:
            return None
        self._unsynced = False
        try:
            await asyncio.to_thread(self._fsync, fd)
        except OSError as exc:
            self._unsynced = self._needs_rewrite = True
            self._note_failure("fsync", exc)
            return exc
        except BaseException:
            self._unsynced = True  # cancelled: whether the fsync finished is unknown
            raise
        return None

    async def _batch_loop(self) -> None:
        """Fsync at most `fsync_interval` after the first unsynced write; sleep while idle."""
        while not self._closing.is_set():
            await self._dirty.wait()
            # Counted from the first unsynced write, so the time an fsync takes does not
            # stretch the window a power loss can cost.
            delay = max(0.0, self._dirty_since + self._interval - time.monotonic())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), delay)
            self._dirty.clear()
            if self._closing.is_set():
                return  # close() does the final fsync
            if await self._sync_log() is not None:
                self._mark_dirty()  # try again (with a rewrite) next interval

    # --- compaction ------------------------------------------------------------------------

    def maybe_compact(self, *, force: bool = False) -> bool:
        """Compact when the log outgrew its threshold, must be rewritten or `force`; return
        whether a new snapshot was written. Failures are logged, not raised."""
        due = force or self._needs_rewrite or self._offset >= self._compact_at
        if self._log_fd is None or not due:
            return False
        try:
            self._compact(self._log_fd)
        except OSError as exc:
            self._note_failure("compaction", exc)
            # Retry after another threshold's worth of log, not on every record.
            self._compact_at = self._offset + self._compact_bytes
            return False
        return True

    def _compact(self, log_fd: int) -> None:
        """Write the state per shard into a new snapshot (tmp, fsync, rename, fsync dir), then
        empty the log. Synchronous: bounded by the number of shards, and rare."""
        shards = _sorted(self._shards.values())
        data = _snapshot_bytes(shards, self._seq)
        self._write_snapshot(data)
        self._needs_rewrite = self._unsynced = False
        self._compact_at = self._offset + max(self._compact_bytes, len(data))
        try:
            os.ftruncate(log_fd, 0)
        except OSError as exc:
            # The snapshot's sequence number already makes replay skip those records.
            self._note_failure("truncation", exc)
            return
        self._offset = 0
        self._resync = False  # the partial record went with the rest
        self._compact_at = max(self._compact_bytes, len(data))
        log.debug("journal compacted: %d shards, snapshot of %d bytes", len(shards), len(data))

    def _write_snapshot(self, data: bytes) -> None:
        tmp = self._dir / SNAPSHOT_TMP_NAME
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
        os.replace(tmp, self._dir / SNAPSHOT_NAME)
        self._fsync_dir()
