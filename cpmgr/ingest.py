"""The Unix socket server: read a line, parse it, act on the store, answer in order.

Decisions where the contract is silent:
- `max_line_bytes` counts a line's bytes without its newline.
- The socket's parent directory is created (mode 0755) only if it is missing. The socket is
  bound under umask 0177 and then chmod'ed to `socket.mode`, so it is never briefly wider.
- An existing path is replaced only if it is a socket nobody answers on; a live socket or a
  file that is not a socket is an error.
- A peer outside `socket.allowed_uids` is answered `Forbidden` as soon as it connects, before
  anything it sends is read. Where SO_PEERCRED is unavailable, a non-empty allow-list refuses
  every peer.
- During a drain (`stop_accepting()`) the socket keeps listening: commits answer `ShuttingDown`,
  every other op still works. `close()` lets requests being handled finish (for up to
  `grace` seconds; those cut off answer `ShuttingDown`), then closes every connection.
- A batch's `accepted` counts distinct shards (a shard given twice counts once).
- With a journal, a commit is checked, written, made durable, then applied. Values between
  check and apply are reserved, so an older value racing a newer one is refused before it is
  written and can never become the newest in the journal. Journaled commits pipelined on one
  connection run concurrently so they share fsyncs; their answers still go out in order, and
  any other request waits for them first.
- A batch commit with `wait` that fails answers with the first failed shard's code (and its
  `dropped`), plus a top-level `failed` list like `flush`.
- An unexpected exception while handling a request answers `InternalError`; the connection
  stays usable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any, Final, Protocol

from cpmgr import __version__
from cpmgr.config import Config
from cpmgr.errors import CpmgrError, ProtocolError, SLSError
from cpmgr.outcomes import CommitOutcome, FlushResult
from cpmgr.protocol import (
    NO_ID,
    CommitRequest,
    FlushRequest,
    GetRequest,
    PingRequest,
    Request,
    RequestError,
    RequestId,
    StatusRequest,
    decode_cursor,
    encode_error,
    encode_failure,
    encode_ok,
    is_blank,
    parse_request,
)
from cpmgr.sls.client import RemoteCheckpoint
from cpmgr.store import CheckpointStore, ShardView

__all__ = [
    "CommitterLike",
    "Dispatcher",
    "Handlers",
    "IngestObserver",
    "IngestServer",
    "JournalLike",
]

log = logging.getLogger(__name__)

Fields = dict[str, object]

# Answers of a pipelined burst are written together; past this many bytes they go out at once.
_FLUSH_BYTES: Final = 64 * 1024
_MAX_PIPELINED: Final = 1024  # journaled commits in progress per connection
_PROBE_TIMEOUT: Final = 1.0
_PEERCRED: Final = struct.Struct("3i")


# --- the seams: what the ingest needs from its collaborators ----------------------------------


class CommitterLike(Protocol):
    """What `wait`, `flush` and `get` with `remote` need from the committer."""

    async def wait_for(self, group: str, shard: int, seq: int, timeout: float) -> CommitOutcome: ...
    async def flush(self, *, group: str | None = None, timeout: float) -> FlushResult: ...
    async def remote(
        self, group: str, shard: int | None = None
    ) -> Mapping[int, RemoteCheckpoint]: ...


class JournalLike(Protocol):
    """Persists accepted (group, shard, checkpoint, consumer) entries before they are
    acknowledged; raising means they are not accepted."""

    async def record_accepted(
        self, entries: Sequence[tuple[str, int, str, str | None]]
    ) -> None: ...


class IngestObserver(Protocol):
    """Receives what the socket side does (metrics.Metrics fits); every method must be cheap."""

    def checkpoints_received(self, group: str, count: int = 1) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def request_error(self, code: str) -> None: ...


class _NullObserver:
    def checkpoints_received(self, group: str, count: int = 1) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def request_error(self, code: str) -> None:
        pass


class Handlers(Protocol):
    """One method per op: the success answer's fields, or a ProtocolError."""

    async def commit(self, request: CommitRequest) -> Fields: ...
    async def flush(self, request: FlushRequest) -> Fields: ...
    async def get(self, request: GetRequest) -> Fields: ...
    async def status(self, request: StatusRequest) -> Fields: ...
    async def ping(self, request: PingRequest) -> Fields: ...


