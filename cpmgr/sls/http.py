"""A small HTTP/1.1 keep-alive client for SLS's JSON API: prepared request bytes in, answers out.

Why not aiohttp's ClientSession: each of its requests costs more CPU (URL objects, header
multidicts, tracing hooks, payload and decompression setup) than the whole UpdateCheckPoint
budget, and the committer sends thousands per second on the loop that also serves the socket.
SLS needs very little of HTTP: one request at a time per connection, answers with
`Content-Length` (chunked and read-to-close are handled too), no redirects, no compression
(none is asked for). So requests are written as one prepared byte string, and answers are
parsed by a small incremental parser on an `asyncio.Protocol`.

Decisions where the contract is silent:
- At most `limit` requests are in flight per endpoint, so at most `limit` connections exist.
  Idle connections are reused last-in first-out and closed after `IDLE_SECONDS` unused (as
  aiohttp's default keep-alive), or as soon as the server closes them.
- One deadline covers the wait for a free slot, connecting (TLS included), sending and the whole
  answer. A connection whose request timed out or failed is closed, never reused.
- An answer larger than `MAX_ANSWER_BYTES` or not parseable as HTTP/1.x is a transport failure.
  The limit is 32 MiB: a GetCheckPoint answer for 100,000 shards is 11.6 MiB with short
  consumer names and 22.9 MiB with 128-byte ones (28-character cursors, `json.dumps` spacing).
  The head (status line and headers) is limited to `MAX_HEAD_BYTES`, a chunk-size line to
  `MAX_CHUNK_LINE_BYTES`, chunked trailers to `MAX_HEAD_BYTES`.
- Framing is strict, so that a confused or hostile server cannot make a later request read a
  stale answer: differing Content-Length values, a Transfer-Encoding other than `chunked`, a
  chunk size that is not plain hex or a chunk not followed by CRLF, and 101 Switching Protocols
  (never asked for) are protocol errors. Duplicate headers are joined with ", " (RFC 9110).
- A connection is never reused after an answer that announced `Connection: close`, came as
  HTTP/1.0 without keep-alive, carried both Transfer-Encoding and Content-Length, was followed
  by extra bytes, or arrived before the whole request was written.
- Interim 1xx answers (100 Continue) are skipped; the final answer that follows is the answer.
- After `close()` the pool refuses new requests and fails the ones in flight at once with a
  connection error (`ConnectionAbortedError`); a connection that opens after `close()` is closed.
"""

from __future__ import annotations

import asyncio
import re
import ssl
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

IDLE_SECONDS: Final = 15.0
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_ANSWER_BYTES: Final = 32 * 1024 * 1024
MAX_CHUNK_LINE_BYTES: Final = 4 * 1024
CLOSE_SECONDS: Final = 1.0
READ_BYTES: Final = 64 * 1024  # read at most this much per loop turn and connection
_NO_BODY_STATUSES: Final = frozenset({204, 304})
_SWITCHING_PROTOCOLS: Final = 101
_CHUNK_SIZE: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")


@dataclass(frozen=True)
class HttpAnswer:
    """One answer: status, headers with lower-cased names (the last value wins), body."""

    status: int
    headers: dict[str, str]
    body: bytes


class HttpProtocolError(ConnectionError):
    """The server sent something that is not a well-formed HTTP/1.x answer."""


