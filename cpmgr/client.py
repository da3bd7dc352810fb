"""A client library for consumers: the socket protocol of docs/protocol.md, sync and asyncio.

`CpmgrClient` (blocking, one connection, `pipeline()` to send many requests in one write) and
`AsyncCpmgrClient` (concurrent calls share one connection; answers are matched in order) both
reconnect with exponential backoff when the connection is lost, and resend the requests that
were not answered: every op is safe to repeat (an equal checkpoint is a no-op).
Refusals raise `CpmgrProtocolError` with the protocol code; an unreachable daemon raises
`CpmgrUnavailable`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import random
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from types import TracebackType
from typing import Any, Final

from cpmgr.backoff import backoff_delay
from cpmgr.errors import CpmgrError

__all__ = [
    "DEFAULT_SOCKET_PATH",
    "AsyncCpmgrClient",
    "CpmgrClient",
    "CpmgrClientError",
    "CpmgrProtocolError",
    "CpmgrUnavailable",
    "Pipeline",
    "backoff_delay",
    "build_request",
    "default_socket_path",
]

DEFAULT_SOCKET_PATH: Final = "/run/cpmgr/cpmgr.sock"
SOCKET_ENV: Final = "CPMGR_SOCKET"
# Answers to `get` on a big group can be long; the daemon's own lines are trusted.
_MAX_ANSWER_BYTES: Final = 64 * 1024 * 1024
_RECV_BYTES: Final = 65536

Answer = dict[str, Any]
Checkpoints = Mapping[int, str] | Iterable[tuple[int, str] | tuple[int, str, str | None]]


class CpmgrClientError(CpmgrError):
    """Root of the client's errors."""


class CpmgrProtocolError(CpmgrClientError):
    """The daemon answered `ok:false`; `answer` is the whole answer."""

    def __init__(self, code: str, message: str, answer: Answer) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.answer = answer

    @property
    def dropped(self) -> bool | None:
        """For a failed `wait`: whether the value was given up (None if not said)."""
        error = self.answer.get("error")
        value = error.get("dropped") if isinstance(error, dict) else None
        return value if isinstance(value, bool) else None


class CpmgrUnavailable(CpmgrClientError):
    """The daemon could not be reached, or did not answer in time."""


class _ConnectionLost(Exception):
    """The connection ended before every answer arrived (the caller may retry)."""


def default_socket_path(env: Mapping[str, str] | None = None) -> str:
    """`$CPMGR_SOCKET` if set and non-empty, else /run/cpmgr/cpmgr.sock."""
    value = (os.environ if env is None else env).get(SOCKET_ENV, "")
    return value or DEFAULT_SOCKET_PATH


# --- requests and answers -------------------------------------------------------------------


def build_request(op: str, **fields: object) -> dict[str, object]:
    """A request object; None and False options are left out (they are the defaults)."""
    payload: dict[str, object] = {"op": op}
    payload.update({k: v for k, v in fields.items() if v is not None and v is not False})
    return payload


def _commit_request(
    group: str,
    shard: int,
    checkpoint: str,
    *,
    consumer: str | None,
    force: bool,
    wait: bool,
    timeout: float | None,
) -> dict[str, object]:
    return build_request(
        "commit",
        group=group,
        shard=shard,
        checkpoint=checkpoint,
        consumer=consumer,
        force=force,
        wait=wait,
        timeout=timeout,
    )


def _batch_items(checkpoints: Checkpoints) -> list[dict[str, object]]:
    if isinstance(checkpoints, Mapping):
        pairs: Iterable[tuple[Any, ...]] = checkpoints.items()
    else:
        pairs = checkpoints
    items: list[dict[str, object]] = []
    for entry in pairs:
        item: dict[str, object] = {"shard": entry[0], "checkpoint": entry[1]}
        if len(entry) > 2 and entry[2] is not None:
            item["consumer"] = entry[2]
        items.append(item)
    return items


