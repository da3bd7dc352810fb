"""The Unix socket server: split input into lines, parse, act through the ops, answer in order.

Decisions where the contract is silent:
- `max_line_bytes` counts a line's bytes without its newline (`\\n` or `\\r\\n`).
- The socket's parent directory is created (mode 0755) only if it is missing. The socket is
  bound under umask 0177 and then chmod'ed to `socket.mode`, so it is never briefly wider.
- An existing path is replaced only if it is a socket nobody answers on; a live socket or a
  file that is not a socket is an error.
- A peer outside `socket.allowed_uids` is answered `Forbidden` as soon as it connects, before
  anything it sends is read. Where SO_PEERCRED is unavailable, a non-empty allow-list refuses
  every peer (and every group with its own `allowed_uids`).
- A connection above `max_connections`, or one that would leave fewer than a reserve of file
  descriptors below RLIMIT_NOFILE (for SLS, HTTP and the journal), gets `TooManyConnections`
  and is closed at once.
- A connection holding an unfinished line for `idle_timeout` gets a `Timeout` error line and is
  closed; one between requests is kept however long it is quiet.
- `max_buffered_bytes` counts unfinished lines and complete lines waiting behind a slow request
  on their connection. Above it, the connection holding the most gets `RequestTooLarge` and is
  closed; what it sent but was not answered is not accepted.
- Refusals and limit closes are logged at most once a minute per reason, with a count.
- During a drain (`stop_accepting()`) the socket keeps listening: commits answer `ShuttingDown`,
  every other op still works. `close()` lets requests being handled finish (for up to
  `grace` seconds; those cut off answer `ShuttingDown`), then closes every connection.
- Journaled commits pipelined on one connection run concurrently so they share fsyncs; their
  answers still go out in order, and any other request waits for them first. Requests that
  wait for nothing are answered in the same loop turn, all answers of a chunk in one write.
- While a connection has lines waiting behind a slow request, or the peer does not read its
  answers, the connection is not read from (the kernel's buffers push back on the peer).
- An unexpected exception while handling a request answers `InternalError`; the connection
  stays usable.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import resource
import socket
import stat
import struct
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from cpmgr.config import Config
from cpmgr.dispatch import (
    CommitterLike,
    Dispatcher,
    Fields,
    Handlers,
    IngestObserver,
    JournalLike,
    NullObserver,
    dispatch,
)
from cpmgr.errors import CpmgrError, ProtocolError
from cpmgr.protocol import (
    NO_ID,
    CommitRequest,
    FlushRequest,
    Request,
    RequestId,
    StatusRequest,
    encode_error,
    encode_failure,
    encode_ok,
    is_blank,
    parse_request,
)
from cpmgr.store import CheckpointStore

__all__ = [
    "CommitterLike",
    "Dispatcher",
    "Handlers",
    "IngestObserver",
    "IngestServer",
    "JournalLike",
]

log = logging.getLogger(__name__)

_MAX_PIPELINED: Final = 1024  # journaled commits in progress per connection
# Above this many bytes of answers waiting in the kernel-side buffer, the peer is not read.
_WRITE_HIGH_WATER: Final = 256 * 1024
_PROBE_TIMEOUT: Final = 1.0
_PEERCRED: Final = struct.Struct("3i")
# File descriptors kept free for everything but consumer connections: the SLS connection pool
# (sized by max_in_flight), the HTTP server and its scrapes, the journal, logging, DNS.
_FD_RESERVE: Final = 128
_LOG_EVERY: Final = 60.0
_BACKLOG: Final = 1024
_ACCEPT_BATCH: Final = 64
_REFUSAL_DRAIN_READS: Final = 4  # at most this many reads of what a refused peer sent
_MAX_LINGERING: Final = 64  # refused connections kept half-open at once
_LINGER: Final = 1.0  # seconds a refused connection is kept half-open at most
_ACCEPT_PAUSE: Final = 0.5  # after accept() failed for want of descriptors or memory
_ABORT_AFTER: Final = 1.0  # after close()'s grace and the cancellation of what still ran
_CR: Final = 13
_OPEN_BRACE: Final = 123


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


class _Refusals:
    """Refused connections: one error line, then closed. A few are kept half-open briefly, read
    and discarded until the peer closes: closing a Unix socket with unread input resets it, and
    a peer still sending could lose the line. Beyond that few, or when descriptors run short,
    they are closed at once."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._open: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}

    def refuse(self, conn: socket.socket, line: bytes, *, linger: bool) -> None:
        try:
            conn.send(line)  # one short line into an empty socket buffer
            if not linger or len(self._open) >= _MAX_LINGERING:
                raise BlockingIOError
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            _drain_and_close(conn)
            return
        fd = conn.fileno()
        self._loop.add_reader(fd, self._readable, fd)
        self._open[fd] = (conn, self._loop.call_later(_LINGER, self._close, fd))

    def _readable(self, fd: int) -> None:
        conn = self._open[fd][0]
        try:
            if conn.recv(65536):
                return
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            pass
        self._close(fd)

    def _close(self, fd: int) -> None:
        conn, timer = self._open.pop(fd)
        timer.cancel()
        self._loop.remove_reader(fd)
        conn.close()

    def close(self) -> None:
        for fd in list(self._open):
            self._close(fd)