# --- the ops --------------------------------------------------------------------------------


class Dispatcher:
    """The ops of CONTRACT.md section 3 over the store, the committer and the journal.

    Without a committer, `wait`, `flush` and `get` with `remote` answer BadRequest
    ("... not available"), before anything is accepted.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        config: Config,
        committer: CommitterLike | None = None,
        journal: JournalLike | None = None,
        observer: IngestObserver | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._committer = committer
        self._journal = journal
        self._observer: IngestObserver = observer or _NullObserver()
        self._status = status
        self._clock = clock
        self._started = clock()
        # With a journal, a value is checked, written, made durable, then applied. Values
        # between check and apply are reserved, so a concurrent older value is refused before
        # it is written: otherwise it could follow a newer one in the journal and become the
        # baseline after a restart. (A lock per group would do it too, but would defeat the
        # group commit of fsync: always.) Key -> (newest reserved cursor, how many reserved).
        self._reserved: dict[tuple[str, int], tuple[int | None, int]] = {}
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        """Take the groups and the default wait timeout of a (reloaded) config."""
        self._groups: frozenset[str] = frozenset(g.name for g in config.groups)
        self._wait_timeout = config.commit.wait_timeout

    def _require_group(self, group: str) -> None:
        if group not in self._groups:
            raise ProtocolError("UnknownGroup", f"unknown group {group!r}")

    def _require_committer(self, what: str) -> CommitterLike:
        if self._committer is None:
            raise ProtocolError("BadRequest", f"{what} is not available")
        return self._committer

    # --- commit -----------------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> Fields:
        self._require_group(request.group)
        committer = self._require_committer("wait") if request.wait else None
        seqs = await self._accept(request)
        self._observer.checkpoints_received(request.group, len(request.items))
        if committer is not None:
            await self._wait(committer, request, seqs)
        return {"accepted": len(request.items)} if request.batch else {}

    async def _accept(self, request: CommitRequest) -> dict[int, int]:
        if self._journal is None:
            return self._apply(request)
        self._check(request)
        self._check_reserved(request)
        keys = self._reserve(request)
        entries = [(request.group, i.shard, i.checkpoint, i.consumer) for i in request.items]
        try:
            await self._journal.record_accepted(entries)
        except CpmgrError as exc:
            raise ProtocolError("JournalError", f"not accepted: {exc}") from exc
        except asyncio.CancelledError:
            # The record is written (the journal writes before it waits for the fsync): the
            # value must reach the store too, or after a restart the journal would hold a
            # value the store never had. No answer goes out, so applying it is harmless.
            with contextlib.suppress(ProtocolError):
                self._apply(request)
            raise
        finally:
            self._unreserve(keys)
        # A reload may have removed the group while the journal was writing.
        self._require_group(request.group)
        return self._apply(request)

    def _check(self, request: CommitRequest) -> None:
        if request.batch:
            self._store.check_batch(request.group, request.items, force=request.force)
        else:
            item = request.items[0]
            self._store.check(request.group, item.shard, item.checkpoint, force=request.force)

    def _check_reserved(self, request: CommitRequest) -> None:
        if request.force:
            return
        for item in request.items:
            reserved = self._reserved.get((request.group, item.shard))
            if reserved is None or reserved[0] is None:
                continue  # the common case: nothing in between check and apply for this shard
            number = decode_cursor(item.checkpoint)
            if number is None or number >= reserved[0]:
                continue
            where = f"checkpoints[{item.index}]: " if request.batch else ""
            raise ProtocolError(
                "CheckpointRegression",
                f"{where}shard {item.shard}: checkpoint {item.checkpoint} is older than a "
                "value being accepted (set force to move it back)",
            )

    def _reserve(self, request: CommitRequest) -> list[tuple[str, int]]:
        keys = []
        for item in request.items:
            key = (request.group, item.shard)
            number = decode_cursor(item.checkpoint)
            newest, count = self._reserved.get(key, (number, 0))
            if request.force or newest is None or (number is not None and number > newest):
                newest = number
            self._reserved[key] = (newest, count + 1)
            keys.append(key)
        return keys

    def _unreserve(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            newest, count = self._reserved[key]
            if count <= 1:
                del self._reserved[key]
            else:
                self._reserved[key] = (newest, count - 1)

    def _apply(self, request: CommitRequest) -> dict[int, int]:
        if request.batch:
            return self._store.accept_batch(request.group, request.items, force=request.force)
        item = request.items[0]
        seq = self._store.accept(
            request.group,
            item.shard,
            item.checkpoint,
            consumer=item.consumer,
            force=request.force,
        )
        return {item.shard: seq}

    async def _wait(
        self, committer: CommitterLike, request: CommitRequest, seqs: Mapping[int, int]
    ) -> None:
        timeout = request.timeout or self._wait_timeout
        shards = list(seqs)
        outcomes = await asyncio.gather(
            *(committer.wait_for(request.group, s, seqs[s], timeout) for s in shards)
        )
        failed = [(s, o) for s, o in zip(shards, outcomes, strict=True) if not o.ok]
        if not failed:
            return
        errors = [(s, o) for s, o in failed if o.code != "Timeout"] or failed
        shard, first = errors[0]
        fields: Fields = {}
        if request.batch:
            fields["failed"] = [
                _failure(request.group, s, o.code, o.message, o.dropped) for s, o in errors
            ]
        message = f"shard {shard}: {first.message}" if request.batch else first.message
        raise RequestError(
            first.code, message, error_fields={"dropped": first.dropped}, fields=fields
        )

    # --- flush, get, status, ping -----------------------------------------------------

    async def flush(self, request: FlushRequest) -> Fields:
        if request.group is not None:
            self._require_group(request.group)
        committer = self._require_committer("flush")
        result = await committer.flush(
            group=request.group, timeout=request.timeout or self._wait_timeout
        )
        if result.failed:
            failed = [
                _failure(f.group, f.shard, f.code, f.message, f.dropped) for f in result.failed
            ]
            more = " (and some timed out)" if result.timed_out else ""
            raise RequestError(
                "CommitFailed",
                f"{len(failed)} shard(s) could not be committed{more}",
                fields={"committed": result.committed, "failed": failed},
            )
        if result.timed_out:
            raise RequestError(
                "Timeout",
                "some shards are still pending",
                fields={"committed": result.committed},
            )
        return {"committed": result.committed}

    async def get(self, request: GetRequest) -> Fields:
        self._require_group(request.group)
        group = request.group
        if request.shard is not None:
            views: dict[int, ShardView | None] = {
                request.shard: self._store.shard_view(group, request.shard)
            }
        else:
            views = {view.shard: view for view in self._store.shard_views(group)}
        if not request.remote:
            return {"shards": [_shard_entry(group, s, v) for s, v in views.items()]}
        remote = await self._remote(group, request.shard)
        if request.shard is None:
            views.update({s: None for s in remote if s not in views})
        entries = []
        for shard in sorted(views):
            entry = _shard_entry(group, shard, views[shard])
            entry["remote"] = _remote_entry(remote.get(shard))
            entries.append(entry)
        return {"shards": entries}

    async def _remote(self, group: str, shard: int | None) -> Mapping[int, RemoteCheckpoint]:
        committer = self._require_committer("remote")
        try:
            return await committer.remote(group, shard)
        except SLSError as exc:
            raise ProtocolError(exc.code, exc.message) from exc

    async def status(self, request: StatusRequest) -> Fields:
        if self._status is not None:
            return {k: v for k, v in self._status().items() if k != "ok"}
        return {
            "version": __version__,
            "uptime_seconds": round(self._clock() - self._started, 3),
            "groups": {
                name: self._store.group_status(name)
                for name in self._store.groups()
                if name in self._groups
            },
        }

    async def ping(self, request: PingRequest) -> Fields:
        return {}


def _failure(group: str, shard: int, code: str, message: str, dropped: bool) -> Fields:
    return {"group": group, "shard": shard, "code": code, "message": message, "dropped": dropped}


def _shard_entry(group: str, shard: int, view: ShardView | None) -> Fields:
    error = view.last_error if view is not None else None
    return {
        "group": group,
        "shard": shard,
        "pending": view.pending if view is not None else None,
        "committed": view.committed if view is not None else None,
        "committed_at": view.committed_at if view is not None else None,
        "last_error": (
            {"code": error.code, "message": error.message, "at": error.at} if error else None
        ),
    }


def _remote_entry(entry: RemoteCheckpoint | None) -> Fields | None:
    if entry is None:
        return None
    return {
        "checkpoint": entry.checkpoint,
        "update_time": entry.update_time,
        "consumer": entry.consumer,
    }


async def dispatch(handlers: Handlers, request: Request) -> Fields:
    """Route a request to the handler of its op."""
    if isinstance(request, CommitRequest):
        return await handlers.commit(request)
    if isinstance(request, FlushRequest):
        return await handlers.flush(request)
    if isinstance(request, GetRequest):
        return await handlers.get(request)
    if isinstance(request, StatusRequest):
        return await handlers.status(request)
    return await handlers.ping(request)


# --- the socket file ------------------------------------------------------------------------


def _clear_stale_socket(path: str) -> None:
    """Remove a socket file nobody answers on; refuse a live socket or a non-socket file."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise CpmgrError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(_PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)
        log.info("removed stale socket %s", path)
        return
    except FileNotFoundError:
        return
    except TimeoutError:
        pass  # a full accept backlog: somebody is listening
    except OSError as exc:
        raise CpmgrError(f"cannot check the existing socket {path}: {exc}") from exc
    finally:
        probe.close()
    raise CpmgrError(f"{path}: another process is already listening (is cpmgr running?)")


