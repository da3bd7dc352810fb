"""The emulator's HTTP/1.1 server: a small `asyncio.Protocol` in front of `EmulatorApp`.

Why not aiohttp.web: the emulator stands in for SLS in the commit-path benchmark, where it must
not be the bottleneck; aiohttp's server machinery alone cost about twice the daemon's whole
UpdateCheckPoint budget per request. SLS clients need little of HTTP/1.1: keep-alive,
`Content-Length` or chunked request bodies, `Expect: 100-continue`. A request is parsed here
and handed to the app, which answers at once or, when the request must wait (injected latency,
a late landing), with a coroutine run as a task; answers go out in request order.

Decisions where the contract is silent:
- A request head over `MAX_HEAD_BYTES` or not HTTP/1.x gets 400 `ParameterInvalid` and the
  connection is closed; a body over the app's limit is not read: the app answers it (413) and
  the connection is closed.
- Idle keep-alive connections stay open until the client closes them or the emulator stops.
"""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import Callable, Coroutine, Mapping
from types import MappingProxyType
from typing import Any, Final, NamedTuple
from urllib.parse import parse_qsl, unquote

from cpmgr.sls.http import READ_BYTES, parse_chunk_size

MAX_HEAD_BYTES: Final = 64 * 1024
_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    413: "Payload Too Large",
    429: "Too Many Requests",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


# The records built for every request are NamedTuples, immutable as frozen dataclasses are but
# built without an `object.__setattr__` call per field: a tenth of an UpdateCheckPoint's CPU.


