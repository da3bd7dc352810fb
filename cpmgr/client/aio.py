"""The asyncio shell: a reader task per connection feeds the core; `AsyncCpmgrClient` and
`AsyncMember`."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Generator, Mapping
from typing import Any, Final, TypeVar, Unpack

from cpmgr.client import ops
from cpmgr.client.core import (
    MAX_ANSWER_BYTES,
    Answer,
    AsyncClosing,
    ClientCore,
    ConnectOptions,
    CpmgrClientError,
    CpmgrUnavailable,
    Received,
    Reply,
    Settings,
    checked,
    failure,
    read_timeout,
)
from cpmgr.client.events import MemberEvent
from cpmgr.client.member import MemberState, MemberView
from cpmgr.client.ops import Checkpoints, CommitOptions, MemberCommitOptions

__all__ = ["AsyncCpmgrClient", "AsyncMember"]

T = TypeVar("T")
_RECV_BYTES: Final = 65536
Observer = Callable[[Received], None]


class _ConnectionLost(Exception):
    """The connection ended before the answer arrived (the caller may retry)."""


def _ignore(item: Received) -> None:
    # A plain client's connection joins nothing (join() opens its own): no events come here.
    return None


class _Connection:
    """One connection: requests go out as they come; a reader task feeds the core, shows
    every reply and event to `observe` in arrival order, then resolves the reply's caller."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        observe: Observer = _ignore,
        on_lost: Callable[[], None] | None = None,
    ) -> None:
        self.core = ClientCore()
        self._reader = reader
        self._writer = writer
        self._observe = observe
        self._on_lost = on_lost
        self._futures: dict[int, asyncio.Future[Answer]] = {}
        self._task = asyncio.create_task(self._read(), name="cpmgr-client-reader")
        self.alive = True

    def send(self, payload: Mapping[str, object]) -> asyncio.Future[Answer]:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        ids, data = self.core.send([payload])
        self._futures[ids[0]] = future
        self._writer.write(data)
        return future

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            self._fail(_ConnectionLost())

    async def _read(self) -> None:
        error: BaseException = _ConnectionLost()
        try:
            while data := await self._reader.read(_RECV_BYTES):
                for item in self.core.receive(data):
                    self._deliver(item)
                if self.core.refused is not None:
                    error = failure(self.core.refused) or error
                    break
        except ConnectionError:
            pass
        except CpmgrClientError as exc:
            error = exc
        self._fail(error)

    def _deliver(self, item: Received) -> None:
        self._observe(item)
        if isinstance(item, Reply):
            future = self._futures.pop(item.request_id, None)
            if future is not None and not future.done():
                future.set_result(item.answer)

    def _fail(self, error: BaseException) -> None:
        was_alive, self.alive = self.alive, False
        futures, self._futures = self._futures, {}
        for future in futures.values():
            if not future.done():
                future.set_exception(error)
        self._writer.close()
        if was_alive and self._on_lost is not None:
            self._on_lost()

    async def close(self, error: BaseException) -> None:
        self._on_lost = None  # closed on purpose: nothing was lost
        self.alive = False
        self._task.cancel()
        try:
            # asyncio.wait, not `await self._task`: suppressing the reader's CancelledError
            # that way would also swallow a cancellation of the caller itself.
            await asyncio.wait({self._task})
        finally:
            self._fail(error)
        with contextlib.suppress(ConnectionError):
            await self._writer.wait_closed()


async def _answer(conn: _Connection, payload: Mapping[str, object], base: float | None) -> Answer:
    """Send one request and wait for its answer (TimeoutError after its bound)."""
    future = conn.send(payload)
    await conn.drain()
    return await asyncio.wait_for(future, timeout=read_timeout(base, payload))


