"""One load-generating client process: pipelined commit lines over a Unix socket.

    python bench/loadgen.py --socket PATH --index I [--lines N] [--shards S] [--window W]
                            [--duration SECONDS]

It connects, builds every request line up front, prints `ready`, waits for `go` on stdin, then
sends its lines in windows of W (one write per window) and reads the W answers before sending
the next window, until N lines are answered or `duration` has passed. It prints one JSON line:
{"index", "sent", "ok", "first_error", "start", "end"} (times on the system-wide monotonic
clock, so the parent can line up several clients). Standard library only, so the client costs
as little CPU as possible on a machine it shares with the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Final

GROUP: Final = "bench"
OK_ANSWER: Final = b'{"ok":true}\n'
# Cursors are decimal numbers; starting high keeps them the same length (13 digits).
CURSOR_BASE: Final = 10**12
_RECV_BYTES: Final = 256 * 1024


def cursor(number: int) -> str:
    """The checkpoint (base64 of a decimal cursor) of line number `number`."""
    return base64.b64encode(str(CURSOR_BASE + number).encode()).decode()


def shard_of(index: int, number: int, shards: int) -> int:
    """Client `index` owns shards [index * shards, (index + 1) * shards), round robin."""
    return index * shards + number % shards


def last_cursors(index: int, lines: int, shards: int) -> dict[int, str]:
    """The checkpoint each shard of client `index` holds after `lines` lines: latest wins."""
    return {shard_of(index, n, shards): cursor(n) for n in range(max(0, lines - shards), lines)}


def commit_line(index: int, number: int, shards: int) -> bytes:
    """Line `number` of client `index`: a commit whose cursor grows on every shard."""
    shard = shard_of(index, number, shards)
    return (
        f'{{"op":"commit","group":"{GROUP}","shard":{shard},"checkpoint":"{cursor(number)}"}}\n'
    ).encode()


@dataclass(frozen=True)
class Result:
    """What one client did; `ok` counts answers equal to `{"ok":true}`."""

    index: int
    sent: int
    ok: int
    first_error: str | None
    start: float
    end: float


class _Answers:
    """Reads answer lines off a socket, counting them and the successful ones."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._tail = b""
        self.ok = 0
        self.first_error: str | None = None

    def read(self, count: int) -> None:
        """Block until `count` more answer lines have arrived."""
        while count > 0:
            chunk = self._sock.recv(_RECV_BYTES)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data = self._tail + chunk
            cut = data.rfind(b"\n") + 1
            complete, self._tail = data[:cut], data[cut:]
            lines = complete.count(b"\n")
            good = complete.count(OK_ANSWER)
            if good != lines and self.first_error is None:
                self.first_error = _first_bad(complete)
            self.ok += good
            count -= lines


def _first_bad(complete: bytes) -> str:
    bad = next(line for line in complete.split(b"\n") if line + b"\n" != OK_ANSWER)
    return bad[:300].decode("utf-8", "replace")


def run(
    sock: socket.socket, lines: Sequence[bytes], *, window: int, duration: float, index: int
) -> Result:
    """Send `lines` in windows; stop early once `duration` seconds have passed."""
    answers = _Answers(sock)
    sent = 0
    start = time.monotonic()
    while sent < len(lines) and time.monotonic() - start < duration:
        batch = lines[sent : sent + window]
        sock.sendall(b"".join(batch))
        answers.read(len(batch))
        sent += len(batch)
    end = time.monotonic()
    return Result(index, sent, answers.ok, answers.first_error, start, end)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--duration", type=float, default=10.0)
    args = parser.parse_args(argv)
    lines = [commit_line(args.index, n, args.shards) for n in range(args.lines)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(args.socket)
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        result = run(sock, lines, window=args.window, duration=args.duration, index=args.index)
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