def _drain_and_close(conn: socket.socket) -> None:
    with contextlib.suppress(OSError):
        for _ in range(_REFUSAL_DRAIN_READS):
            if not conn.recv(65536):
                break
    conn.close()


def _fd_ceiling(reserve: int) -> int:
    """The lowest descriptor number a consumer connection may not have."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 2**31
    return max(soft - reserve, 16)


class _QuietLog:
    """Logs a warning per reason at most once per `every` seconds, with how many it held back."""

    def __init__(self, every: float = _LOG_EVERY, clock: Callable[[], float] = time.monotonic):
        self._every = every
        self._clock = clock
        self._next: dict[str, float] = {}
        self._held: collections.Counter[str] = collections.Counter()

    def warning(self, reason: str, message: str, *args: object) -> None:
        now = self._clock()
        if now < self._next.get(reason, 0.0):
            self._held[reason] += 1
            return
        self._next[reason] = now + self._every
        held = self._held.pop(reason, 0)
        suffix = f" ({held} more like it in the last {self._every:g}s)" if held else ""
        log.warning(message + suffix, *args)


class _Acceptor:
    """Accepts connections itself: a refusal costs an accept, a send and a close (no transport),
    and running out of descriptors pauses accepting for a while instead of spinning."""

    def __init__(
        self, sock: socket.socket, on_accept: Callable[[socket.socket], None], quiet: _QuietLog
    ) -> None:
        self._sock = sock
        self._on_accept = on_accept
        self._quiet = quiet
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    def start(self) -> None:
        self._sock.setblocking(False)
        self._sock.listen(max(_BACKLOG, socket.SOMAXCONN))
        self._loop.add_reader(self._sock.fileno(), self._accept_some)

    def _accept_some(self) -> None:
        # A bounded batch per wake-up, so a flood of connects cannot hold the loop.
        for _ in range(_ACCEPT_BATCH):
            try:
                conn, _address = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                self._pause(exc)
                return
            self._on_accept(conn)

    def _pause(self, exc: OSError) -> None:
        self._quiet.warning(
            "accept",
            "cannot accept a socket connection (%s): accepting again in %gs",
            exc.strerror or exc,
            _ACCEPT_PAUSE,
        )
        self._loop.remove_reader(self._sock.fileno())
        self._timer = self._loop.call_later(_ACCEPT_PAUSE, self._resume)

    def _resume(self) -> None:
        self._timer = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_some)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._timer is not None:
            self._timer.cancel()
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()


# --- connections ----------------------------------------------------------------------------

# An answer, or the task that will produce it (with the id to answer if it is cancelled).
_Pending = tuple[tuple[RequestId, ...], asyncio.Task[list[bytes]]]
_Slot = bytes | _Pending
# A line waiting behind a slow request; None stands for "the next line was too long".
_Waiting = bytes | None


class _Connection(asyncio.Protocol):
    """One consumer connection: complete lines are answered in request order."""

    def __init__(self, server: IngestServer, uid: int | None) -> None:
        self._server = server
        self._limit = server.max_line_bytes
        self._transport: asyncio.Transport | None = None
        self.uid = uid
        self._partial = bytearray()  # the unfinished line
        self._partial_since: float | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._lines: collections.deque[_Waiting] = collections.deque()
        self._waiting_bytes = 0  # the size of those lines
        self._held: Request | None = None  # parsed, waiting for earlier requests to finish
        self._batch: list[CommitRequest] = []  # journaled commits journaled together
        self._slots: collections.deque[_Slot] = collections.deque()
        self._out: list[bytes] = []
        self._running = 0  # tasks answering requests of this connection
        self._resume_at = -1  # while blocked: handle lines again once _running is this low
        self.buffered = 0  # bytes of input held (unfinished line and waiting lines)
        self._write_paused = False
        self._read_paused = False
        self._input_done = False  # EOF, a fatal error or close(): no more lines are read
        self._lost = False
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def busy(self) -> bool:
        return self._running > 0

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        if not self._server.register(self):
            self._input_done = True
            transport.write(encode_error(NO_ID, "ShuttingDown", "the daemon is closing"))
            transport.close()

    def data_received(self, data: bytes) -> None:
        if self._input_done:
            return
        if self._partial:
            newline = data.find(b"\n")
            if newline < 0:
                self._partial += data
                self._after_input()
                return
            self._partial += data
            data = bytes(self._partial)
            self._partial.clear()
        lines = data.split(b"\n")
        tail = lines.pop()
        self._partial_since = None  # the unfinished line, if any, is a new one
        if tail:
            self._partial += tail
        self._lines.extend(lines)
        self._process()
        self._after_input()

    def eof_received(self) -> bool:
        if not self._input_done:
            last = bytes(self._partial)
            if last and not is_blank(last):
                # A last request without its newline still gets an answer.
                self._lines.append(last)
            self._partial.clear()
            self._input_done = True
            self._process()
            self._after_input()
        return True  # keep the transport open: every answer still goes out

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._input_done = True
        self._partial.clear()
        self._lines.clear()
        self._held = None
        self._set_buffered(0)
        self._disarm_idle()
        self._server.forget(self)
        self._check_finished()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._update_reading()

    def resume_writing(self) -> None:
        self._write_paused = False
        self._update_reading()

    # --- lines -------------------------------------------------------------------------

    def _process(self) -> None:
        """Handle waiting lines in order until one has to wait for earlier requests."""
        self._process_lines()
        if self._batch:
            self._seal()
        lines = self._lines
        self._waiting_bytes = sum(len(line) for line in lines if line) if lines else 0

    def _process_lines(self) -> None:
        if self._held is not None:
            request, self._held = self._held, None
            if not self._handle(request):
                return
        lines = self._lines
        limit = self._limit
        server = self._server
        # Without a journal, a commit without `wait` is answered at once (the hot path).
        plain_commits = server.plain_commits
        while lines and self._resume_at < 0:
            line = lines.popleft()
            if line is None or (len(line) > limit and not _fits(line, limit)):
                self._fatal(encode_error(NO_ID, "RequestTooLarge", self._too_large_message()))
                self._server.observer.request_error("RequestTooLarge")
                self._server.quiet_log.warning(
                    "RequestTooLarge", "request line over %d bytes: closing the connection", limit
                )
                return
            if not line or (line[0] != _OPEN_BRACE and is_blank(line)):
                continue
            try:
                request = parse_request(line)
            except ProtocolError as exc:
                server.observer.request_error(exc.code)
                self._emit(encode_failure(exc))
                continue
            if (
                plain_commits
                and type(request) is CommitRequest
                and not request.wait
                and not self._running
            ):
                self._out.append(server.commit_now(request, self.uid))
            elif not self._handle(request):
                return

    def _handle(self, request: Request) -> bool:
        """Answer or start one request; False when later lines must wait for it."""
        server = self._server
        if (
            server.plain_commits
            and not self._running
            and type(request) is CommitRequest
            and not request.wait
        ):
            self._emit(server.commit_now(request, self.uid))
            return True
        refusal = server.refusal(request, self.uid)
        if refusal is not None:
            self._emit(refusal)
            return True
        if server.batched_journal and type(request) is CommitRequest and not request.wait:
            return self._join_batch(request)
        if self._batch:
            self._seal()
        concurrent = server.runs_concurrently(request)
        if self._running and not concurrent:
            # Anything else sees the effect of every earlier request: let those finish first.
            self._held = request
            self._resume_at = 0
            return False
        if not self._running and server.immediate(request):
            self._emit(server.answer_now(request, self.uid))
            return True
        self._start(request)
        if not concurrent:
            self._resume_at = 0
            return False
        if self._running >= _MAX_PIPELINED:
            self._resume_at = _MAX_PIPELINED - 1
            return False
        return True

    def _join_batch(self, request: CommitRequest) -> bool:
        # Journaled commits of a chunk are journaled together: one write (and, with fsync:
        # always, one fsync) for all of them; their answers keep their places.
        if self._running >= _MAX_PIPELINED:
            self._seal()
            self._held = request
            self._resume_at = _MAX_PIPELINED - 1
            return False
        self._batch.append(request)
        return True

    def _seal(self) -> None:
        batch, self._batch = self._batch, []
        task = asyncio.get_running_loop().create_task(self._server.answer_batch(batch))
        self._track(tuple(r.request_id for r in batch), task)

    def _start(self, request: Request) -> None:
        task = asyncio.get_running_loop().create_task(self._server.answer_one(request, self.uid))
        self._track((request.request_id,), task)

    def _track(self, ids: tuple[RequestId, ...], task: asyncio.Task[list[bytes]]) -> None:
        self._running += 1
        self._slots.append((ids, task))
        task.add_done_callback(self._task_done)

    def _task_done(self, _task: asyncio.Task[list[bytes]]) -> None:
        self._running -= 1
        self._drain_slots()
        if self._resume_at >= 0 and self._running <= self._resume_at:
            self._resume_at = -1
            if not self._lost:
                self._process()
        self._after_input()
        self._check_finished()

    def _emit(self, answer: bytes) -> None:
        if self._batch:
            self._seal()
        if self._slots:
            self._slots.append(answer)
        else:
            self._out.append(answer)

    def _drain_slots(self) -> None:
        slots = self._slots
        while slots:
            head = slots[0]
            if isinstance(head, bytes):
                self._out.append(head)
            elif head[1].done():
                self._out.extend(_task_answers(*head))
            else:
                return
            slots.popleft()

    def _after_input(self) -> None:
        """After lines were handled: write the answers, account input, decide on reading."""
        self._server.dispatcher.publish_counts()
        self._write()
        if self._lost:
            return
        self._set_buffered(len(self._partial) + self._waiting_bytes)
        self._check_partial()
        self._update_reading()
        if self._input_done and self._running == 0 and not self._lines and self._held is None:
            self._close_transport()

    def _write(self) -> None:
        out = self._out
        if not out:
            return
        if self._transport is not None and not self._lost and not self._transport.is_closing():
            self._transport.write(out[0] if len(out) == 1 else b"".join(out))
        out.clear()

    def _check_partial(self) -> None:
        partial = self._partial
        if not partial:
            self._partial_since = None
            return
        if len(partial) > self._limit and not _fits(partial, self._limit):
            # Answer every complete line before it, then refuse it.
            self._partial.clear()
            self._lines.append(None)
            self._input_done = True
            self._process()
            self._after_input()
            return
        if self._partial_since is None:
            self._partial_since = time.monotonic()
            self._arm_idle(self._server.idle_timeout)

    def _update_reading(self) -> None:
        transport = self._transport
        if transport is None or self._lost or transport.is_closing():
            return
        pause = self._write_paused or bool(self._lines) or self._held is not None
        if pause != self._read_paused:
            self._read_paused = pause
            if pause:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _set_buffered(self, size: int) -> None:
        if size != self.buffered:
            delta = size - self.buffered
            self.buffered = size
            self._server.buffered_changed(delta)

    def _too_large_message(self) -> str:
        return f"request line exceeds {self._limit} bytes"

    # --- the idle timeout --------------------------------------------------------------

    def _arm_idle(self, delay: float) -> None:
        if self._idle_timer is None:
            self._idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_check)

    def _disarm_idle(self) -> None:
        if self._idle_timer is not None:
            self._idle_timer.cancel()
            self._idle_timer = None

    def _idle_check(self) -> None:
        # One timer per unfinished line, not one per chunk: when it fires it checks how long
        # the current unfinished line has been held, and re-arms for the rest if needed.
        self._idle_timer = None
        since = self._partial_since
        if since is None or self._input_done:
            return
        timeout = self._server.idle_timeout
        left = since + timeout - time.monotonic()
        if left > 0:
            self._arm_idle(left)
            return
        self._server.closed_by_limit("idle_timeout")
        self.close_for_limit(
            "Timeout", f"request line unfinished after {timeout:g}s (socket.idle_timeout)"
        )

    # --- ending ------------------------------------------------------------------------

    def close_for_limit(self, code: str, message: str) -> None:
        """Drop what this connection holds unanswered, answer `code`, close once answered."""
        self._fatal(encode_error(NO_ID, code, message))
        self._after_input()

    def _fatal(self, answer: bytes) -> None:
        self._input_done = True
        self._partial.clear()
        self._partial_since = None
        self._lines.clear()
        self._waiting_bytes = 0
        self._held = None
        self._resume_at = -1
        self._emit(answer)

    def shut(self) -> None:
        """The server is closing: read nothing more; close once the running requests end."""
        if self._lost:
            return
        self._input_done = True
        self._partial.clear()
        self._lines.clear()
        self._waiting_bytes = 0
        self._held = None
        self._after_input()

    def cancel(self) -> None:
        """Cut the running requests off (each answers ShuttingDown)."""
        for slot in self._slots:
            if not isinstance(slot, bytes):
                slot[1].cancel()

    def abort(self) -> None:
        """Drop the connection now, answers not yet written included."""
        if self._transport is not None:
            self._transport.abort()

    def _close_transport(self) -> None:
        self._disarm_idle()
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def _check_finished(self) -> None:
        if self._lost and self._running == 0 and not self.finished.done():
            self.finished.set_result(None)


def _fits(line: bytes | bytearray, limit: int) -> bool:
    """Whether a line over `limit` bytes is within it once its `\\r` is not counted (an
    unfinished line may end in the `\\r` of a `\\r\\n` still to come)."""
    return len(line) == limit + 1 and line[-1] == _CR


def _task_answers(ids: tuple[RequestId, ...], task: asyncio.Task[list[bytes]]) -> list[bytes]:
    if task.cancelled():
        return [encode_error(i, "ShuttingDown", "the daemon is closing") for i in ids]
    return task.result()


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
        self.observer: IngestObserver = metrics or NullObserver()
        self.dispatcher = Dispatcher(
            store,
            config=config,
            committer=committer,
            journal=journal,
            observer=self.observer,
            status=status,
        )
        self._handlers: Handlers = handlers or self.dispatcher
        # Requests that wait for nothing skip the coroutine, unless the ops are replaced.
        self._fast = handlers is None
        self._journaled = journal is not None
        self.plain_commits = self._fast and not self._journaled
        self.batched_journal = self._fast and self._journaled
        self._fd_reserve = _FD_RESERVE + config.commit.max_in_flight
        self._fd_ceiling = 2**31
        self._acceptor: _Acceptor | None = None
        self._refusals: _Refusals | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[_Connection] = set()
        self._admitted = 0  # accepted, not refused, not yet lost (some not yet registered)
        self._connecting: set[asyncio.Task[None]] = set()
        self._buffered = 0
        self.quiet_log = _QuietLog()
        self._accepting = True
        self.closing = False

    @property
    def path(self) -> str:
        return self._socket.path

    @property
    def max_line_bytes(self) -> int:
        return self._socket.max_line_bytes

    @property
    def idle_timeout(self) -> float:
        return self._socket.idle_timeout

    @property
    def accepting(self) -> bool:
        return self._accepting

    async def start(self) -> None:
        """Bind the socket (replacing a stale one) and start serving."""
        if self._acceptor is not None:
            return
        sock = _bind(self.path, self._socket.mode)
        info = os.stat(self.path)
        self._inode = (info.st_dev, info.st_ino)
        self._fd_ceiling = _fd_ceiling(self._fd_reserve)
        self._refusals = _Refusals()
        self._acceptor = _Acceptor(sock, self._on_accept, self.quiet_log)
        self._acceptor.start()
        log.info("listening on %s (mode %04o)", self.path, self._socket.mode)

    def apply_config(self, config: Config) -> None:
        """Take the groups, their limits and the wait timeout of a reloaded config
        (socket.* needs a restart)."""
        self.dispatcher.apply_config(config)

    def stop_accepting(self) -> None:
        """From now on commits answer ShuttingDown; other ops keep working."""
        self._accepting = False

    async def close(self, *, grace: float = 5.0) -> None:
        """Stop listening, let requests being handled finish (up to `grace` seconds), then
        close every connection and remove the socket file. Idempotent."""
        self._accepting = False
        self.closing = True
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
            self._remove_socket_file()
        if self._refusals is not None:
            self._refusals.close()
        if self._connecting:
            await asyncio.gather(*self._connecting, return_exceptions=True)
        connections = list(self._connections)
        for connection in connections:
            connection.shut()
        finished = [c.finished for c in connections]
        if finished:
            _done, late = await asyncio.wait(finished, timeout=grace)
            for connection in connections:
                if connection.finished in late:
                    connection.cancel()
            # A peer that does not read its answers must not hold the daemon's exit.
            _done, stuck = await asyncio.wait(finished, timeout=_ABORT_AFTER)
            for connection in connections:
                if connection.finished in stuck:
                    connection.abort()
            await asyncio.gather(*finished, return_exceptions=True)

    def _remove_socket_file(self) -> None:
        # Only our own socket: a new daemon may already have replaced the file.
        with contextlib.suppress(OSError):
            info = os.stat(self.path)
            if (info.st_dev, info.st_ino) == self._inode:
                os.unlink(self.path)

    # --- admission and limits ----------------------------------------------------------

    def _on_accept(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        uid = peer_uid(conn)
        refusal = self._admission(conn, uid)
        if refusal is not None:
            assert self._refusals is not None
            # Near the descriptor limit nothing lingers: the descriptor is what is short.
            self._refusals.refuse(conn, refusal, linger=conn.fileno() < self._fd_ceiling)
            return
        self._admitted += 1
        task = asyncio.get_running_loop().create_task(self._serve(conn, uid))
        self._connecting.add(task)
        task.add_done_callback(self._connecting.discard)

    def _admission(self, conn: socket.socket, uid: int | None) -> bytes | None:
        """The one error line refusing a new connection, or None to serve it."""
        if self._admitted >= self._socket.max_connections:
            return self._refuse("max_connections", "TooManyConnections", "too many connections")
        if conn.fileno() >= self._fd_ceiling:
            return self._refuse(
                "max_connections", "TooManyConnections", "too many open files in the daemon"
            )
        if not self._peer_allowed(uid):
            return self._refuse("forbidden", "Forbidden", "peer uid is not allowed")
        return None

    async def _serve(self, conn: socket.socket, uid: int | None) -> None:
        loop = asyncio.get_running_loop()
        try:
            await loop.connect_accepted_socket(lambda: _Connection(self, uid), conn)
        except OSError as exc:
            self._admitted -= 1
            conn.close()
            log.warning("cannot serve a socket connection: %s", exc)

    def register(self, connection: _Connection) -> bool:
        """Count a connection in, unless the server is closing."""
        if self.closing:
            self._admitted -= 1
            return False
        self._connections.add(connection)
        self.observer.connection_opened()
        return True

    def _refuse(self, reason: str, code: str, message: str) -> bytes:
        self.observer.connection_refused(reason)
        self.observer.request_error(code)
        self.quiet_log.warning(reason, "refused a socket connection: %s", message)
        return encode_error(NO_ID, code, message)

    def _peer_allowed(self, uid: int | None) -> bool:
        """Whether the peer's uid is in `socket.allowed_uids` (all are, if it is empty)."""
        allowed: Collection[int] = self._socket.allowed_uids
        return not allowed or (uid is not None and uid in allowed)

    def forget(self, connection: _Connection) -> None:
        if connection in self._connections:
            self._connections.discard(connection)
            self._admitted -= 1
            self.observer.connection_closed()

    def closed_by_limit(self, reason: str) -> None:
        self.observer.connection_refused(reason)
        self.quiet_log.warning(reason, "closed a socket connection: %s limit", reason)

    def buffered_changed(self, delta: int) -> None:
        self._buffered += delta
        if delta > 0 and self._buffered > self._socket.max_buffered_bytes:
            self._shed_largest()

    def _shed_largest(self) -> None:
        # Rare (only over the limit), so a scan over the connections is fine here.
        while self._buffered > self._socket.max_buffered_bytes and self._connections:
            largest = max(self._connections, key=lambda c: c.buffered)
            if largest.buffered == 0:
                return
            self.closed_by_limit("max_buffered_bytes")
            largest.close_for_limit(
                "RequestTooLarge",
                "the daemon holds too much unanswered input (socket.max_buffered_bytes): "
                "closing the connection holding the most",
            )

    # --- requests ----------------------------------------------------------------------

    def refusal(self, request: Request, uid: int | None) -> bytes | None:
        """The answer refusing `request` before it runs (draining, or a forbidden group)."""
        if not self._accepting and isinstance(request, CommitRequest):
            return encode_error(request.request_id, "ShuttingDown", "the daemon is shutting down")
        group = getattr(request, "group", None)
        if (
            group is not None
            and self.dispatcher.restricted
            and not self.dispatcher.may_use(group, uid)
        ):
            self.observer.request_error("Forbidden")
            return encode_error(
                request.request_id, "Forbidden", f"peer uid is not allowed to use group {group!r}"
            )
        return None

    def runs_concurrently(self, request: Request) -> bool:
        """Journaled commits without `wait` may overlap, to share the journal's fsyncs."""
        return self._journaled and isinstance(request, CommitRequest) and not request.wait

    def immediate(self, request: Request) -> bool:
        return self._fast and self.dispatcher.immediate(request)

    def _visible(self, request: Request, uid: int | None) -> frozenset[str] | None:
        if isinstance(request, StatusRequest | FlushRequest):
            return self.dispatcher.visible_groups(uid)
        return None

    def commit_now(self, request: CommitRequest, uid: int | None) -> bytes:
        """The answer line of a commit without `wait`, with no journal (the common request)."""
        if not self._accepting or self.dispatcher.restricted:
            refusal = self.refusal(request, uid)
            if refusal is not None:
                return refusal
        try:
            return encode_ok(request.request_id, **self.dispatcher.commit_now(request))
        except ProtocolError as exc:
            self.observer.request_error(exc.code)
            return encode_failure(exc, request.request_id)
        except Exception:
            return self._internal_error(request)

    def answer_now(self, request: Request, uid: int | None) -> bytes:
        """The answer line of an `immediate` request."""
        try:
            fields = self.dispatcher.answer_now(request, visible=self._visible(request, uid))
            return encode_ok(request.request_id, **fields)
        except ProtocolError as exc:
            self.observer.request_error(exc.code)
            return encode_failure(exc, request.request_id)
        except Exception:
            return self._internal_error(request)

    async def answer_one(self, request: Request, uid: int | None) -> list[bytes]:
        return [await self.answer(request, uid)]

    async def answer_batch(self, requests: list[CommitRequest]) -> list[bytes]:
        """The answer lines of journaled commits without `wait`, journaled together."""
        if not self._accepting:
            message = "the daemon is shutting down"
            return [encode_error(r.request_id, "ShuttingDown", message) for r in requests]
        try:
            outcomes = await self.dispatcher.commit_journaled(requests)
        except Exception:
            return [self._internal_error(r) for r in requests]
        answers = []
        for request, outcome in zip(requests, outcomes, strict=True):
            if isinstance(outcome, ProtocolError):
                self.observer.request_error(outcome.code)
                answers.append(encode_failure(outcome, request.request_id))
            else:
                answers.append(encode_ok(request.request_id, **outcome))
        return answers

    async def answer(self, request: Request, uid: int | None) -> bytes:
        """The answer line of any request."""
        try:
            fields = await self.handle(request, visible=self._visible(request, uid))
            return encode_ok(request.request_id, **fields)
        except ProtocolError as exc:
            self.observer.request_error(exc.code)
            return encode_failure(exc, request.request_id)
        except Exception:
            return self._internal_error(request)

    async def handle(self, request: Request, *, visible: Collection[str] | None = None) -> Fields:
        """Answer one request (ShuttingDown for commits once draining)."""
        if isinstance(request, CommitRequest) and not self._accepting:
            raise ProtocolError("ShuttingDown", "the daemon is shutting down")
        return await dispatch(self._handlers, request, visible=visible)

    def _internal_error(self, request: Request) -> bytes:
        log.exception("unexpected error handling a %s request", request.op)
        self.observer.request_error("InternalError")
        try:
            return encode_error(request.request_id, "InternalError", "see the daemon log")
        except ValueError:  # the id itself cannot be encoded: answer without it
            return encode_error(NO_ID, "InternalError", "see the daemon log")
