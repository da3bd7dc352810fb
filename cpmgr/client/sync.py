"""The blocking shell: a socket per connection, fed to the core; `CpmgrClient` and `Member`."""

from __future__ import annotations

import contextlib
import socket
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Final, TypeVar, Unpack

from cpmgr.client import ops
from cpmgr.client.core import (
    Answer,
    ClientCore,
    Closing,
    ConnectOptions,
    CpmgrClientError,
    CpmgrProtocolError,
    CpmgrUnavailable,
    Received,
    Reply,
    Settings,
    checked,
    failure,
    read_timeout,
    strip_id,
)
from cpmgr.client.events import MemberEvent
from cpmgr.client.member import MemberState, MemberView
from cpmgr.client.ops import Checkpoints, CommitOptions, MemberCommitOptions

__all__ = ["CpmgrClient", "Member", "Pipeline"]

T = TypeVar("T")
_RECV_BYTES: Final = 65536
Observer = Callable[[Received], None]


class _ConnectionLost(Exception):
    """The connection ended; `args[0]` holds the answers that arrived before."""


class _Connection:
    """A connected Unix socket and the core that reads and writes its lines."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.core = ClientCore()

    def send(self, payloads: Sequence[Mapping[str, object]]) -> list[int]:
        ids, data = self.core.send(payloads)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # If the daemon hung up first, what it answered is still readable.
            self.sock.sendall(data)
        return ids

    def read(self, timeout: float | None) -> list[Received]:
        """What one read brings; [] if `timeout` is 0 and nothing is there yet."""
        self.sock.settimeout(timeout)
        try:
            chunk = self.sock.recv(_RECV_BYTES)
        except BlockingIOError:
            return []
        except ConnectionResetError:
            chunk = b""
        if not chunk:
            raise _ConnectionLost([])
        return self.core.receive(chunk)

    def exchange(
        self, payloads: Sequence[Mapping[str, object]], *, timeout: float | None, observe: Observer
    ) -> list[Answer]:
        """Send pipelined, read until each is answered (TimeoutError per answer's bound);
        every reply and event read is shown to `observe` in arrival order."""
        ids = self.send(payloads)
        wanted = set(ids)
        answers: dict[int, Answer] = {}
        head, deadline = -1, None
        try:
            while len(answers) < len(ids):
                if head != len(answers):  # each answer has its own bound, from its turn
                    head = len(answers)
                    deadline = _deadline(read_timeout(timeout, payloads[head]))
                for item in self.read(_time_left(deadline)):
                    if isinstance(item, Reply) and item.request_id in wanted:
                        answers[item.request_id] = item.answer
                    observe(item)
        except _ConnectionLost:
            raise _ConnectionLost([answers[i] for i in ids if i in answers]) from None
        return [answers[i] for i in ids]

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        self.sock.close()


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _time_left(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError
    return left


def _ignore(item: Received) -> None:
    # A plain client's connection joins nothing (join() opens its own): no events come here.
    return None


class CpmgrClient(Settings, Closing):
    """A blocking client on one connection. Use as a context manager, or call close()."""

    def __init__(
        self,
        path: str | None = None,
        *,
        sleep: Callable[[float], object] = time.sleep,
        **options: Unpack[ConnectOptions],
    ) -> None:
        """`path`: the socket ($CPMGR_SOCKET, else /run/cpmgr/cpmgr.sock). `timeout`: seconds
        to wait for an answer (plus a request's own `timeout`), None for ever (default 60).
        `reconnect_attempts`: tries after the first, per call, with backoff (default 3)."""
        super().__init__(path, **options)
        self._sleep = sleep
        self._conn: _Connection | None = None

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- ops (docs/protocol.md; each one's request and result are in cpmgr.client.ops) -------

    def commit(
        self, group: str, shard: int, checkpoint: str, **options: Unpack[CommitOptions]
    ) -> None:
        """Hand over one checkpoint (with `wait`, return once it is committed)."""
        self._run(ops.commit(group, shard, checkpoint, **options))

    def commit_many(
        self, group: str, checkpoints: Checkpoints, **options: Unpack[CommitOptions]
    ) -> int:
        """Hand over {shard: checkpoint} (or (shard, checkpoint[, consumer]) tuples) as one
        all-or-nothing batch; returns how many shards were accepted."""
        return self._run(ops.commit_many(group, checkpoints, **options))

    def flush(self, group: str | None = None, *, timeout: float | None = None) -> int:
        """Commit everything pending now; returns how many shards were committed."""
        return self._run(ops.flush(group, timeout=timeout))

    def get(self, group: str, shard: int | None = None, *, remote: bool = False) -> list[Answer]:
        """The shards of a group (or one shard) as the daemon sees them."""
        return self._run(ops.get(group, shard, remote=remote))

    def status(self) -> Answer:
        """The daemon's status (version, uptime, per-group counts)."""
        return self._run(ops.status())

    def ping(self) -> None:
        """Check the daemon answers."""
        self._run(ops.ping())

    def members(self, group: str | None = None) -> list[Answer]:
        """The members on the daemon (of one group) that this peer may see."""
        return self._run(ops.members(group))

    def call(self, op: str, **fields: object) -> Answer:
        """Send any request; returns its answer (without `id`), raises on `ok:false`."""
        return self._run(ops.any_op(op, **fields))

    def pipeline(self) -> Pipeline:
        """Collect requests and send them in one write: `with client.pipeline() as p: ...`."""
        return Pipeline(self)

    def join(self, group: str, consumer: str) -> Member:
        """Join a membership group as `consumer` on a connection of its own; the member's
        events and ops go over it (close the member, or leave(), to end the membership)."""
        member = Member(self._connect(), MemberState(group, consumer), timeout=self._timeout)
        try:
            member.run(ops.join(group, consumer))
        except BaseException:
            member.close()
            raise
        return member

    # --- transport --------------------------------------------------------------------

    def _run(self, call: ops.Call[T]) -> T:
        return call.result(checked(self.exchange([call.payload])[0]))

    def exchange(self, payloads: list[Mapping[str, object]]) -> list[Answer]:
        """Send requests pipelined and return their answers in order (`ok:false` included).

        A lost connection is opened again (with backoff) and what it did not answer is sent
        again: every op is safe to repeat (an equal checkpoint is a no-op).
        """
        answers: list[Answer] = []
        failures = 0
        while len(answers) < len(payloads):
            try:
                answers += self._send_and_read(payloads[len(answers) :])
            except _ConnectionLost as lost:
                answers += lost.args[0]
                self.close()
                failures += 1
                if failures > self._attempts:
                    raise CpmgrUnavailable(f"lost the connection to {self.path}") from None
                self._backoff(failures)
        return answers

    def _send_and_read(self, payloads: list[Mapping[str, object]]) -> list[Answer]:
        if self._conn is None:
            self._conn = self._connect()
        conn = self._conn
        try:
            answers = conn.exchange(payloads, timeout=self._timeout, observe=_ignore)
        except TimeoutError:
            self.close()
            raise CpmgrUnavailable(f"no answer from {self.path} in time") from None
        except CpmgrClientError:
            self.close()  # out of step: nothing more on this connection can be trusted
            raise
        if conn.core.refused is not None:
            self.close()
        return answers

    def _connect(self) -> _Connection:
        attempt = 0
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.path)
            except OSError as exc:
                sock.close()
                if attempt >= self._attempts:
                    raise CpmgrUnavailable(f"cannot connect to {self.path}: {exc}") from exc
                attempt += 1
                self._backoff(attempt)
                continue
            return _Connection(sock)

    def _backoff(self, attempt: int) -> None:
        self._sleep(self._delay(attempt))


class Pipeline(Closing):
    """Requests collected and sent in one write; `results` holds each answer (a dict) or its
    CpmgrProtocolError, in order. `with client.pipeline() as p:` sends at the end of the block
    (unless it raised)."""

    def __init__(self, client: CpmgrClient) -> None:
        self._client = client
        self._payloads: list[Mapping[str, object]] = []
        self.results: list[Answer | CpmgrProtocolError] = []

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if exc_type is None:  # a block that raised sends nothing
            self.close()

    def close(self) -> None:
        """Send what was collected, if anything."""
        if self._payloads:
            self.execute()

    def commit(
        self, group: str, shard: int, checkpoint: str, **options: Unpack[CommitOptions]
    ) -> Pipeline:
        return self._add(ops.commit(group, shard, checkpoint, **options))

    def commit_many(
        self, group: str, checkpoints: Checkpoints, **options: Unpack[CommitOptions]
    ) -> Pipeline:
        return self._add(ops.commit_many(group, checkpoints, **options))

    def call(self, op: str, **fields: object) -> Pipeline:
        return self._add(ops.any_op(op, **fields))

    def _add(self, call: ops.Call[object]) -> Pipeline:
        self._payloads.append(call.payload)
        return self

    def execute(self) -> list[Answer | CpmgrProtocolError]:
        """Send everything collected; returns (and keeps in `results`) the outcomes."""
        payloads, self._payloads = self._payloads, []
        answers = self._client.exchange(payloads)
        self.results = [failure(a) or strip_id(a) for a in answers]
        return self.results


class Member(MemberView, Closing):
    """A joined membership (from `CpmgrClient.join`): its events, and ops on its connection.

    Iterate it for events (the iteration ends with the membership), or call
    `next_event(timeout)` between reads of your own. Not thread-safe: use it from one thread.
    A dropped connection ends the membership with a `Lost` event (reason `disconnected`); it is
    never reconnected behind your back, since a new connection is not a member: join again.
    """

    def __init__(self, conn: _Connection, state: MemberState, *, timeout: float | None) -> None:
        self._conn = conn
        self._state = state
        self._timeout = timeout
        self._events: deque[MemberEvent] = deque()
        self._closed = False

    def __iter__(self) -> Iterator[MemberEvent]:
        while (event := self.next_event()) is not None:
            yield event

    def fileno(self) -> int:
        """The connection's descriptor, for select(): readable when events may be waiting."""
        return self._conn.fileno()

    def close(self) -> None:
        """Close the connection: the daemon commits what it accepted, then releases the
        shards (its disconnect path). Idempotent."""
        if not self._closed:
            self._closed = True
            self._state.ended = True
            self._conn.close()

    # --- ops on the joined connection ---------------------------------------------------

    def commit(self, shard: int, checkpoint: str, **options: Unpack[MemberCommitOptions]) -> None:
        """Hand over one checkpoint of a held shard (`NotOwner` if it is not held)."""
        self.run(ops.commit(self.group, shard, checkpoint, **options))

    def commit_many(self, checkpoints: Checkpoints, **options: Unpack[MemberCommitOptions]) -> int:
        """Hand over several checkpoints as one batch; returns how many were accepted."""
        return self.run(ops.commit_many(self.group, checkpoints, **options))

    def release(self, shard: int) -> str | None:
        """Hand a shard back once its last checkpoint is settled; returns that checkpoint."""
        return self.run(ops.release(self.group, shard))

    def leave(self) -> int:
        """Release every shard, then end the membership; returns how many were released."""
        return self.run(ops.leave(self.group))

    def assignment(self) -> dict[int, str]:
        """The shards the daemon says this member holds: {shard: "held" | "releasing"}."""
        return self.run(ops.assignment(self.group))

    def flush(self, *, timeout: float | None = None) -> int:
        """Commit everything pending in this group now; returns how many were committed."""
        return self.run(ops.flush(self.group, timeout=timeout))

    # --- events -------------------------------------------------------------------------

    def next_event(self, timeout: float | None = None) -> MemberEvent | None:
        """The next event; None if `timeout` seconds pass first (0: only what has arrived) or
        once the membership is over and every event was taken."""
        deadline = _deadline(timeout)
        while not self._events and not self._state.ended:
            try:
                items = self._conn.read(0.0 if timeout == 0 else _time_left(deadline))
            except TimeoutError:
                return None
            except _ConnectionLost:
                self._disconnected()
                break
            except CpmgrClientError:
                self._disconnected()
                raise
            for item in items:
                self._observe(item)
            if timeout == 0:
                break
        return self._events.popleft() if self._events else None

    def read_events(self) -> list[MemberEvent]:
        """The events already read (along with answers), without reading more."""
        events = list(self._events)
        self._events.clear()
        return events

    # --- transport --------------------------------------------------------------------

    def run(self, call: ops.Call[T]) -> T:
        """Send one request on the joined connection; its result (events read meanwhile wait
        for next_event)."""
        return call.result(checked(self.request(call.payload)))

    def request(self, payload: Mapping[str, object]) -> Answer:
        """Send any request on the joined connection; its answer, `ok:false` included."""
        if self._state.ended:
            raise CpmgrUnavailable(f"the membership of {self.consumer} in {self.group} is over")
        try:
            answers = self._conn.exchange([payload], timeout=self._timeout, observe=self._observe)
        except TimeoutError:
            raise CpmgrUnavailable("no answer from the daemon in time") from None
        except _ConnectionLost:
            self._disconnected()
            raise CpmgrUnavailable("lost the connection: the membership is over") from None
        except CpmgrClientError:
            self._disconnected()
            raise
        return answers[0]

    def _observe(self, item: Received) -> None:
        if (event := self._state.observe(item)) is not None:
            self._events.append(event)

    def _disconnected(self) -> None:
        if not self._state.ended:
            self._events.append(self._state.disconnected())
        self.close()
