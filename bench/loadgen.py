"""One load-generating client process: commit lines over a Unix socket.

    python bench/loadgen.py --socket PATH --index I [--lines N] [--shards S] [--batch B]
                            [--first F] [--window W | --rate R [--summary]]
                            [--duration SECONDS]

It connects, prints `ready`, waits for `go` on stdin, then sends until N lines are answered or
`duration` has passed, in one of two ways:
- closed loop (default): windows of W lines (one write per window), reading the W answers before
  sending the next window: as fast as the server answers (every line is built before `ready`);
- open loop (`--rate R`): line n is due n / R seconds after the start and is sent as soon as it
  is due, whatever the answers; a second thread reads the answers and records each one's latency
  from the moment its line was due (so a server that falls behind shows it, not the sender);
  lines are built as they fall due, so a long run needs no memory for them.

Each line commits one checkpoint, or B of them (`checkpoints`, a batch) with `--batch B`; line
n's cursors encode n, and lines are numbered from F (a later run with a higher F moves every
shard forward).

It prints one JSON line: {"index", "sent", "ok", "first_error", "start", "end", "latencies",
"summary"} (times on the system-wide monotonic clock, so the parent can line up several clients;
`latencies` in seconds, open loop only; with `--summary`, only their count, p50, p99, p999 and
max in `summary`). Standard library only, so the client costs as little CPU as possible on a
machine it shares with the server.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import socket
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Final

GROUP: Final = "bench"
OK_PREFIX: Final = b'\n{"ok":true'
# Cursors are decimal numbers; starting high keeps them the same length (13 digits).
CURSOR_BASE: Final = 10**12
_RECV_BYTES: Final = 256 * 1024


def cursor(number: int) -> str:
    """The checkpoint (base64 of a decimal cursor) of line number `number`."""
    return base64.b64encode(str(CURSOR_BASE + number).encode()).decode()


def line_number(checkpoint: str) -> int:
    """The line number whose cursor is `checkpoint` (the inverse of `cursor`)."""
    return int(base64.b64decode(checkpoint)) - CURSOR_BASE


def shard_of(index: int, number: int, shards: int) -> int:
    """Client `index` owns shards [index * shards, (index + 1) * shards), round robin."""
    return index * shards + number % shards


def last_cursors(index: int, lines: int, shards: int) -> dict[int, str]:
    """The checkpoint each shard of client `index` holds after `lines` single-commit lines."""
    return {shard_of(index, n, shards): cursor(n) for n in range(max(0, lines - shards), lines)}


def commit_line(index: int, number: int, shards: int) -> bytes:
    """Line `number` of client `index`: a commit whose cursor grows on every shard."""
    shard = shard_of(index, number, shards)
    return (
        f'{{"op":"commit","group":"{GROUP}","shard":{shard},"checkpoint":"{cursor(number)}"}}\n'
    ).encode()


def batch_line(index: int, number: int, shards: int, batch: int) -> bytes:
    """Line `number` of client `index` as a batch of `batch` shards (the next ones round robin),
    every item with the line's cursor; `batch` <= `shards` keeps the shards of a line distinct."""
    value = cursor(number)
    items = ",".join(
        f'{{"shard":{shard_of(index, number * batch + j, shards)},"checkpoint":"{value}"}}'
        for j in range(batch)
    )
    return f'{{"op":"commit","group":"{GROUP}","checkpoints":[{items}]}}\n'.encode()


def line_maker(index: int, shards: int, batch: int, first: int = 0) -> Callable[[int], bytes]:
    """The k-th line (from 0) client `index` sends: line number `first + k`."""
    if batch <= 1:
        return lambda k: commit_line(index, first + k, shards)
    return lambda k: batch_line(index, first + k, shards, batch)


@dataclass(frozen=True)
class Result:
    """What one client did; `ok` counts answers starting `{"ok":true`."""

    index: int
    sent: int
    ok: int
    first_error: str | None
    start: float
    end: float
    latencies: list[float] = field(default_factory=list)
    summary: dict[str, float] = field(default_factory=dict)


