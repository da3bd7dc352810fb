"""Bare asyncio Unix socket servers that parse each line with json.loads and answer
`{"ok":true}`: the floor the ingest path is compared with.

- `streams`: asyncio streams, `readuntil` per line, one write per answer (the obvious server).
- `protocol`: an asyncio Protocol that parses every complete line of a chunk and answers them
  all in one write (about the least work asyncio can do for this protocol).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Final, Literal

BaselineKind = Literal["streams", "protocol"]

_OK: Final = b'{"ok":true}\n'
_LIMIT: Final = 1024 * 1024


async def _serve_streams(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            line = await reader.readuntil(b"\n")
            json.loads(line)
            writer.write(_OK)
            await writer.drain()  # returns at once unless the peer stops reading
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


class _LineProtocol(asyncio.Protocol):
    """Answers every complete line of each chunk in one write."""

    def __init__(self) -> None:
        self._transport: asyncio.Transport | None = None
        self._tail = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        lines = (self._tail + data).split(b"\n")
        self._tail = lines.pop()
        for line in lines:
            json.loads(line)
        if lines and self._transport is not None:
            self._transport.write(_OK * len(lines))


@contextlib.asynccontextmanager
async def running_baseline(kind: BaselineKind, path: str) -> AsyncIterator[asyncio.Server]:
    """Serve on the Unix socket `path` for the duration of an `async with`."""
    if kind == "streams":
        server = await asyncio.start_unix_server(_serve_streams, path, limit=_LIMIT)
    else:
        loop = asyncio.get_running_loop()
        server = await loop.create_unix_server(_LineProtocol, path)
    try:
        yield server
    finally:
        server.close()
        await server.wait_closed()
