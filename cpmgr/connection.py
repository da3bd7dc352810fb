"""One consumer connection as an asyncio.Protocol: input split into lines, each request
answered or started through the server, answers written in request order."""

from __future__ import annotations

import asyncio
import collections
import operator
import time
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

from cpmgr.errors import ProtocolError
from cpmgr.protocol import (
    NO_ID,
    AssignmentRequest,
    CommitRequest,
    JoinRequest,
    LeaveRequest,
    MembersRequest,
    ReleaseRequest,
    Request,
    RequestId,
    encode_error,
    encode_event,
    encode_failure,
    is_blank,
    parse_request,
)

if TYPE_CHECKING:  # the server owns its connections; only its type is needed here
    from cpmgr.ingest import IngestServer
    from cpmgr.membership import Member

__all__ = ["Connection"]

_MAX_PIPELINED: Final = 1024  # journaled commits in progress per connection
_REQUEST_ID: Final = operator.attrgetter("request_id")
# Above this many bytes of answers waiting in the kernel-side buffer, the peer is not read.
_WRITE_HIGH_WATER: Final = 256 * 1024
_CR: Final = 13
_OPEN_BRACE: Final = 123
# Events written while the peer does not read; past this many it is treated as gone.
MAX_UNREAD_EVENTS: Final = 1000
_MEMBERSHIP_OPS: Final = (
    JoinRequest,
    ReleaseRequest,
    LeaveRequest,
    AssignmentRequest,
    MembersRequest,
)


# --- connections ----------------------------------------------------------------------------

# An answer, or the future of the answers to come (with the ids to answer ShuttingDown if it
# is cancelled: not the requests, which need not outlive their handling).
_Pending = tuple[Sequence[RequestId], asyncio.Future[list[bytes]]]
_Slot = bytes | _Pending
# A line waiting behind a slow request; None stands for "the next line was too long".
_Waiting = bytes | None


class Connection(asyncio.Protocol):
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
        self.joined: dict[str, Member] = {}  # group -> the member this connection joined as
        self._unread_events = 0  # events written while writing is paused
        self.finished: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    @property
    def lost(self) -> bool:
        return self._lost

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
        for member in self.joined.values():
            self._server.member_disconnected(member)
        self.joined.clear()
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
        self._unread_events = 0
        self._update_reading()

    # --- events (membership) --------------------------------------------------------------

    def send_event(self, fields: Mapping[str, object]) -> None:
        """Write an event line now, between answers: answers not yet complete stay in their
        slots, so they follow it (a NotOwner answer always comes after the event behind it)."""
        if self._lost or self._transport is None or self._transport.is_closing():
            return
        if self._write_paused:
            self._unread_events += 1
            if self._unread_events > MAX_UNREAD_EVENTS:
                self._server.closed_by_limit("unread_events")
                self.abort()  # connection_lost() then ends its memberships as a disconnect
                return
        self._out.append(encode_event(fields))
        self._write()

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
        # Without a journal, a commit without `wait` is answered at once (the hot path); with
        # one, it joins the chunk's journal batch unless something may refuse it first.
        plain_commits = server.plain_commits
        batched = server.batched_journal and server.accepting and not server.dispatcher.restricted
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
                and request.group not in server.member_groups
            ):
                self._out.append(server.commit_now(request, self.uid))
            elif (
                batched
                and type(request) is CommitRequest
                and not request.wait
                and self._running < _MAX_PIPELINED
                and request.group not in server.member_groups
            ):
                self._batch.append(request)
            elif not self._handle(request):
                return

    def _handle(self, request: Request) -> bool:
        """Answer or start one request; False when later lines must wait for it."""
        server = self._server
        if type(request) is CommitRequest and request.group in server.member_groups:
            gated = server.gate_member_commit(request, self)
            if isinstance(gated, bytes):
                self._emit(gated)
                return True
            request = gated
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
        self._track(list(map(_REQUEST_ID, batch)), self._server.start_batch(batch))

    def _start(self, request: Request) -> None:
        # Membership ops need the connection that sent them (it joins, it gets the events);
        # like every op but journaled commits, later lines wait for them.
        server = self._server
        answer = (
            server.answer_member_op(request, self)
            if isinstance(request, _MEMBERSHIP_OPS)
            else server.answer_one(request, self.uid)
        )
        task = asyncio.get_running_loop().create_task(answer)
        self._track((request.request_id,), task)

    def _track(self, ids: Sequence[RequestId], answers: asyncio.Future[list[bytes]]) -> None:
        self._running += 1
        self._slots.append((ids, answers))
        answers.add_done_callback(self._task_done)

    def _task_done(self, _answers: asyncio.Future[list[bytes]]) -> None:
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


def _task_answers(ids: Sequence[RequestId], answers: asyncio.Future[list[bytes]]) -> list[bytes]:
    if answers.cancelled():
        return [encode_error(i, "ShuttingDown", "the daemon is closing") for i in ids]
    return answers.result()