class _Answer:
    """Incremental parser of one answer on a keep-alive connection.

    Every `feed` does work linear in the bytes it is given: the head search resumes where the
    last one stopped and never looks past `MAX_HEAD_BYTES`, chunk-size lines are bounded.
    """

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.keep_alive = True
        self._head_done = False
        self._scanned = 0  # how far the head search has looked without finding its end
        self._length: int | None = None  # None with chunked or read-to-close bodies
        self._chunked = False
        self._in_trailers = False
        self._chunks: list[bytes] = []
        self._body_size = 0

    def feed(self, buffer: bytearray) -> bool:
        """Consume what `buffer` holds of the answer; True once the answer is complete."""
        if not self._head_done and not self._parse_head(buffer):
            return False
        if self._chunked:
            return self._feed_chunked(buffer)
        if self._length is None:
            return False  # read to close: `finish_at_eof` completes it
        if len(buffer) < self._length:
            return False
        self.body = bytes(buffer[: self._length])
        del buffer[: self._length]
        return True

    def finish_at_eof(self, buffer: bytearray) -> bool:
        """The connection ended: True if that completes a read-to-close answer."""
        if self._head_done and self._length is None and not self._chunked:
            self.body = bytes(buffer)
            buffer.clear()
            self.keep_alive = False
            return True
        return False

    def _parse_head(self, buffer: bytearray) -> bool:
        while True:
            end = buffer.find(b"\r\n\r\n", self._scanned, MAX_HEAD_BYTES + 4)
            if end < 0:
                if len(buffer) >= MAX_HEAD_BYTES + 4:
                    raise HttpProtocolError("answer headers too large")
                self._scanned = max(0, len(buffer) - 3)
                return False
            self._scanned = 0
            lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
            del buffer[: end + 4]
            self._status_line(lines[0])
            headers = self.headers = {}
            for line in lines[1:]:  # inline: this runs for every answer
                name, colon, value = line.partition(":")
                if not colon:
                    raise HttpProtocolError(f"malformed header line {line[:80]!r}")
                headers[name.strip().lower()] = value.strip()
            if len(headers) < len(lines) - 1:  # rare: a header sent twice
                self.headers = _joined_headers(lines[1:])
            if self.status == _SWITCHING_PROTOCOLS:
                raise HttpProtocolError("101 Switching Protocols was never asked for")
            if not 100 <= self.status < 200:
                break
            # An interim answer (100 Continue): the real one follows.
        self._head_done = True
        self._framing()
        return True

    def _status_line(self, line: str) -> None:
        version, _, rest = line.partition(" ")
        code = rest[:3]
        status = int(code) if code.isascii() and code.isdigit() else 0
        if (
            not version.startswith("HTTP/1.")
            or not 100 <= status <= 599
            or rest[3:4] not in ("", " ")
        ):
            raise HttpProtocolError(f"malformed status line {line[:80]!r}")
        self.status = status
        if version == "HTTP/1.0":
            self.keep_alive = False

    def _framing(self) -> None:
        connection = self.headers.get("connection")
        if connection is not None:
            self._connection_tokens(connection.lower())
        if self.status in _NO_BODY_STATUSES:
            self._length = 0
        elif "transfer-encoding" in self.headers:
            if self.headers["transfer-encoding"].lower() != "chunked":
                raise HttpProtocolError(
                    f"unsupported Transfer-Encoding {self.headers['transfer-encoding'][:40]!r}"
                )
            self._chunked = True
            if "content-length" in self.headers:
                self.keep_alive = False  # conflicting framing (RFC 9112 6.1): do not reuse
        elif "content-length" in self.headers:
            self._length = _content_length(self.headers["content-length"])
        else:
            self.keep_alive = False  # the body runs to the end of the connection

    def _connection_tokens(self, connection: str) -> None:
        if connection == "keep-alive":  # what SLS sends: no list to split
            self.keep_alive = True
            return
        tokens = {token.strip() for token in connection.split(",")}
        if "close" in tokens:
            self.keep_alive = False
        elif "keep-alive" in tokens:
            self.keep_alive = True

    def _feed_chunked(self, buffer: bytearray) -> bool:
        while not self._in_trailers:
            line_end = buffer.find(b"\r\n", 0, MAX_CHUNK_LINE_BYTES)
            if line_end < 0:
                if len(buffer) >= MAX_CHUNK_LINE_BYTES:
                    raise HttpProtocolError("chunk size line too long")
                return False
            size = parse_chunk_size(bytes(buffer[:line_end]))
            if size == 0:
                del buffer[: line_end + 2]
                self._in_trailers = True
                break
            data_end = line_end + 2 + size
            if len(buffer) < data_end + 2:
                return False
            if buffer[data_end : data_end + 2] != b"\r\n":
                raise HttpProtocolError("chunk data not followed by CRLF: wrong chunk size")
            self._body_size += size
            if self._body_size > MAX_ANSWER_BYTES:
                raise HttpProtocolError("answer body too large")
            self._chunks.append(bytes(buffer[line_end + 2 : data_end]))
            del buffer[: data_end + 2]
        return self._finish_trailers(buffer)

    def _finish_trailers(self, buffer: bytearray) -> bool:
        """Skip trailer lines up to the empty line that ends the answer."""
        if buffer[:2] == b"\r\n":
            end = 2
        else:
            found = buffer.find(b"\r\n\r\n", 0, MAX_HEAD_BYTES + 4)
            if found < 0:
                if len(buffer) >= MAX_HEAD_BYTES + 4:
                    raise HttpProtocolError("chunked trailers too large")
                return False
            end = found + 4
        del buffer[:end]
        self.body = b"".join(self._chunks)
        return True