class AsyncCpmgrClient(Settings, AsyncClosing):
    """An asyncio client: any number of concurrent calls share one connection (pipelined)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        **options: Unpack[ConnectOptions],
    ) -> None:
        """Options as for CpmgrClient."""
        super().__init__(path, **options)
        self._sleep = sleep
        self._conn: _Connection | None = None
        self._connecting = asyncio.Lock()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with CpmgrUnavailable."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(CpmgrUnavailable("the client was closed"))

    # --- ops (docs/protocol.md; each one's request and result are in cpmgr.client.ops) -------

    async def commit(
        self, group: str, shard: int, checkpoint: str, **options: Unpack[CommitOptions]
    ) -> None:
        """Hand over one checkpoint (with `wait`, return once it is committed)."""
        await self._run(ops.commit(group, shard, checkpoint, **options))

    async def commit_many(
        self, group: str, checkpoints: Checkpoints, **options: Unpack[CommitOptions]
    ) -> int:
        """Hand over several checkpoints as one all-or-nothing batch; the accepted count."""
        return await self._run(ops.commit_many(group, checkpoints, **options))

    async def flush(self, group: str | None = None, *, timeout: float | None = None) -> int:
        """Commit everything pending now; returns how many shards were committed."""
        return await self._run(ops.flush(group, timeout=timeout))

    async def get(
        self, group: str, shard: int | None = None, *, remote: bool = False
    ) -> list[Answer]:
        """The shards of a group (or one shard) as the daemon sees them."""
        return await self._run(ops.get(group, shard, remote=remote))

    async def status(self) -> Answer:
        """The daemon's status."""
        return await self._run(ops.status())

    async def ping(self) -> None:
        """Check the daemon answers."""
        await self._run(ops.ping())

    async def members(self, group: str | None = None) -> list[Answer]:
        """The members on the daemon (of one group) that this peer may see."""
        return await self._run(ops.members(group))

    async def call(self, op: str, **fields: object) -> Answer:
        """Send any request; returns its answer (without `id`), raises on `ok:false`."""
        return await self._run(ops.any_op(op, **fields))

    def join(self, group: str, consumer: str) -> Joining:
        """Join a membership group as `consumer` on a connection of its own: `member = await
        client.join(...)`, or `async with client.join(...) as member:` (closed at the end)."""
        return Joining(self._join(group, consumer))

    # --- transport --------------------------------------------------------------------

    async def _run(self, call: ops.Call[T]) -> T:
        failures = 0
        while True:
            conn = await self._connected()
            try:
                answer = await _answer(conn, call.payload, self._timeout)
            except _ConnectionLost:
                failures += 1
                if failures > self._attempts:
                    raise CpmgrUnavailable(f"lost the connection to {self.path}") from None
                await self._backoff(failures)
                continue
            except TimeoutError:
                raise CpmgrUnavailable(f"no answer from {self.path} in time") from None
            return call.result(checked(answer))

    async def _join(self, group: str, consumer: str) -> AsyncMember:
        member = AsyncMember(MemberState(group, consumer), timeout=self._timeout)
        reader, writer = await self._open()
        member.attach(_Connection(reader, writer, observe=member.observe, on_lost=member.lost))
        try:
            await member.run(ops.join(group, consumer))
        except BaseException:
            await member.close()
            raise
        return member

    async def _connected(self) -> _Connection:
        async with self._connecting:
            if self._conn is not None and self._conn.alive:
                return self._conn
            if self._conn is not None:
                await self._conn.close(_ConnectionLost())
                self._conn = None
            self._conn = _Connection(*await self._open())
            return self._conn

    async def _open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        attempt = 0
        while True:
            try:
                return await asyncio.open_unix_connection(self.path, limit=MAX_ANSWER_BYTES)
            except OSError as exc:
                if attempt >= self._attempts:
                    raise CpmgrUnavailable(f"cannot connect to {self.path}: {exc}") from exc
                attempt += 1
                await self._backoff(attempt)

    async def _backoff(self, attempt: int) -> None:
        await self._sleep(self._delay(attempt))


class Joining:
    """`AsyncCpmgrClient.join()`: await it for the member, or use it as `async with`."""

    def __init__(self, joining: Awaitable[AsyncMember]) -> None:
        self._joining = joining
        self._member: AsyncMember | None = None

    def __await__(self) -> Generator[Any, None, AsyncMember]:
        return self._joining.__await__()

    async def __aenter__(self) -> AsyncMember:
        self._member = await self._joining
        return self._member

    async def __aexit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        if self._member is not None:
            await self._member.close()