def _batch_request(
    group: str,
    checkpoints: Checkpoints,
    *,
    consumer: str | None,
    force: bool,
    wait: bool,
    timeout: float | None,
) -> dict[str, object]:
    return build_request(
        "commit",
        group=group,
        checkpoints=_batch_items(checkpoints),
        consumer=consumer,
        force=force,
        wait=wait,
        timeout=timeout,
    )


def _encode(payload: Mapping[str, object], request_id: int) -> bytes:
    return json.dumps({**payload, "id": request_id}, separators=(",", ":")).encode() + b"\n"


def _decode(line: bytes) -> Answer:
    try:
        answer = json.loads(line)
    except ValueError as exc:
        raise CpmgrClientError(f"the daemon sent a line that is not JSON: {line[:200]!r}") from exc
    if not isinstance(answer, dict):
        raise CpmgrClientError(f"the daemon sent an answer that is not an object: {answer!r}")
    return answer


def _failure(answer: Answer) -> CpmgrProtocolError | None:
    """The error an `ok:false` answer stands for, None for a success."""
    if answer.get("ok") is True:
        return None
    error = answer.get("error")
    error = error if isinstance(error, dict) else {}
    return CpmgrProtocolError(
        str(error.get("code", "Unknown")), str(error.get("message", "")), answer
    )


def _checked(answer: Answer) -> Answer:
    error = _failure(answer)
    if error is not None:
        raise error
    return answer


def _strip_id(answer: Answer) -> Answer:
    return {k: v for k, v in answer.items() if k != "id"}


def _read_timeout(base: float | None, payload: Mapping[str, object]) -> float | None:
    """How long to wait for an answer: a request's own `timeout` is added to the base."""
    if base is None:
        return None
    extra = payload.get("timeout")
    return base + (float(extra) if isinstance(extra, int | float) else 0.0)


def _is_connection_level(answer: Answer) -> bool:
    """An id-less Forbidden ends the connection for every request, not only one."""
    error = answer.get("error")
    return "id" not in answer and isinstance(error, dict) and error.get("code") == "Forbidden"


# --- the blocking client --------------------------------------------------------------------