def _bind(path: str, mode: int) -> socket.socket:
    """A listening-ready Unix socket at `path` with permissions `mode`."""
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, mode=0o755, exist_ok=True)
    _clear_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # umask is process-wide, but this runs at startup before any thread creates files.
    old = os.umask(0o177)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise CpmgrError(f"cannot bind the socket {path}: {exc}") from exc
    finally:
        os.umask(old)
    os.chmod(path, mode)
    return sock


def peer_uid(sock: socket.socket | None) -> int | None:
    """The uid of the process at the other end of a Unix socket (SO_PEERCRED), if known."""
    option = getattr(socket, "SO_PEERCRED", None)
    if sock is None or option is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, option, _PEERCRED.size)
    except OSError:
        return None
    _pid, uid, _gid = _PEERCRED.unpack(raw)
    return int(uid)


# --- connections ----------------------------------------------------------------------------


class _Closed(Exception):
    """The connection must end (after its last answer)."""


class Connection:
    """One consumer connection: lines in, answers out in order, written in batches."""

    def __init__(
        self,
        server: IngestServer,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self._server = server
        self._reader = reader
        self._writer = writer
        self._out: list[bytes] = []
        self._out_bytes = 0
        self._flush_scheduled = False
        self._busy = False
        self._current: RequestId = NO_ID
        # Journaled commits of a pipelined burst run concurrently so that they share fsyncs;
        # their answers still leave in request order (see _answer_in_order).
        self._pending: collections.deque[tuple[RequestId, asyncio.Task[bytes]]] = (
            collections.deque()
        )

    @property
    def busy(self) -> bool:
        return self._busy or bool(self._pending)

    async def serve(self) -> None:
        """Answer requests until the peer leaves, a fatal error, or the server closes."""
        try:
            if not self._server.peer_allowed(self._writer):
                self._queue(encode_error(NO_ID, "Forbidden", "peer uid is not allowed"))
                self._server.observer.request_error("Forbidden")
                return
            while not self._server.closing:
                await self._writer.drain()  # waits only when the peer stops reading
                line = await self._read_line()
                await self._handle(line)
        except (_Closed, ConnectionError):
            pass
        finally:
            await self._finish()

    async def _read_line(self) -> bytes:
        try:
            return await self._reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial and not is_blank(exc.partial):
                # A last request without its newline still gets an answer.
                await self._handle(exc.partial)
            raise _Closed from None
        except asyncio.LimitOverrunError:
            limit = self._server.max_line_bytes
            log.warning("request line over %d bytes: closing the connection", limit)
            self._queue(
                encode_error(NO_ID, "RequestTooLarge", f"request line exceeds {limit} bytes")
            )
            self._server.observer.request_error("RequestTooLarge")
            raise _Closed from None

    async def _handle(self, line: bytes) -> None:
        if is_blank(line):
            return
        try:
            request = parse_request(line)
        except ProtocolError as exc:
            self._server.observer.request_error(exc.code)
            await self._settle_pending()
            self._queue(encode_failure(exc))
            return
        if self._server.runs_concurrently(request):
            await self._run_concurrently(request)
            return
        # Anything else sees the effect of every earlier request: let those finish first.
        await self._settle_pending()
        self._busy = True
        self._current = request.request_id
        try:
            answer = await self._answer(request)
        except asyncio.CancelledError:
            # close() ran out of patience: the request still gets its one answer.
            self._queue(encode_error(self._current, "ShuttingDown", "the daemon is closing"))
            raise
        finally:
            self._busy = False
            self._current = NO_ID
        self._queue(answer)

    async def _run_concurrently(self, request: Request) -> None:
        if len(self._pending) >= _MAX_PIPELINED:
            await asyncio.wait([self._pending[0][1]])  # backpressure on a very long burst
        task = asyncio.ensure_future(self._answer(request))
        self._pending.append((request.request_id, task))
        task.add_done_callback(lambda _: self._answer_in_order())

    def _answer_in_order(self) -> None:
        while self._pending and self._pending[0][1].done():
            request_id, task = self._pending.popleft()
            if task.cancelled():
                self._queue(encode_error(request_id, "ShuttingDown", "the daemon is closing"))
            else:
                self._queue(task.result())

    async def _settle_pending(self) -> None:
        if self._pending:
            await asyncio.wait([task for _, task in self._pending])
            self._answer_in_order()

    async def _answer(self, request: Request) -> bytes:
        try:
            fields = await self._server.handle(request)
            return encode_ok(request.request_id, **fields)
        except ProtocolError as exc:
            self._server.observer.request_error(exc.code)
            return encode_failure(exc, request.request_id)
        except Exception:
            log.exception("unexpected error handling a %s request", request.op)
            self._server.observer.request_error("InternalError")
            try:
                return encode_error(request.request_id, "InternalError", "see the daemon log")
            except ValueError:  # the id itself cannot be encoded: answer without it
                return encode_error(NO_ID, "InternalError", "see the daemon log")

    def _queue(self, answer: bytes) -> None:
        self._out.append(answer)
        self._out_bytes += len(answer)
        if self._out_bytes >= _FLUSH_BYTES:
            self._flush()
        elif not self._flush_scheduled:
            # Runs once this task yields, i.e. when no complete line is left in the buffer:
            # every answer of a pipelined burst goes out in one write.
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self._writer.is_closing():
            self._writer.write(b"".join(self._out))
        self._out.clear()
        self._out_bytes = 0

    async def _finish(self) -> None:
        tasks = [task for _, task in self._pending]
        if self._server.closing:
            for task in tasks:
                task.cancel()
        # A peer that half-closed still gets the answers to everything it sent.
        await asyncio.gather(*tasks, return_exceptions=True)
        self._answer_in_order()
        self._flush()
        self._writer.close()
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            await self._writer.wait_closed()


# --- the server -----------------------------------------------------------------------------


class IngestServer:
    """The socket server: `await start()`, `stop_accepting()`, idempotent `await close()`."""

    def __init__(
        self,
        config: Config,
        store: CheckpointStore,
        *,
        committer: CommitterLike | None = None,
        journal: JournalLike | None = None,
        metrics: IngestObserver | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        handlers: Handlers | None = None,
    ) -> None:
        self._socket = config.socket
        self.observer: IngestObserver = metrics or _NullObserver()
        self._dispatcher = Dispatcher(
            store,
            config=config,
            committer=committer,
            journal=journal,
            observer=self.observer,
            status=status,
        )
        self._handlers: Handlers = handlers or self._dispatcher
        self._journaled = journal is not None
        self._server: asyncio.Server | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: dict[asyncio.Task[Any], Connection] = {}
        self._accepting = True
        self.closing = False

    @property
    def path(self) -> str:
        return self._socket.path

    @property
    def max_line_bytes(self) -> int:
        return self._socket.max_line_bytes

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving."""
        if self._server is not None:
            return
        sock = _bind(self.path, self._socket.mode)
        info = os.stat(self.path)
        self._inode = (info.st_dev, info.st_ino)
        self._server = await asyncio.start_unix_server(
            self._on_connection, sock=sock, limit=self._socket.max_line_bytes
        )
        log.info("listening on %s (mode %04o)", self.path, self._socket.mode)

    def apply_config(self, config: Config) -> None:
        """Take the groups and wait timeout of a reloaded config (socket.* needs a restart)."""
        self._dispatcher.apply_config(config)

    def stop_accepting(self) -> None:
        """From now on commits answer ShuttingDown; other ops keep working."""
        self._accepting = False

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop listening, let requests being handled finish (up to `grace` seconds), then
        close every connection and remove the socket file. Idempotent."""
        self._accepting = False
        self.closing = True
        if self._server is not None:
            self._server.close()
            self._remove_socket_file()
        idle = [task for task, conn in self._connections.items() if not conn.busy]
        for task in idle:
            task.cancel()
        tasks = set(self._connections)
        if tasks:
            _done, late = await asyncio.wait(tasks, timeout=grace)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def _remove_socket_file(self) -> None:
        # Only our own socket: a new daemon may already have replaced the file.
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)

    def peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        """Whether the peer's uid is in `socket.allowed_uids` (all are, if it is empty)."""
        allowed: Collection[int] = self._socket.allowed_uids
        if not allowed:
            return True
        uid = peer_uid(writer.get_extra_info("socket"))
        if uid is not None and uid in allowed:
            return True
        log.warning("refused a connection from uid %s (not in socket.allowed_uids)", uid)
        return False

    def runs_concurrently(self, request: Request) -> bool:
        """Journaled commits without `wait` may overlap, to share the journal's fsyncs."""
        return self._journaled and isinstance(request, CommitRequest) and not request.wait

    async def handle(self, request: Request) -> Fields:
        """Answer one request (ShuttingDown for commits once draining)."""
        if isinstance(request, CommitRequest) and not self._accepting:
            raise ProtocolError("ShuttingDown", "the daemon is shutting down")
        return await dispatch(self._handlers, request)

    async def _on_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = Connection(self, reader, writer)
        self._connections[task] = connection
        self.observer.connection_opened()
        try:
            await connection.serve()
        except asyncio.CancelledError:
            # Cancelled by close(): end quietly (asyncio logs a cancelled connection task).
            if not self.closing:
                raise
        finally:
            self._connections.pop(task, None)
            self.observer.connection_closed()