def _joined_headers(lines: list[str]) -> dict[str, str]:
    """Headers with the values of a repeated name joined by ", " (RFC 9110 5.3)."""
    headers: dict[str, str] = {}
    for line in lines:
        name, _, value = line.partition(":")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    return headers


def _content_length(text: str) -> int:
    """The value of Content-Length; identical repeats ("5, 5", RFC 9110 8.6) are allowed."""
    if "," in text:
        values = {value.strip() for value in text.split(",")}
        if len(values) != 1:
            raise HttpProtocolError(f"conflicting Content-Length {text[:40]!r}")
        text = values.pop()
    # The length check first: int() refuses strings of over 4300 digits with a ValueError.
    if not (text.isascii() and text.isdigit()) or len(text) > 12:
        raise HttpProtocolError(f"bad Content-Length {text[:40]!r}")
    length = int(text)
    if length > MAX_ANSWER_BYTES:
        raise HttpProtocolError(f"bad Content-Length {text[:40]!r}")
    return length


def parse_chunk_size(line: bytes) -> int:
    """The size in a chunked-encoding size line (extensions ignored); HttpProtocolError if bad."""
    digits = line.split(b";", 1)[0].strip(b" \t")
    if _CHUNK_SIZE.fullmatch(digits) is None:
        raise HttpProtocolError(f"bad chunk size line {line[:40]!r}")
    size = int(digits, 16)
    if size > MAX_ANSWER_BYTES:
        raise HttpProtocolError("bad chunk size")
    return size


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection carrying one request at a time.

    A buffered protocol: the transport reads into one buffer kept for the connection's life.
    A plain Protocol's every read allocates a 256 KiB bytes object, which the C library maps,
    shrinks and unmaps again (three system calls and a page fault per answer).
    """

    def __init__(
        self, loop: asyncio.AbstractEventLoop, *, on_lost: Callable[[_Connection], None]
    ) -> None:
        self._loop = loop
        self._on_lost = on_lost
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._answer: _Answer | None = None
        self._waiter: asyncio.Future[HttpAnswer] | None = None
        self.closed = False
        self.idle_since = 0.0
        self.lost: asyncio.Future[None] = loop.create_future()
        self._read_buffer = memoryview(bytearray(READ_BYTES))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_buffer[:nbytes])

    def send(self, data: bytes) -> asyncio.Future[HttpAnswer]:
        """Write one request; the future resolves with its answer or a transport error."""
        assert self._transport is not None and self._waiter is None
        self._answer = _Answer()
        self._waiter = self._loop.create_future()
        self._transport.write(data)
        return self._waiter

    def data_received(self, data: bytes | memoryview) -> None:
        if self._answer is None or self._waiter is None:
            self._fail(HttpProtocolError("data from the server while no request was sent"))
            return
        self._buffer += data
        if len(self._buffer) > MAX_ANSWER_BYTES:
            self._fail(HttpProtocolError("answer body too large"))
            return
        try:
            complete = self._answer.feed(self._buffer)
        except HttpProtocolError as exc:
            self._fail(exc)
            return
        if complete:
            self._complete(self._answer)

    def eof_received(self) -> bool | None:
        self.closed = True  # the transport closes next: never hand this connection out again
        answer = self._answer
        if answer is not None and self._waiter is not None and answer.finish_at_eof(self._buffer):
            self._complete(answer)
        return None  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._on_lost(self)
        if not self.lost.done():
            self.lost.set_result(None)
        reason = exc or ConnectionResetError("the server closed the connection without an answer")
        self._settle_error(reason)

    def _complete(self, answer: _Answer) -> None:
        waiter, self._waiter, self._answer = self._waiter, None, None
        if self._unsent():
            # The answer came before the whole request was written: the server could read
            # the rest as a new request. Drop what is queued rather than flush it.
            self.abort()
        elif self._buffer or not answer.keep_alive:
            self.close()  # leftover bytes or an announced close: never reuse
        if waiter is not None and not waiter.done():
            waiter.set_result(HttpAnswer(answer.status, answer.headers, answer.body))

    def _fail(self, exc: Exception) -> None:
        self._settle_error(exc)
        self.close()

    def _settle_error(self, exc: BaseException) -> None:
        waiter, self._waiter, self._answer = self._waiter, None, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)

    def _unsent(self) -> bool:
        return self._transport is not None and self._transport.get_write_buffer_size() > 0

    def close(self) -> None:
        """Close the connection; a request still waiting on it fails now, not when (or if) a
        TLS peer acknowledges the close."""
        self.closed = True
        self._settle_error(ConnectionAbortedError("the connection was closed by the client"))
        if self._transport is not None:
            self._transport.close()

    def abort(self) -> None:
        self.closed = True
        self._settle_error(ConnectionAbortedError("the connection was closed by the client"))
        if self._transport is not None:
            self._transport.abort()


class ConnectionPool:
    """Keep-alive connections to one `host:port` (TLS when `ssl_context` is given).

    One timer at a time serves every request's deadline (a timer per request costs a heap push
    and pop): it fires at the earliest deadline, fails what has expired and moves on to the
    next. Deadlines mostly arrive in order (every request has the same `timeout`), but one that
    spent long connecting can come in earlier than the timer: the timer is moved forward then.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None,
        limit: int,
        timeout: float,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.host = host
        self._port = port
        self._ssl = ssl_context
        self._timeout = timeout
        self._free = limit  # request slots
        self._slot_waiters: deque[asyncio.Future[None]] = deque()
        self._idle: list[_Connection] = []
        self._open: set[_Connection] = set()  # idle or busy, until the connection is lost
        self._loop = asyncio.get_running_loop()
        self._clock = clock or self._loop.time
        self._deadlines: dict[asyncio.Future[HttpAnswer], float] = {}  # in deadline order
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._opening: set[asyncio.Task[tuple[asyncio.Transport, _Connection]]] = set()

    async def request(self, data: bytes) -> HttpAnswer:
        """Send `data` (a whole request) and return the answer.

        Raises TimeoutError when the deadline passes, OSError (ConnectionError,
        HttpProtocolError, ssl errors) when the transport fails.
        """
        self._refuse_if_closed()
        now = self._loop.time()
        deadline = now + self._timeout
        if self._free > 0:
            self._free -= 1
        else:
            await self._wait_for_slot(deadline)
        try:
            self._refuse_if_closed()  # closed while this request waited for a slot
            connection = self._idle_connection(now)
            if connection is None:
                async with asyncio.timeout_at(deadline):
                    connection = await self._connect()
            waiter = connection.send(data)
            self._watch(waiter, deadline)
            try:
                answer = await waiter
            except BaseException:
                connection.close()  # mid-request: the connection's state is unknown
                raise
            finally:
                self._deadlines.pop(waiter, None)
            if not connection.closed:
                connection.idle_since = self._clock()
                self._idle.append(connection)
            return answer
        finally:
            self._release_slot()

    def _refuse_if_closed(self) -> None:
        if self._closed:
            raise ConnectionAbortedError(f"the connection pool to {self.host} is closed")

    async def _wait_for_slot(self, deadline: float) -> None:
        slot = self._loop.create_future()
        self._slot_waiters.append(slot)
        try:
            async with asyncio.timeout_at(deadline):
                await slot
        except BaseException:
            if slot.done() and not slot.cancelled():
                self._release_slot()  # handed a slot just as the wait ended: pass it on
            else:
                slot.cancel()
            raise

    def _release_slot(self) -> None:
        while self._slot_waiters:
            waiter = self._slot_waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot goes straight to the next in line
                return
        self._free += 1

    def _watch(self, waiter: asyncio.Future[HttpAnswer], deadline: float) -> None:
        self._deadlines[waiter] = deadline
        sweeper = self._sweeper
        if sweeper is None or deadline < sweeper.when():
            if sweeper is not None:
                sweeper.cancel()
            self._sweeper = self._loop.call_at(deadline, self._sweep)

    def _sweep(self) -> None:
        """Fail the requests whose deadline passed; wake again at the next deadline.

        A pass looks at every request in flight: at most `limit` of them, and it runs about
        once per `timeout` while requests finish in time.
        """
        self._sweeper = None
        now = self._loop.time()
        deadlines = self._deadlines
        expired = [waiter for waiter, deadline in deadlines.items() if deadline <= now]
        for waiter in expired:
            del deadlines[waiter]
            if not waiter.done():
                waiter.set_exception(TimeoutError())
        if deadlines:
            self._sweeper = self._loop.call_at(min(deadlines.values()), self._sweep)

    def _idle_connection(self, now: float) -> _Connection | None:
        while self._idle:
            connection = self._idle.pop()
            if connection.closed:
                continue
            if now - connection.idle_since > IDLE_SECONDS:
                connection.close()
                continue
            return connection
        return None

    async def _connect(self) -> _Connection:
        """Open a connection in a task of its own, so that `close()` can stop it (a TLS
        handshake with a silent peer would otherwise last until the request's deadline)."""
        opening = self._loop.create_task(
            self._loop.create_connection(
                lambda: _Connection(self._loop, on_lost=self._open.discard),
                self.host,
                self._port,
                ssl=self._ssl,
                server_hostname=self.host if self._ssl is not None else None,
            )
        )
        self._opening.add(opening)
        try:
            _, connection = await opening
        except asyncio.CancelledError:
            _discard_opened(opening)
            task = asyncio.current_task()
            if opening.cancelled() and task is not None and not task.cancelling():
                self._refuse_if_closed()  # stopped by close(), not by the caller or deadline
            raise
        finally:
            self._opening.discard(opening)
        self._open.add(connection)
        if self._closed:  # the pool closed while this connection was being opened
            connection.close()
            self._refuse_if_closed()
        return connection

    async def close(self) -> None:
        """Close every connection (requests in flight fail with a connection error) and wait,
        briefly, until they are closed."""
        self._closed = True
        for opening in self._opening:
            opening.cancel()
        connections = list(self._open)
        self._idle.clear()
        for connection in connections:
            connection.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        lost = [connection.lost for connection in connections]
        if lost:
            await asyncio.wait(lost, timeout=CLOSE_SECONDS)
            for connection in connections:
                if not connection.lost.done():
                    connection.abort()  # a TLS peer that does not answer the close


def _discard_opened(opening: asyncio.Task[tuple[asyncio.Transport, _Connection]]) -> None:
    """The caller gave up just as `opening` ended: close what it opened (nobody else knows
    of it), or retrieve its error (asyncio would log it as never retrieved)."""
    if opening.done() and not opening.cancelled() and opening.exception() is None:
        opening.result()[1].close()
