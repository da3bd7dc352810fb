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
import contextlib
import functools
import logging
import operator
import os
import socket
from collections.abc import Callable, Collection, Mapping
from typing import Any, Final

from cpmgr.config import Config
from cpmgr.connection import Connection
from cpmgr.dispatch import (
    LISTING_CHUNK,
    CommitterLike,
    Dispatcher,
    Fields,
    Handlers,
    IngestObserver,
    JournalLike,
    LagLookup,
    NullObserver,
    dispatch,
)
from cpmgr.errors import ProtocolError
from cpmgr.listener import Acceptor, QuietLog, Refusals, bind, fd_ceiling, peer_uid
from cpmgr.membership import Member, Membership
from cpmgr.protocol import (
    NO_ID,
    AssignmentRequest,
    CommitRequest,
    FlushRequest,
    GetRequest,
    JoinRequest,
    LeaveRequest,
    MembersRequest,
    ReleaseRequest,
    Request,
    RequestId,
    StatusRequest,
    encode_error,
    encode_failure,
    encode_ok,
    encode_ok_pieces,
)
from cpmgr.requests import item_consumers, item_shards, with_consumer
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

# File descriptors kept free for everything but consumer connections: the SLS connection pool
# (sized by max_in_flight), the HTTP server and its scrapes, the journal, logging, DNS.
_FD_RESERVE: Final = 128
_ABORT_AFTER: Final = 1.0  # after close()'s grace and the cancellation of what still ran
_OK: Final = encode_ok()
_REQUEST_ID: Final = operator.attrgetter("request_id")
_PRESENT: Final = operator.attrgetter("present")


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
        membership: Membership | None = None,
        lag: LagLookup | None = None,
    ) -> None:
        self._socket = config.socket
        self.membership = membership
        # Groups whose commits go through the membership gate (NotOwner, NotMember).
        self.member_groups: frozenset[str] = membership.groups if membership else frozenset()
        self._teardowns: set[asyncio.Task[None]] = set()
        self.observer: IngestObserver = metrics or NullObserver()
        self.dispatcher = Dispatcher(
            store,
            config=config,
            committer=committer,
            journal=journal,
            observer=self.observer,
            status=status,
            lag=lag,
        )
        self._handlers: Handlers = handlers or self.dispatcher
        # Requests that wait for nothing skip the coroutine, unless the ops are replaced.
        self._fast = handlers is None
        self._journaled = journal is not None
        self.plain_commits = self._fast and not self._journaled
        self.batched_journal = self._fast and self._journaled
        self._fd_reserve = _FD_RESERVE + config.commit.max_in_flight
        self._fd_ceiling = 2**31
        self._acceptor: Acceptor | None = None
        self._refusals: Refusals | None = None
        self._inode: tuple[int, int] | None = None
        self._connections: set[Connection] = set()
        self._admitted = 0  # accepted, not refused, not yet lost (some not yet registered)
        self._connecting: set[asyncio.Task[None]] = set()
        self._buffered = 0
        self.quiet_log = QuietLog()
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
        sock = bind(self.path, self._socket.mode)
        info = os.stat(self.path)
        self._inode = (info.st_dev, info.st_ino)
        self._fd_ceiling = fd_ceiling(self._fd_reserve)
        self._refusals = Refusals()
        self._acceptor = Acceptor(sock, self._on_accept, self.quiet_log)
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
            await loop.connect_accepted_socket(lambda: Connection(self, uid), conn)
        except OSError as exc:
            self._admitted -= 1
            conn.close()
            log.warning("cannot serve a socket connection: %s", exc)

    def register(self, connection: Connection) -> bool:
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

    def forget(self, connection: Connection) -> None:
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
        if (
            not self._accepting
            and isinstance(request, CommitRequest)
            and request.group not in self.member_groups  # revoked shards still take commits
        ):
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

    # --- membership ---------------------------------------------------------------------

    def gate_member_commit(
        self, request: CommitRequest, connection: Connection
    ) -> CommitRequest | bytes:
        """A commit to a membership group: every item named for a joined member holding its
        shard (the joined name filled in), or the answer refusing it."""
        refusal = self.refusal(request, connection.uid)
        if refusal is not None:
            return refusal
        try:
            return self._member_commit(request, connection)
        except ProtocolError as exc:
            self.observer.request_error(exc.code)
            return encode_failure(exc, request.request_id)

    def _member_commit(self, request: CommitRequest, connection: Connection) -> CommitRequest:
        assert self.membership is not None
        joined = connection.joined.get(request.group)
        names = set(item_consumers(request.items))
        if joined is not None and names - {None, joined.name}:
            raise ProtocolError(
                "BadRequest",
                f"consumer: this connection joined group {request.group!r} as {joined.name!r}",
            )
        if joined is None:
            if None in names or len(names) != 1:
                raise ProtocolError(
                    "NotMember", f"commits to group {request.group!r} must come from a member"
                )
            (name,) = names
            assert name is not None
            joined = self.membership.member(request.group, name)
            if joined is None:
                raise ProtocolError(
                    "NotMember", f"{name!r} is not a member of group {request.group!r}"
                )
        self.membership.check_commit(joined, item_shards(request.items))
        if None not in names:
            return request
        return CommitRequest(
            request.group,
            with_consumer(request.items, joined.name),
            request.batch,
            request.force,
            request.wait,
            request.timeout,
            request.request_id,
        )

    async def answer_member_op(self, request: Request, connection: Connection) -> list[bytes]:
        """The answer line of join, release, leave, assignment or members."""
        try:  # refusal() already ran, in Connection._handle
            fields = await self._member_op(request, connection)
            return [encode_ok(request.request_id, **fields)]
        except ProtocolError as exc:
            self.observer.request_error(exc.code)
            return [encode_failure(exc, request.request_id)]
        except Exception:
            return [self._internal_error(request)]

    async def _member_op(self, request: Request, connection: Connection) -> Fields:
        if isinstance(request, MembersRequest):
            visible = self.dispatcher.visible_groups(connection.uid)
            if request.group is not None:
                self.dispatcher.require_group(request.group)
            members = (
                self.membership.members_view(visible, request.group) if self.membership else []
            )
            return {"members": members}
        group = getattr(request, "group", "")
        self.dispatcher.require_group(group)
        membership = self.membership
        if membership is None or group not in self.member_groups:
            raise ProtocolError("NotMembershipGroup", f"group {group!r} has no membership block")
        if isinstance(request, JoinRequest):
            return await self._join(membership, request, connection)
        member = connection.joined.get(group)
        if member is None:
            raise ProtocolError("NotMember", f"this connection has not joined group {group!r}")
        if isinstance(request, ReleaseRequest):
            return {"checkpoint": await membership.release(member, request.shard)}
        if isinstance(request, LeaveRequest):
            released = await membership.leave(member)
            connection.joined.pop(group, None)
            return {"released": released}
        assert isinstance(request, AssignmentRequest)
        return {"consumer": member.name, "shards": member.view()}

    async def _join(
        self, membership: Membership, request: JoinRequest, connection: Connection
    ) -> Fields:
        if request.group in connection.joined:
            raise ProtocolError(
                "BadRequest", f"this connection already joined group {request.group!r}"
            )
        if not self._accepting:
            raise ProtocolError("ShuttingDown", "the daemon is shutting down")
        member = await membership.join(request.group, request.consumer, connection)
        if connection.finished.done() or connection.lost:
            self.member_disconnected(member)  # it went away while the join waited
        else:
            connection.joined[request.group] = member
        return {"group": request.group, "consumer": request.consumer}

    def member_disconnected(self, member: Member) -> None:
        """A joined connection closed: its member hands everything over (in the background)."""
        if self.membership is None:
            return
        task = asyncio.get_running_loop().create_task(self.membership.disconnected(member))
        self._teardowns.add(task)
        task.add_done_callback(self._teardowns.discard)

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

    def start_batch(self, requests: list[CommitRequest]) -> asyncio.Future[list[bytes]]:
        """The answer lines of journaled commits without `wait`, journaled together: the
        common chunk (see Dispatcher.commit_plain) by callbacks, any other by `answer_batch`.
        Cancelling the future cuts the answers off (they become ShuttingDown), not the
        commits."""
        loop = asyncio.get_running_loop()
        if self._accepting:
            answers: asyncio.Future[list[bytes]] = loop.create_future()
            ids = list(map(_REQUEST_ID, requests))
            answer = functools.partial(self._plain_answers, ids, answers)
            try:
                if self.dispatcher.commit_plain(requests, answer):
                    return answers
            except Exception:
                answers.set_result([self._internal_error(r) for r in requests])
                return answers
        return loop.create_task(self.answer_batch(requests))

    def _plain_answers(
        self,
        ids: list[RequestId],
        answers: asyncio.Future[list[bytes]],
        error: ProtocolError | None,
    ) -> None:
        if answers.done():
            return  # cut off at shutdown: answered ShuttingDown
        try:
            if error is not None:
                for _id in ids:
                    self.observer.request_error(error.code)
                lines = [encode_failure(error, i) for i in ids]
            elif any(map(_PRESENT, ids)):
                lines = [encode_ok(i) for i in ids]
            else:
                lines = [_OK] * len(ids)
        except Exception:
            log.exception("unexpected error answering journaled commits")
            self.observer.request_error("InternalError")
            lines = [encode_error(NO_ID, "InternalError", "see the daemon log") for _ in ids]
        answers.set_result(lines)

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
            if self._is_large_listing(request):
                assert isinstance(request, GetRequest)
                return await self._listing_answer(request)
            fields = await self.handle(request, visible=self._visible(request, uid))
            return encode_ok(request.request_id, **fields)
        except ProtocolError as exc:
            self.observer.request_error(exc.code)
            return encode_failure(exc, request.request_id)
        except Exception:
            return self._internal_error(request)

    def _is_large_listing(self, request: Request) -> bool:
        return (
            self._fast
            and isinstance(request, GetRequest)
            and not request.remote
            and self.dispatcher.large_listing(request)
        )

    async def _listing_answer(self, request: GetRequest) -> bytes:
        """A large whole-group `get`, built and encoded a chunk of shards per loop turn."""
        entries = await self.dispatcher.listing(request)
        pieces = []
        for piece in encode_ok_pieces(request.request_id, "shards", entries, chunk=LISTING_CHUNK):
            pieces.append(piece)
            await asyncio.sleep(0)
        return b"".join(pieces)

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