class _LineSocket:
    """A connected Unix socket read line by line."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buffer = bytearray()

    def readline(self, timeout: float | None) -> bytes:
        self.sock.settimeout(timeout)
        while True:
            end = self._buffer.find(b"\n")
            if end >= 0:
                line = bytes(self._buffer[: end + 1])
                del self._buffer[: end + 1]
                return line
            if len(self._buffer) > _MAX_ANSWER_BYTES:
                raise CpmgrClientError("answer line too long")
            try:
                chunk = self.sock.recv(_RECV_BYTES)
            except ConnectionResetError:
                chunk = b""
            if not chunk:
                raise _ConnectionLost
            self._buffer += chunk

    def close(self) -> None:
        self.sock.close()


class CpmgrClient:
    """A blocking client on one connection. Use as a context manager, or call close()."""

    def __init__(
        self,
        path: str | None = None,
        *,
        timeout: float | None = 60.0,
        reconnect_attempts: int = 3,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
        sleep: Callable[[float], object] = time.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """`timeout`: seconds to wait for an answer (plus a request's own `timeout`), None for
        ever. `reconnect_attempts`: tries after the first, per call, with backoff."""
        self.path = path if path is not None else default_socket_path()
        self._timeout = timeout
        self._attempts = reconnect_attempts
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._rng = rng
        self._conn: _LineSocket | None = None
        self._ids = itertools.count(1)

    def __enter__(self) -> CpmgrClient:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    # --- ops --------------------------------------------------------------------------

    def commit(
        self,
        group: str,
        shard: int,
        checkpoint: str,
        *,
        consumer: str | None = None,
        force: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Hand over one checkpoint (with `wait`, return once it is committed)."""
        self._call(
            _commit_request(
                group,
                shard,
                checkpoint,
                consumer=consumer,
                force=force,
                wait=wait,
                timeout=timeout,
            )
        )

    def commit_many(
        self,
        group: str,
        checkpoints: Checkpoints,
        *,
        consumer: str | None = None,
        force: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Hand over {shard: checkpoint} (or (shard, checkpoint[, consumer]) tuples) as one
        all-or-nothing batch; returns how many shards were accepted."""
        payload = _batch_request(
            group, checkpoints, consumer=consumer, force=force, wait=wait, timeout=timeout
        )
        return int(self._call(payload)["accepted"])

    def flush(self, group: str | None = None, *, timeout: float | None = None) -> int:
        """Commit everything pending now; returns how many shards were committed."""
        return int(self._call(build_request("flush", group=group, timeout=timeout))["committed"])

    def get(self, group: str, shard: int | None = None, *, remote: bool = False) -> list[Answer]:
        """The shards of a group (or one shard) as the daemon sees them."""
        answer = self._call(build_request("get", group=group, shard=shard, remote=remote))
        return list(answer["shards"])

    def status(self) -> Answer:
        """The daemon's status (version, uptime, per-group counts)."""
        return _strip_id(self._call(build_request("status")))

    def ping(self) -> None:
        """Check the daemon answers."""
        self._call(build_request("ping"))

    def call(self, op: str, **fields: object) -> Answer:
        """Send any request; returns its answer (without `id`), raises on `ok:false`."""
        return _strip_id(self._call(build_request(op, **fields)))

    def pipeline(self) -> Pipeline:
        """Collect requests and send them in one write: `with client.pipeline() as p: ...`."""
        return Pipeline(self)

    # --- transport --------------------------------------------------------------------

    def _call(self, payload: Mapping[str, object]) -> Answer:
        return _checked(self.exchange([payload])[0])

    def exchange(self, payloads: list[Mapping[str, object]]) -> list[Answer]:
        """Send requests pipelined and return their answers in order (`ok:false` included)."""
        answers: list[Answer] = []
        failures = 0
        while len(answers) < len(payloads):
            try:
                conn = self._connected()
                answers += self._send_and_read(conn, payloads[len(answers) :])
            except _ConnectionLost as lost:
                answers += lost.args[0] if lost.args else []
                self.close()
                failures += 1
                if failures > self._attempts:
                    raise CpmgrUnavailable(f"lost the connection to {self.path}") from None
                self._backoff(failures)
        return answers

    def _send_and_read(
        self, conn: _LineSocket, payloads: list[Mapping[str, object]]
    ) -> list[Answer]:
        ids = [next(self._ids) for _ in payloads]
        data = b"".join(_encode(p, i) for p, i in zip(payloads, ids, strict=True))
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            # If the daemon hung up first, what it answered is still readable.
            conn.sock.sendall(data)
        answers: list[Answer] = []
        try:
            for payload, request_id in zip(payloads, ids, strict=True):
                answer = _decode(conn.readline(_read_timeout(self._timeout, payload)))
                _check_id(answer, request_id)
                answers.append(answer)
                if _is_connection_level(answer):
                    self.close()
                    return answers + [answer] * (len(payloads) - len(answers))
        except _ConnectionLost:
            raise _ConnectionLost(answers) from None
        except TimeoutError:
            self.close()
            raise CpmgrUnavailable(f"no answer from {self.path} in time") from None
        except CpmgrClientError:
            self.close()  # out of step: nothing more on this connection can be trusted
            raise
        return answers

    def _connected(self) -> _LineSocket:
        attempt = 0
        while self._conn is None:
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
            self._conn = _LineSocket(sock)
        return self._conn

    def _backoff(self, attempt: int) -> None:
        self._sleep(
            backoff_delay(
                attempt, initial=self._initial_backoff, maximum=self._max_backoff, rng=self._rng
            )
        )


def _check_id(answer: Answer, request_id: int) -> None:
    # An answer without an id is for a line the daemon could not read as an object: it still
    # comes in order. Any other id means the stream is out of step.
    if "id" in answer and answer["id"] != request_id:
        raise CpmgrClientError(f"answer for request {answer['id']!r}, expected {request_id}")


class Pipeline:
    """Requests collected and sent in one write; `results` holds each answer (a dict) or its
    CpmgrProtocolError, in order."""

    def __init__(self, client: CpmgrClient) -> None:
        self._client = client
        self._payloads: list[Mapping[str, object]] = []
        self.results: list[Answer | CpmgrProtocolError] = []

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is None and self._payloads:
            self.execute()

    def commit(
        self,
        group: str,
        shard: int,
        checkpoint: str,
        *,
        consumer: str | None = None,
        force: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Pipeline:
        self._payloads.append(
            _commit_request(
                group,
                shard,
                checkpoint,
                consumer=consumer,
                force=force,
                wait=wait,
                timeout=timeout,
            )
        )
        return self

    def commit_many(
        self,
        group: str,
        checkpoints: Checkpoints,
        *,
        consumer: str | None = None,
        force: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> Pipeline:
        self._payloads.append(
            _batch_request(
                group, checkpoints, consumer=consumer, force=force, wait=wait, timeout=timeout
            )
        )
        return self

    def call(self, op: str, **fields: object) -> Pipeline:
        self._payloads.append(build_request(op, **fields))
        return self

    def execute(self) -> list[Answer | CpmgrProtocolError]:
        """Send everything collected; returns (and keeps in `results`) the outcomes."""
        payloads, self._payloads = self._payloads, []
        answers = self._client.exchange(payloads)
        self.results = [_failure(a) or _strip_id(a) for a in answers]
        return self.results


# --- the asyncio client ---------------------------------------------------------------------


class _AsyncConnection:
    """One connection; requests go out as they come, answers resolve futures in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._waiting: deque[tuple[int, asyncio.Future[Answer]]] = deque()
        self._task = asyncio.create_task(self._read_answers(), name="cpmgr-client-reader")
        self.alive = True

    def send(self, line: bytes, request_id: int) -> asyncio.Future[Answer]:
        future: asyncio.Future[Answer] = asyncio.get_running_loop().create_future()
        self._waiting.append((request_id, future))
        self._writer.write(line)
        return future

    async def drain(self) -> None:
        try:
            await self._writer.drain()
        except ConnectionError:
            self._fail(_ConnectionLost())

    async def _read_answers(self) -> None:
        error: BaseException = _ConnectionLost()
        try:
            while True:
                line = await self._reader.readline()
                if not line.endswith(b"\n"):
                    break
                answer = _decode(line)
                if not self._waiting:
                    raise CpmgrClientError("the daemon answered a request never sent")
                request_id, future = self._waiting.popleft()
                _check_id(answer, request_id)
                if not future.done():
                    future.set_result(answer)
                if _is_connection_level(answer):
                    error = _failure(answer) or error
                    break
        except (ConnectionError, ValueError):
            pass
        except CpmgrClientError as exc:
            error = exc
        self._fail(error)

    def _fail(self, error: BaseException) -> None:
        self.alive = False
        while self._waiting:
            _, future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
        self._writer.close()

    async def close(self, error: BaseException) -> None:
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


class AsyncCpmgrClient:
    """An asyncio client: any number of concurrent calls share one connection (pipelined)."""

    def __init__(
        self,
        path: str | None = None,
        *,
        timeout: float | None = 60.0,
        reconnect_attempts: int = 3,
        initial_backoff: float = 0.05,
        max_backoff: float = 2.0,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        rng: Callable[[], float] = random.random,
    ) -> None:
        """Options as for CpmgrClient."""
        self.path = path if path is not None else default_socket_path()
        self._timeout = timeout
        self._attempts = reconnect_attempts
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._sleep = sleep
        self._rng = rng
        self._conn: _AsyncConnection | None = None
        self._connecting = asyncio.Lock()
        self._ids = itertools.count(1)

    async def __aenter__(self) -> AsyncCpmgrClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the connection; calls still waiting fail with CpmgrUnavailable."""
        conn, self._conn = self._conn, None
        if conn is not None:
            await conn.close(CpmgrUnavailable("the client was closed"))

    # --- ops --------------------------------------------------------------------------

    async def commit(
        self,
        group: str,
        shard: int,
        checkpoint: str,
        *,
        consumer: str | None = None,
        force: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> None:
        """Hand over one checkpoint (with `wait`, return once it is committed)."""
        await self._call(
            _commit_request(
                group,
                shard,
                checkpoint,
                consumer=consumer,
                force=force,
                wait=wait,
                timeout=timeout,
            )
        )

    async def commit_many(
        self,
        group: str,
        checkpoints: Checkpoints,
        *,
        consumer: str | None = None,
        force: bool = False,
        wait: bool = False,
        timeout: float | None = None,
    ) -> int:
        """Hand over several checkpoints as one all-or-nothing batch; the accepted count."""
        payload = _batch_request(
            group, checkpoints, consumer=consumer, force=force, wait=wait, timeout=timeout
        )
        return int((await self._call(payload))["accepted"])

    async def flush(self, group: str | None = None, *, timeout: float | None = None) -> int:
        """Commit everything pending now; returns how many shards were committed."""
        answer = await self._call(build_request("flush", group=group, timeout=timeout))
        return int(answer["committed"])

    async def get(
        self, group: str, shard: int | None = None, *, remote: bool = False
    ) -> list[Answer]:
        """The shards of a group (or one shard) as the daemon sees them."""
        answer = await self._call(build_request("get", group=group, shard=shard, remote=remote))
        return list(answer["shards"])

    async def status(self) -> Answer:
        """The daemon's status."""
        return _strip_id(await self._call(build_request("status")))

    async def ping(self) -> None:
        """Check the daemon answers."""
        await self._call(build_request("ping"))

    async def call(self, op: str, **fields: object) -> Answer:
        """Send any request; returns its answer (without `id`), raises on `ok:false`."""
        return _strip_id(await self._call(build_request(op, **fields)))

    # --- transport --------------------------------------------------------------------

    async def _call(self, payload: Mapping[str, object]) -> Answer:
        failures = 0
        while True:
            conn = await self._connected()
            request_id = next(self._ids)
            future = conn.send(_encode(payload, request_id), request_id)
            await conn.drain()
            try:
                answer = await asyncio.wait_for(
                    future, timeout=_read_timeout(self._timeout, payload)
                )
            except _ConnectionLost:
                failures += 1
                if failures > self._attempts:
                    raise CpmgrUnavailable(f"lost the connection to {self.path}") from None
                await self._backoff(failures)
                continue
            except TimeoutError:
                raise CpmgrUnavailable(f"no answer from {self.path} in time") from None
            return _checked(answer)

    async def _connected(self) -> _AsyncConnection:
        async with self._connecting:
            if self._conn is not None and self._conn.alive:
                return self._conn
            if self._conn is not None:
                await self._conn.close(_ConnectionLost())
                self._conn = None
            attempt = 0
            while self._conn is None:
                try:
                    reader, writer = await asyncio.open_unix_connection(
                        self.path, limit=_MAX_ANSWER_BYTES
                    )
                except OSError as exc:
                    if attempt >= self._attempts:
                        raise CpmgrUnavailable(f"cannot connect to {self.path}: {exc}") from exc
                    attempt += 1
                    await self._backoff(attempt)
                    continue
                self._conn = _AsyncConnection(reader, writer)
            return self._conn

    async def _backoff(self, attempt: int) -> None:
        await self._sleep(
            backoff_delay(
                attempt, initial=self._initial_backoff, maximum=self._max_backoff, rng=self._rng
            )
        )