def summarize(latencies: list[float]) -> dict[str, float]:
    """Count, p50, p99, p99.9 and max (nearest rank) of a non-empty list."""
    ordered = sorted(latencies)

    def rank(pct: float) -> float:
        return ordered[max(1, math.ceil(pct / 100 * len(ordered))) - 1]

    return {
        "count": len(ordered),
        "p50": rank(50),
        "p99": rank(99),
        "p999": rank(99.9),
        "max": ordered[-1],
    }


class _Answers:
    """Reads answer lines off a socket, counting them and the successful ones."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._tail = b""
        self.ok = 0
        self.answered = 0
        self.first_error: str | None = None

    def read_some(self) -> int:
        """Block until at least one more answer line has arrived; how many did."""
        while True:
            chunk = self._sock.recv(_RECV_BYTES)
            if not chunk:
                raise ConnectionError("the server closed the connection")
            data = self._tail + chunk
            cut = data.rfind(b"\n") + 1
            complete, self._tail = data[:cut], data[cut:]
            if not complete:
                continue
            lines = complete.count(b"\n")
            good = (b"\n" + complete).count(OK_PREFIX)
            if good != lines and self.first_error is None:
                self.first_error = _first_bad(complete)
            self.ok += good
            self.answered += lines
            return lines

    def read(self, count: int) -> None:
        """Block until `count` more answer lines have arrived."""
        while count > 0:
            count -= self.read_some()


def _first_bad(complete: bytes) -> str:
    bad = next(line for line in complete.split(b"\n") if not line.startswith(OK_PREFIX[1:]))
    return bad[:300].decode("utf-8", "replace")


def run_closed(
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


def run_open(
    sock: socket.socket,
    line: Callable[[int], bytes],
    *,
    total: int,
    rate: float,
    index: int,
    summary: bool = False,
) -> Result:
    """Send line n at `start + n / rate` (late lines at once) until `total` are sent and
    answered; latencies from when each was due (only their summary if `summary`). Lines are
    built as they are sent, so a long run needs no memory for them."""
    answers = _Answers(sock)
    latencies: list[float] = []
    start = time.monotonic()

    def read_all() -> None:
        while answers.answered < total:
            count = answers.read_some()
            now = time.monotonic()
            first = answers.answered - count
            latencies.extend(
                round(now - (start + n / rate), 6) for n in range(first, answers.answered)
            )

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    sent = 0
    while sent < total:
        due = min(total, int((time.monotonic() - start) * rate) + 1)
        if due > sent:
            sock.sendall(b"".join(line(k) for k in range(sent, due)))
            sent = due
        else:
            time.sleep(max(0.0, start + sent / rate - time.monotonic()))
    reader.join()
    end = time.monotonic()
    result = Result(index, sent, answers.ok, answers.first_error, start, end, latencies)
    if summary and latencies:
        return replace(result, latencies=[], summary=summarize(latencies))
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--lines", type=int, default=50_000)
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--batch", type=int, default=1, help="checkpoints per line")
    parser.add_argument("--first", type=int, default=0, help="number of the first line")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--rate", type=float, default=None, help="lines/s, open loop")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument(
        "--summary", action="store_true", help="open loop: latency percentiles, not the list"
    )
    args = parser.parse_args(argv)
    make = line_maker(args.index, args.shards, args.batch, args.first)
    # Open loop builds each line when it is due; closed loop builds them all before `go`, so
    # the measured time holds no line building.
    lines = [] if args.rate else [make(k) for k in range(args.lines)]
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(args.socket)
        print("ready", flush=True)
        if sys.stdin.readline().strip() != "go":
            return 1
        if args.rate:
            total = min(args.lines, max(1, int(args.rate * args.duration)))
            result = run_open(
                sock, make, total=total, rate=args.rate, index=args.index, summary=args.summary
            )
        else:
            result = run_closed(
                sock, lines, window=args.window, duration=args.duration, index=args.index
            )
    print(json.dumps(asdict(result)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
