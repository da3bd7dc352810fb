"""The SLS keep-alive HTTP client against hostile or broken loopback servers that write exact
bytes: bounded memory, strict framing, deadlines, TLS verification, no leaked connections."""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme

from cpmgr.errors import SLSError
from cpmgr.sls.client import SLSClient
from cpmgr.sls.http import (
    MAX_ANSWER_BYTES,
    MAX_HEAD_BYTES,
    ConnectionPool,
    HttpAnswer,
    HttpProtocolError,
)
from cpmgr.sls.signer import Credentials

CREDS = Credentials("testAccessKeyId", "s3cret")
PROJECT, LOGSTORE, GROUP = "test-project", "test-logstore", "test-cg"
CHECKPOINT = "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="
REQUEST = b"GET / HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\n\r\n"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BOUND = 10.0  # seconds: an upper bound for waits that normally take milliseconds

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes:
    """One whole request (head and Content-Length body) from the client."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    return head + await reader.readexactly(length)


@dataclass
class RawServer:
    """A loopback server whose `handler` writes exact bytes; it counts the connections open
    from the server's side (one ends when the client closes it or the handler does)."""

    handler: Handler
    port: int = 0
    accepted: int = 0
    open: int = 0
    peak: int = 0
    received: bytearray = field(default_factory=bytearray)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        await self._count(+1)
        try:
            await self.handler(reader, writer)
            while data := await reader.read(65536):  # until the client closes its end
                self.received += data
        except (OSError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass  # torn down by the fixture: end quietly (3.11 logs a cancelled handler)
        finally:
            writer.close()
            await self._count(-1)
            self.tasks.discard(task)

    async def _count(self, delta: int) -> None:
        async with self.changed:
            self.open += delta
            if delta > 0:
                self.accepted += 1
                self.peak = max(self.peak, self.open)
            self.changed.notify_all()

    async def until_all_closed(self) -> None:
        async with asyncio.timeout(BOUND), self.changed:
            await self.changed.wait_for(lambda: self.open == 0)


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[RawServer]]]:
    servers: list[tuple[asyncio.Server, RawServer]] = []

    async def start(handler: Handler, *, tls: ssl.SSLContext | None = None) -> RawServer:
        raw = RawServer(handler)
        server = await asyncio.start_server(raw.serve, "127.0.0.1", 0, ssl=tls)
        raw.port = server.sockets[0].getsockname()[1]
        servers.append((server, raw))
        return raw

    yield start
    for server, raw in servers:
        server.close()
        for task in list(raw.tasks):
            task.cancel()
        await asyncio.gather(*raw.tasks, return_exceptions=True)
        await server.wait_closed()