class AsyncMember(MemberView, AsyncClosing):
    """A joined membership (from `AsyncCpmgrClient.join`): `async for event in member`, and
    ops on its connection. A dropped connection ends the membership with a `Lost` event
    (reason `disconnected`); it is never reconnected behind your back: join again."""

    def __init__(self, state: MemberState, *, timeout: float | None) -> None:
        self._state = state
        self._timeout = timeout
        self._queue: asyncio.Queue[MemberEvent | None] = asyncio.Queue()  # None: the end
        self._conn: _Connection | None = None
        self._end_sent = False

    def attach(self, conn: _Connection) -> None:
        """The connection this member's requests go over (before join is sent)."""
        self._conn = conn

    def __aiter__(self) -> AsyncMember:
        return self

    async def __anext__(self) -> MemberEvent:
        event = await self.next_event()
        if event is None:
            raise StopAsyncIteration
        return event

    async def close(self) -> None:
        """Close the connection: the daemon commits what it accepted, then releases the
        shards (its disconnect path). Idempotent."""
        self._end()
        if self._conn is not None:
            await self._conn.close(CpmgrUnavailable("the member was closed"))

    # --- ops on the joined connection ---------------------------------------------------

    async def commit(
        self, shard: int, checkpoint: str, **options: Unpack[MemberCommitOptions]
    ) -> None:
        """Hand over one checkpoint of a held shard (`NotOwner` if it is not held)."""
        await self.run(ops.commit(self.group, shard, checkpoint, **options))

    async def commit_many(
        self, checkpoints: Checkpoints, **options: Unpack[MemberCommitOptions]
    ) -> int:
        """Hand over several checkpoints as one batch; returns how many were accepted."""
        return await self.run(ops.commit_many(self.group, checkpoints, **options))

    async def release(self, shard: int) -> str | None:
        """Hand a shard back once its last checkpoint is settled; returns that checkpoint."""
        return await self.run(ops.release(self.group, shard))

    async def leave(self) -> int:
        """Release every shard, then end the membership; returns how many were released."""
        return await self.run(ops.leave(self.group))

    async def assignment(self) -> dict[int, str]:
        """The shards the daemon says this member holds: {shard: "held" | "releasing"}."""
        return await self.run(ops.assignment(self.group))

    async def flush(self, *, timeout: float | None = None) -> int:
        """Commit everything pending in this group now; returns how many were committed."""
        return await self.run(ops.flush(self.group, timeout=timeout))

    # --- events -------------------------------------------------------------------------

    async def next_event(self, timeout: float | None = None) -> MemberEvent | None:
        """The next event; None if `timeout` seconds pass first (0: only what has arrived) or
        once the membership is over and every event was taken."""
        if not self._queue.empty():
            event = self._queue.get_nowait()
        elif timeout is not None and timeout <= 0:
            return None
        else:
            try:
                event = await asyncio.wait_for(self._queue.get(), timeout)
            except TimeoutError:
                return None
        if event is None:
            self._queue.put_nowait(None)  # the end stays for every later caller
        return event

    # --- transport --------------------------------------------------------------------

    async def run(self, call: ops.Call[T]) -> T:
        """Send one request on the joined connection; its result."""
        if self._state.ended or self._conn is None:
            raise CpmgrUnavailable(f"the membership of {self.consumer} in {self.group} is over")
        try:
            answer = await _answer(self._conn, call.payload, self._timeout)
        except _ConnectionLost:
            raise CpmgrUnavailable("lost the connection: the membership is over") from None
        except TimeoutError:
            raise CpmgrUnavailable("no answer from the daemon in time") from None
        return call.result(checked(answer))

    def observe(self, item: Received) -> None:
        """The reader shows each reply and event here first, in arrival order."""
        if (event := self._state.observe(item)) is not None:
            self._queue.put_nowait(event)
        if self._state.ended:  # left
            self._end()

    def lost(self) -> None:
        """The joined connection dropped: every shard is lost and the membership is over."""
        if not self._state.ended:
            self._queue.put_nowait(self._state.disconnected())
        self._end()

    def _end(self) -> None:
        if not self._end_sent:
            self._end_sent = True
            self._state.ended = True
            self._queue.put_nowait(None)