class HttpRequest(NamedTuple):
    """One request as received: `path` and `query` percent-decoded, header names lower-cased."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    transport: asyncio.Transport
    body_too_large: bool = False

    def header(self, name: str) -> str:
        """The value of header `name` (any case), "" if absent."""
        return self.headers.get(name.lower(), "")


_NO_HEADERS: Final[Mapping[str, str]] = MappingProxyType({})


class HttpAnswer(NamedTuple):
    """An answer to write; `abort` drops the connection instead (a TCP reset, no answer)."""

    status: int
    body: bytes = b""
    content_type: str = ""
    headers: Mapping[str, str] = _NO_HEADERS
    abort: bool = False

    @classmethod
    def json(cls, payload: object, status: int = 200) -> HttpAnswer:
        return cls(status, json.dumps(payload).encode(), "application/json; charset=utf-8")


ABORT: Final = HttpAnswer(0, abort=True)

Reply = HttpAnswer | Coroutine[Any, Any, HttpAnswer]
Responder = Callable[[HttpRequest], Reply]


def _status_line(status: int) -> str:
    return f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}\r\n"


_STATUS_LINES: Final = {status: _status_line(status) for status in _REASONS}


class BadRequest(ValueError):
    """The bytes received are not an HTTP/1.x request this server can read."""


class _Head(NamedTuple):
    method: str
    target: str
    keep_alive: bool
    headers: dict[str, str]
    length: int | None  # None: chunked
    too_large: bool
    expects_continue: bool


def _parse_head(text: str, max_body: int) -> _Head:
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1.") or not parts[1].startswith("/"):
        raise BadRequest(f"malformed request line {lines[0][:80]!r}")
    del lines[0]
    headers: dict[str, str] = {}
    known = _HEADER_NAMES
    for line in lines:
        name, colon, value = line.partition(":")
        lowered = known.get(name)
        if lowered is None or not colon:
            lowered = _header_name(line, name, colon)
        headers[lowered] = value.strip()
    connection = headers.get("connection")  # mostly absent: no calls for it then
    if connection is None:
        keep_alive = parts[2] != "HTTP/1.0"
    else:
        connection = connection.lower()
        keep_alive = connection != "close" if parts[2] != "HTTP/1.0" else connection == "keep-alive"
    encoding = headers.get("transfer-encoding")
    chunked = encoding is not None and "chunked" in encoding.lower()
    length = None if chunked else _content_length(headers.get("content-length", "0"))
    expect = headers.get("expect")
    expects_continue = expect is not None and expect.lower() == "100-continue"
    too_large = (length or 0) > max_body
    return _Head(parts[0], parts[1], keep_alive, headers, length, too_large, expects_continue)


# Header names as sent -> lower-cased, for names already found valid: clients send the same
# names on every request, so most lines cost one lookup. Bounded, so odd names cannot grow it.
_HEADER_NAMES: dict[str, str] = {}
_HEADER_NAMES_KEPT: Final = 256


def _header_name(line: str, name: str, colon: str) -> str:
    """The lower-cased name of header `line`; raises BadRequest if the line is malformed."""
    if not colon or not name or name != name.strip():
        raise BadRequest(f"malformed header line {line[:80]!r}")
    lowered = name.lower()
    if len(_HEADER_NAMES) < _HEADER_NAMES_KEPT:
        _HEADER_NAMES[name] = lowered
    return lowered


@functools.lru_cache(maxsize=256)
def _split_target(target: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    """The percent-decoded path and query parameters of a request target.

    Cached: a client sends the same few targets over and over (one per consumer group).
    """
    path, _, query = target.partition("?")
    return unquote(path), tuple(_query_params(query).items())


def _query_params(query: str) -> dict[str, str]:
    """`dict(parse_qsl(query, keep_blank_values=True))`; a query without escapes (what SLS
    clients send on every call) is split directly, which costs a fifth as much."""
    if "%" in query or "+" in query:
        return dict(parse_qsl(query, keep_blank_values=True))
    params: dict[str, str] = {}
    for pair in query.split("&"):
        if pair:
            name, _, value = pair.partition("=")
            params[name] = value
    return params


def _content_length(text: str) -> int:
    if not (text.isascii() and text.isdigit()):
        raise BadRequest(f"bad Content-Length {text[:40]!r}")
    return int(text)


class _ServerConnection(asyncio.BufferedProtocol):
    """One client connection: parse requests, answer them in order.

    Buffered, as `cpmgr.sls.http`'s connections, so that a read costs no allocation.
    """

    def __init__(self, server: HttpServer) -> None:
        self._server = server
        self._transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._head: _Head | None = None
        self._chunks: list[bytes] = []
        self._task: asyncio.Task[HttpAnswer] | None = None
        self._closing = False
        self._read_buffer = memoryview(bytearray(READ_BYTES))

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._server.connections.add(self)

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._read_buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.data_received(self._read_buffer[:nbytes])

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        self._server.connections.discard(self)
        # A handler already running goes on (the app decides what survives a disconnect).

    def data_received(self, data: bytes | memoryview) -> None:
        self._buffer += data
        if self._task is None:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        # Without bytes no request can complete (a body of 0 bytes completes with its head).
        while self._buffer and self._task is None and not self._closing:
            try:
                request = self._next_request()
            except BadRequest as exc:
                message = {"errorCode": "ParameterInvalid", "errorMessage": str(exc)}
                self._write(HttpAnswer.json(message, 400), keep_alive=False)
                return
            if request is None:
                return
            head = self._head
            assert head is not None
            self._head = None
            keep_alive = head.keep_alive and not request.body_too_large
            reply = self._server.responder(request)
            if isinstance(reply, HttpAnswer):
                self._write(reply, keep_alive=keep_alive)
                continue
            self._task = asyncio.get_running_loop().create_task(reply)
            self._server.tasks.add(self._task)
            self._task.add_done_callback(functools.partial(self._finished, keep_alive=keep_alive))

    def _finished(self, task: asyncio.Task[HttpAnswer], *, keep_alive: bool) -> None:
        self._server.tasks.discard(task)
        self._task = None
        if task.cancelled():
            self.abort()
            return
        self._write(task.result(), keep_alive=keep_alive)
        self._serve_buffered()

    def _next_request(self) -> HttpRequest | None:
        buffer = self._buffer
        if self._head is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > MAX_HEAD_BYTES:
                    raise BadRequest("request head too large")
                return None
            text = buffer[:end].decode("latin-1")
            del buffer[: end + 4]
            self._head = _parse_head(text, self._server.max_body)
            if self._head.expects_continue and not self._head.too_large:
                assert self._transport is not None
                self._transport.write(_CONTINUE)
        head = self._head
        if head.too_large:
            return self._request(head, b"", too_large=True)
        if head.length is None:
            body = self._chunked_body()
            return None if body is None else self._request(head, body)
        if len(buffer) < head.length:
            return None
        body = bytes(buffer[: head.length])
        del buffer[: head.length]
        return self._request(head, body)

    def _chunked_body(self) -> bytes | None:
        """The whole body once its last chunk (and trailers) arrived, else None."""
        buffer = self._buffer
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                return None
            try:
                size = parse_chunk_size(bytes(buffer[:line_end]))
            except ConnectionError as exc:
                raise BadRequest(str(exc)) from None
            if size == 0:
                return self._after_trailers(line_end + 2)
            if len(buffer) < line_end + 2 + size + 2:
                return None
            self._chunks.append(bytes(buffer[line_end + 2 : line_end + 2 + size]))
            del buffer[: line_end + 2 + size + 2]
            if sum(len(chunk) for chunk in self._chunks) > self._server.max_body:
                raise BadRequest("chunked body too large")

    def _after_trailers(self, start: int) -> bytes | None:
        buffer = self._buffer
        while True:  # trailer lines up to an empty one
            end = buffer.find(b"\r\n", start)
            if end < 0:
                return None
            if end == start:
                del buffer[: end + 2]
                body, self._chunks = b"".join(self._chunks), []
                return body
            start = end + 2

    def _request(self, head: _Head, body: bytes, *, too_large: bool = False) -> HttpRequest:
        assert self._transport is not None
        path, query = _split_target(head.target)
        return HttpRequest(
            method=head.method,
            path=path,
            query=dict(query),
            headers=head.headers,
            body=body,
            transport=self._transport,
            body_too_large=too_large,
        )

    def _write(self, answer: HttpAnswer, *, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or self._closing:
            return
        if answer.abort:
            self.abort()
            return
        status_line = _STATUS_LINES.get(answer.status) or _status_line(answer.status)
        head = f"{status_line}Content-Length: {len(answer.body)}\r\n"
        if answer.content_type:
            head += f"Content-Type: {answer.content_type}\r\n"
        for name, value in answer.headers.items():
            head += f"{name}: {value}\r\n"
        if not keep_alive:
            head += "Connection: close\r\n"
        transport.write(f"{head}\r\n".encode("latin-1") + answer.body)
        if not keep_alive:
            self._closing = True
            transport.close()

    def abort(self) -> None:
        self._closing = True
        if self._transport is not None:
            self._transport.abort()


class HttpServer:
    """Listens, parses and answers through `responder`; `close()` stops everything."""

    def __init__(self, responder: Responder, *, max_body: int) -> None:
        self.responder = responder
        self.max_body = max_body
        self.connections: set[_ServerConnection] = set()
        self.tasks: set[asyncio.Task[HttpAnswer]] = set()
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int, *, ssl_context: Any = None) -> int:
        """Listen on `host:port` (0: any free port); return the port. Raises OSError."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _ServerConnection(self), host, port, ssl=ssl_context, backlog=1024
        )
        port_number: int = self._server.sockets[0].getsockname()[1]
        return port_number

    async def close(self) -> None:
        """Stop listening, cancel running handlers, drop every connection."""
        if self._server is not None:
            self._server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for connection in list(self.connections):
            connection.abort()
        if self._server is not None:
            await self._server.wait_closed()