def answering(*answers: bytes, then_close: bool = False) -> Handler:
    """Each request on a connection gets the next of `answers`; afterwards, keep it open (or
    close it)."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        for answer in answers:
            await read_request(reader)
            writer.write(answer)
        if then_close:
            writer.close()

    return handle


def pool_to(server: RawServer, *, limit: int = 4, timeout: float = BOUND) -> ConnectionPool:
    return ConnectionPool("127.0.0.1", server.port, ssl_context=None, limit=limit, timeout=timeout)


def client_to(port: int, *, scheme: str = "http", **options: object) -> SLSClient:
    return SLSClient(
        endpoint=f"{scheme}://127.0.0.1:{port}",
        credentials=lambda: CREDS,
        **options,  # type: ignore[arg-type]
    )


async def failure(call: Awaitable[object]) -> SLSError:
    with pytest.raises(SLSError) as caught:
        await call
    return caught.value


async def commit(client: SLSClient, shard: int = 0) -> None:
    await client.update_checkpoint(PROJECT, LOGSTORE, GROUP, shard, CHECKPOINT)


# --- heads and bodies: memory stays bounded --------------------------------------------------


async def test_headers_that_never_end_fail_at_the_head_limit(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    async def endless_header(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nX-Junk: ")
        while not writer.is_closing():  # until the client gives up
            writer.write(b"a" * 16384)
            await writer.drain()

    server = await serve(endless_header)
    pool = pool_to(server)
    with pytest.raises(HttpProtocolError, match="headers too large"):
        await pool.request(REQUEST)
    await server.until_all_closed()
    await pool.close()


async def test_a_huge_head_sent_whole_is_refused(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    # Before: a head with its end in the same read was parsed whatever its size.
    head = b"HTTP/1.1 200 OK\r\n" + b"X-Junk: a\r\n" * (MAX_HEAD_BYTES // 8) + b"Content-Length: 0"
    server = await serve(answering(head + b"\r\n\r\n"))
    pool = pool_to(server)
    with pytest.raises(HttpProtocolError, match="headers too large"):
        await pool.request(REQUEST)
    await pool.close()


async def test_a_100k_shard_get_checkpoint_answer_fits_under_the_body_limit(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    # The largest realistic answer: 100,000 shards, 128-byte consumer names, SDK-style spacing.
    entries = [
        {
            "shard": shard,
            "checkpoint": CHECKPOINT,
            "updateTime": 1524224984800922,
            "consumer": "c" * 128,
        }
        for shard in range(100_000)
    ]
    body = json.dumps(entries).encode()
    assert 16 * 1024 * 1024 < len(body) < MAX_ANSWER_BYTES
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    server = await serve(answering(answer))
    async with client_to(server.port, request_timeout=60) as client:
        checkpoints = await client.get_checkpoint(PROJECT, LOGSTORE, GROUP)
    assert len(checkpoints) == 100_000


@pytest.mark.parametrize(
    "framing",
    [
        b"Content-Length: %d\r\n\r\n" % (MAX_ANSWER_BYTES + 1),
        b"\r\n",  # read to close, never closed
        b"Transfer-Encoding: chunked\r\n\r\n",
    ],
    ids=["content-length", "read-to-close", "chunked"],
)
async def test_a_body_over_the_limit_fails_early_whatever_its_framing(
    serve: Callable[..., Awaitable[RawServer]], framing: bytes
) -> None:
    chunked = b"chunked" in framing

    async def flood(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\n" + framing)
        piece = b"100000\r\n" + b"x" * 0x100000 + b"\r\n" if chunked else b"x" * 0x100000
        while not writer.is_closing():
            writer.write(piece)
            await writer.drain()

    server = await serve(flood)
    pool = pool_to(server, timeout=60)
    with pytest.raises(HttpProtocolError, match=r"too large|bad Content-Length"):
        await pool.request(REQUEST)
    await server.until_all_closed()
    await pool.close()


# --- framing -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 9\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 2, 9\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: -2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: +2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: 0x2\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nContent-Length: " + b"9" * 5000 + b"\r\n\r\nok",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: identity\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 099 Odd\r\nContent-Length: 2\r\n\r\nok",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\n\r\n" + OK,
    ],
    ids=[
        "duplicate-content-length",
        "listed-content-length",
        "negative-length",
        "signed-length",
        "hex-length",
        "5000-digit-length",
        "gzip-transfer-encoding",
        "identity-transfer-encoding",
        "four-digit-status",
        "status-below-100",
        "101-switching",
    ],
)
async def test_ambiguous_framing_is_a_retryable_connection_error(
    serve: Callable[..., Awaitable[RawServer]], answer: bytes
) -> None:
    # Before: the 5000-digit length escaped as a bare ValueError, duplicate lengths used the
    # last one, a four-digit status read as its first three digits, and the other codings,
    # 101 and status 99 were taken as answers.
    server = await serve(answering(answer))
    async with client_to(server.port) as client:
        err = await failure(commit(client))
    assert (err.code, err.status, err.retryable) == ("ConnectionError", 0, True)
    await server.until_all_closed()


async def test_repeated_identical_content_lengths_are_one_length(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    server = await serve(
        answering(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nok")
    )
    pool = pool_to(server)
    assert (await pool.request(REQUEST)).body == b"ok"
    await pool.close()


@pytest.mark.parametrize(
    "chunks",
    [
        b"0x2\r\nok\r\n0\r\n\r\n",
        b"+2\r\nok\r\n0\r\n\r\n",
        b"-2\r\nok\r\n0\r\n\r\n",
        b"0_2\r\nok\r\n0\r\n\r\n",
        b"\r\nok\r\n0\r\n\r\n",
        b"1\r\nok\r\n0\r\n\r\n",  # the size is one short: the data is not followed by CRLF
        b"3\r\nok\r\n0\r\n\r\n",  # one long: swallows the CR
        b"fffffffffffffff\r\nok\r\n",
        b"2" + b"0" * (8 * 1024) + b"\r\n",
        b"2;" + b"e" * (8 * 1024) + b"\r\nok\r\n0\r\n\r\n",
    ],
    ids=[
        "0x-prefix",
        "plus-sign",
        "negative",
        "underscore",
        "empty-size",
        "short-size",
        "long-size",
        "huge-size",
        "endless-size-line",
        "endless-extension",
    ],
)
async def test_bad_chunk_sizes_are_protocol_errors(
    serve: Callable[..., Awaitable[RawServer]], chunks: bytes
) -> None:
    # Before: int(..., 16) took 0x, + and _, a wrong size skipped two data bytes blindly, and
    # a size line could grow to the whole body limit.
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    server = await serve(answering(head + chunks))
    pool = pool_to(server)
    with pytest.raises(HttpProtocolError):
        await pool.request(REQUEST)
    await server.until_all_closed()
    await pool.close()


async def test_chunked_trailers_are_skipped_and_the_connection_reused(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2;name=value\r\nok\r\n0\r\nX-Trailer: 1\r\nX-Other: 2\r\n\r\n"
    )
    server = await serve(answering(chunked, OK))
    pool = pool_to(server)
    assert (await pool.request(REQUEST)).body == b"ok"
    assert (await pool.request(REQUEST)).body == b"ok"
    assert server.accepted == 1
    await pool.close()


async def test_trailers_that_never_end_are_bounded(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    async def endless_trailers(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n")
        while not writer.is_closing():
            writer.write(b"X-T: 1\r\n" * 2048)
            await writer.drain()

    server = await serve(endless_trailers)
    pool = pool_to(server)
    with pytest.raises(HttpProtocolError, match="trailers too large"):
        await pool.request(REQUEST)
    await pool.close()


async def test_tiny_chunks_parse_in_time_linear_in_their_count(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    # Before: every chunk re-summed the sizes of all earlier ones (quadratic): 160,000 one-byte
    # chunks took minutes of loop time.
    def answer(count: int) -> bytes:
        head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        return head + b"1\r\nx\r\n" * count + b"0\r\n\r\n"

    small, large = answer(20_000), answer(160_000)
    server = await serve(answering(small, large))
    pool = pool_to(server, timeout=120)
    started = time.process_time()
    assert len((await pool.request(REQUEST)).body) == 20_000
    small_cpu = time.process_time() - started
    started = time.process_time()
    assert len((await pool.request(REQUEST)).body) == 160_000
    large_cpu = time.process_time() - started
    assert large_cpu < 30 * max(small_cpu, 0.01)  # linear: ~8x; quadratic: ~64x
    await pool.close()


# --- when a connection may be reused ----------------------------------------------------------


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\nConnection: keep-alive\r\n\r\nok", True),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok", False),
        (b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: Upgrade, Close\r\n\r\nok", False),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: x\r\nConnection: close\r\n\r\nok",
            False,
        ),
        (
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"2\r\nok\r\n0\r\n\r\n",
            False,
        ),
        (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: x\r\n\r\n" + OK, True),
    ],
    ids=[
        "http-1.0",
        "http-1.0-keep-alive",
        "close",
        "close-in-a-list",
        "close-in-a-second-header",
        "chunked-and-length",
        "interim-answers",
    ],
)
async def test_connection_reuse_follows_what_the_answer_announced(
    serve: Callable[..., Awaitable[RawServer]], answer: bytes, reused: bool
) -> None:
    server = await serve(answering(answer, OK, then_close=not reused))
    pool = pool_to(server)
    assert (await pool.request(REQUEST)).body == b"ok"
    assert (await pool.request(REQUEST)).body == b"ok"
    assert server.accepted == (1 if reused else 2)
    await pool.close()


async def test_pipelined_leftovers_are_never_read_as_the_next_answer(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    stale = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nstale"
    fresh = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nfresh"
    first_done = asyncio.Event()
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        if connections == 1:
            writer.write(OK + stale)  # in the same segment
        elif connections == 2:
            writer.write(OK)
            await first_done.wait()
            writer.write(stale)  # later, while the connection is idle
        else:
            writer.write(fresh)

    server = await serve(handle)
    pool = pool_to(server)
    assert (await pool.request(REQUEST)).body == b"ok"
    assert (await pool.request(REQUEST)).body == b"ok"
    first_done.set()
    async with asyncio.timeout(BOUND), server.changed:
        await server.changed.wait_for(lambda: server.open == 0)  # the idle one is dropped
    assert (await pool.request(REQUEST)).body == b"fresh"
    await pool.close()


async def test_an_answer_before_the_request_is_written_retires_the_connection(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    # The server answers after the head without reading a large body: the rest of the body
    # is still queued, and would have been read by the server as the next request.
    body = b"x" * (32 * 1024 * 1024)
    request = b"POST / HTTP/1.1\r\nHost: test\r\nContent-Length: %d\r\n\r\n" % len(body) + body
    early = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not early.is_set():
            early.set()
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 413 Too Large\r\nContent-Length: 0\r\n\r\n")
            await asyncio.Event().wait()  # never reads on
        await read_request(reader)
        writer.write(OK)

    server = await serve(handle)
    pool = pool_to(server)
    assert (await pool.request(request)).status == 413
    assert (await pool.request(REQUEST)).body == b"ok"
    assert server.accepted == 2
    await pool.close()


# --- failures mid-request -------------------------------------------------------------------------


async def test_a_server_that_closes_after_the_request_may_have_applied_it(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    server = await serve(answering(b"", then_close=True))
    async with client_to(server.port) as client:
        err = await failure(commit(client))
    assert (err.code, err.status) == ("ConnectionError", 0)
    assert err.may_have_landed and err.retryable


async def test_a_trickling_answer_times_out_at_the_deadline(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    async def trickle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        for byte in OK:  # whole in 2 s: each byte is well within any per-read timeout
            if writer.is_closing():
                return
            writer.write(bytes([byte]))
            await asyncio.sleep(0.05)  # the attack itself: one byte every 50 ms

    server = await serve(trickle)
    async with client_to(server.port, request_timeout=0.5) as client:
        started = time.monotonic()
        err = await failure(commit(client))
        elapsed = time.monotonic() - started
    assert (err.code, err.status, err.may_have_landed) == ("Timeout", 0, True)
    assert 0.45 < elapsed < 1.5
    await server.until_all_closed()


async def test_a_deadline_earlier_than_the_timer_is_still_kept() -> None:
    # Requests that spent long connecting register their deadline after later ones.
    # Before: the single timer only looked at the oldest registered deadline, so such a
    # request failed late, at the deadline of the request registered before it.
    pool = ConnectionPool("127.0.0.1", 9, ssl_context=None, limit=4, timeout=BOUND)
    loop = asyncio.get_running_loop()
    late: asyncio.Future[HttpAnswer] = loop.create_future()
    early: asyncio.Future[HttpAnswer] = loop.create_future()
    pool._watch(late, loop.time() + 60)
    pool._watch(early, loop.time() + 0.1)
    started = time.monotonic()
    await asyncio.wait([early], timeout=BOUND)
    assert time.monotonic() - started < BOUND / 2
    assert isinstance(early.exception(), TimeoutError)
    assert not late.done()
    await pool.close()


async def test_cancelling_a_request_discards_its_connection_and_returns_its_slot(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    arrived = asyncio.Event()

    async def hang_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        if not arrived.is_set():
            arrived.set()
            return  # no answer; the connection stays open
        writer.write(OK)

    server = await serve(hang_first)
    pool = pool_to(server, limit=1)
    pending = asyncio.ensure_future(pool.request(REQUEST))
    await asyncio.wait_for(arrived.wait(), BOUND)
    pending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await pending
    await server.until_all_closed()  # the half-used connection was closed
    assert (await asyncio.wait_for(pool.request(REQUEST), BOUND)).body == b"ok"
    await pool.close()


async def test_cancelling_at_every_step_leaks_no_connection(
    serve: Callable[..., Awaitable[RawServer]], caplog: pytest.LogCaptureFixture
) -> None:
    server = await serve(answering(OK, OK, OK))
    pool = pool_to(server, limit=2)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        for steps in range(40):  # cancel after 0, 1, 2... turns of the loop
            pending = asyncio.ensure_future(pool.request(REQUEST))
            for _ in range(steps):
                await asyncio.sleep(0)
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)
        assert (await asyncio.wait_for(pool.request(REQUEST), BOUND)).body == b"ok"
        await pool.close()
        await server.until_all_closed()  # a connection the pool lost track of stays open
    assert not caplog.records


async def test_close_with_requests_in_flight_and_queued_fails_them_all_and_leaks_nothing(
    serve: Callable[..., Awaitable[RawServer]], caplog: pytest.LogCaptureFixture
) -> None:
    arrived = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()

    server = await serve(never_answer)
    tasks_before = asyncio.all_tasks()
    client = client_to(server.port, connection_limit=1, request_timeout=60)
    await client.start()
    in_flight = asyncio.ensure_future(commit(client, 0))
    queued = asyncio.ensure_future(commit(client, 1))  # waits for the only slot
    await asyncio.wait_for(arrived.wait(), BOUND)
    with caplog.at_level(logging.WARNING, logger="asyncio"):
        async with asyncio.timeout(BOUND):
            await client.close()
            errors = [await failure(in_flight), await failure(queued)]
    assert [(err.code, err.status) for err in errors] == [("ConnectionError", 0)] * 2
    # Before: the queued request got the slot after close and opened a second connection.
    await server.until_all_closed()
    assert server.accepted == 1
    assert not caplog.records
    assert asyncio.all_tasks() - tasks_before - server.tasks == set()


async def test_close_does_not_wait_for_a_tls_peer_to_answer(
    serve: Callable[..., Awaitable[RawServer]], tls: TLS
) -> None:
    arrived = asyncio.Event()

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        arrived.set()

    server = await serve(never_answer, tls=tls.server("127.0.0.1"))
    client = client_to(server.port, scheme="https", ssl_context=tls.trusting, request_timeout=60)
    await client.start()
    pending = asyncio.ensure_future(commit(client))
    await asyncio.wait_for(arrived.wait(), BOUND)
    started = time.monotonic()
    await client.close()
    err = await failure(pending)
    assert err.code == "ConnectionError"
    assert time.monotonic() - started < BOUND / 2


async def test_close_stops_a_tls_handshake_with_a_silent_peer(
    serve: Callable[..., Awaitable[RawServer]], tls: TLS
) -> None:
    # Before: a request still connecting when the pool closed waited for its deadline, then
    # could open a connection nobody would close.
    accepted = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.set()
        await reader.read(65536)  # the ClientHello, never answered

    server = await serve(silent)
    client = client_to(server.port, scheme="https", ssl_context=tls.trusting, request_timeout=60)
    await client.start()
    pending = asyncio.ensure_future(commit(client))
    await asyncio.wait_for(accepted.wait(), BOUND)
    started = time.monotonic()
    await client.close()
    err = await asyncio.wait_for(failure(pending), BOUND)
    assert (err.code, err.status) == ("ConnectionError", 0)
    assert time.monotonic() - started < BOUND / 2
    await server.until_all_closed()


async def test_the_pool_never_exceeds_its_limit_and_leaks_nothing_after_errors(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    count = 0

    async def mixed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        while True:
            await read_request(reader)
            count += 1
            await asyncio.sleep(0)  # let other connections interleave
            if count % 5 == 0:
                writer.close()  # no answer
                return
            if count % 7 == 0:
                writer.write(b"garbage\r\n\r\n")
                return
            writer.write(OK)

    server = await serve(mixed)
    pool = pool_to(server, limit=4)
    results = await asyncio.gather(
        *(pool.request(REQUEST) for _ in range(200)), return_exceptions=True
    )
    failures = [result for result in results if isinstance(result, BaseException)]
    assert failures and all(isinstance(result, ConnectionError) for result in failures)
    assert server.peak <= 4
    assert len(pool._open) <= 4
    await pool.close()
    await server.until_all_closed()
    assert not pool._open


# --- TLS ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TLS:
    ca: trustme.CA
    trusting: ssl.SSLContext

    def server(self, *names: str) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.ca.issue_cert(*names).configure_cert(context)
        return context


@pytest.fixture(scope="module")
def tls() -> TLS:
    ca = trustme.CA()
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    return TLS(ca, trusting)


async def test_tls_to_an_ipv4_literal_checks_the_address(
    serve: Callable[..., Awaitable[RawServer]], tls: TLS
) -> None:
    good = await serve(answering(OK), tls=tls.server("127.0.0.1"))
    async with client_to(good.port, scheme="https", ssl_context=tls.trusting) as client:
        await commit(client)

    wrong = await serve(answering(OK), tls=tls.server("127.0.0.2", "example.org"))
    async with client_to(wrong.port, scheme="https", ssl_context=tls.trusting) as client:
        err = await failure(commit(client))
    assert err.code == "ConnectionError"
    assert "CERTIFICATE_VERIFY_FAILED" in err.message and "mismatch" in err.message


async def test_a_self_signed_certificate_fails_verification(
    serve: Callable[..., Awaitable[RawServer]],
) -> None:
    other = trustme.CA()  # not trusted by the client: as good as self-signed
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    other.issue_cert("127.0.0.1").configure_cert(context)
    server = await serve(answering(OK), tls=context)
    async with client_to(server.port, scheme="https") as client:
        err = await failure(commit(client))
    assert err.code == "ConnectionError"
    assert "CERTIFICATE_VERIFY_FAILED" in err.message


async def test_https_to_a_plain_server_never_falls_back_to_plain_http(
    serve: Callable[..., Awaitable[RawServer]], tls: TLS
) -> None:
    async def plain(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        server.received += await reader.read(65536)
        writer.write(OK)

    server = await serve(plain)
    async with client_to(server.port, scheme="https", ssl_context=tls.trusting) as client:
        err = await failure(commit(client))
    assert err.code == "ConnectionError"
    assert server.received.startswith(b"\x16\x03")  # a TLS ClientHello
    assert b"Authorization" not in server.received and b"POST" not in server.received
