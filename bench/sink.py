"""A minimal stand-in for SLS that accepts every UpdateCheckPoint at almost no CPU cost.

    python bench/sink.py     # prints `sink listening on http://127.0.0.1:PORT`

The emulator verifies signatures and keeps every checkpoint's history, at about 300 µs of CPU
per call: a cycle of 100,000 shards would take it half a minute whatever cpmgr does. The
memory and stall scenarios measure cpmgr's side of such cycles, so they send them here: a
keep-alive HTTP/1.1 server on a bare asyncio Protocol that reads each request and its body,
keeps the latest checkpoint per shard and answers 200 with an `x-log-requestid`, as SLS does.
`GET /_sink/state` answers `{"calls": N, "values": {checkpoint: shards holding it}}`.
Standard library only; runs until SIGTERM or SIGINT.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import Counter
from typing import Final

_OK: Final = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nx-log-requestid: sink\r\n"
    b"Connection: keep-alive\r\n\r\n"
)
_HEAD_END: Final = b"\r\n\r\n"


class SinkState:
    def __init__(self) -> None:
        self.calls = 0
        self.latest: dict[int, str] = {}

    def update(self, body: bytes) -> None:
        document = json.loads(body)
        self.latest[int(document["shard"])] = str(document["checkpoint"])
        self.calls += 1

    def answer(self) -> bytes:
        payload = json.dumps({"calls": self.calls, "values": Counter(self.latest.values())})
        head = "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
        head += f"Content-Length: {len(payload)}\r\n\r\n"
        return (head + payload).encode()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
        if name.strip().lower() == b"transfer-encoding":
            raise ValueError("chunked bodies are not supported")
    return 0


class _Connection(asyncio.Protocol):
    """Parses keep-alive requests as they complete and answers each one in order."""

    def __init__(self, state: SinkState) -> None:
        self._state = state
        self._buffer = b""
        self._transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        answers = []
        while (end := self._buffer.find(_HEAD_END)) >= 0:
            head = self._buffer[:end]
            start = end + len(_HEAD_END)
            stop = start + _content_length(head)
            if len(self._buffer) < stop:
                break
            answers.append(self._handle(head, self._buffer[start:stop]))
            self._buffer = self._buffer[stop:]
        if answers and self._transport is not None:
            self._transport.write(b"".join(answers))

    def _handle(self, head: bytes, body: bytes) -> bytes:
        method, path, _ = head.split(b"\r\n", 1)[0].split(b" ", 2)
        if path.startswith(b"/_sink/state"):
            return self._state.answer()
        if method == b"POST" and b"type=checkpoint" in path:
            self._state.update(body)
        return _OK


async def serve() -> None:
    state = SinkState()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: _Connection(state), "127.0.0.1", 0, backlog=1024)
    port = server.sockets[0].getsockname()[1]
    print(f"sink listening on http://127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()


if __name__ == "__main__":
    asyncio.run(serve())
