"""`make soak`: a real `cpmgr run` under faults for ten minutes; exact at the end, memory flat.

    python bench/soak.py [--minutes 10] [--rate 5000] [--shards 1000] [--idle 500] [--seed 1]

What runs, all on this machine:
- the emulator process with 10% faults (5% 500 InternalServerError, 2% throttling, 3%
  connections reset) and latency from 50 ms to 1.1 x `commit.request_timeout` (1 s), so some
  requests time out at the daemon and land at the emulator afterwards; if the emulator offers
  the explicit late-apply fault (`--late-rate`), 2% of UpdateCheckPoints are also held 1.1 to
  1.9 s and applied after the daemon gave up on them;
- `cpmgr run` (journal on, `fsync: batch`, interval 1 s, 64 in flight, 5 attempts);
- 4 client processes committing `rate` times a second over `shards` shards, open loop, each
  value newer than the last, for `minutes`;
- `idle` connections opened at the start and held open, silent, to the end.
Every 10 s until SIGTERM the daemon's RSS and open file descriptors are sampled from /proc
(its process and any child it runs). When the clients
are done: every idle connection must still answer a `ping`; a `flush` (repeated while it reports
failures, up to 10 minutes: throttling halves the daemon's concurrency, so draining 1,000 shards
at this latency takes minutes); SIGTERM, and the daemon must exit 0 without a traceback in its log.
After the emulator's longest possible delay has passed (a request the daemon gave up on may
still land until then), every shard at the emulator must equal the last value the daemon
accepted for it. The emulator's history may go backwards where a late request re-applied an
older value and cpmgr then sent the newer one again: the summary counts those; only the final
value decides. RSS and fds are flat when the last sample is within 10% + 5 MB (RSS) and 32 fds
of the highest sample of the first half of the run (a leak grows with time, warm-up does not).

Prints a summary; exits 1 on any violation, 0 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import itertools
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from harness import BenchError, Load, LoadShape, open_fds, run_load, tree_rss_bytes
from loadgen import CURSOR_BASE, last_cursors
from targets import KEY_ID, KEY_SECRET, emulator_process, emulator_state, shard_key

from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError

LOGSTORE: Final = "soak"
CLIENTS: Final = 4
REQUEST_TIMEOUT: Final = 1.0
LATENCY_MS: Final = (50, 1100)
# Holds between request_timeout and the 2 x request_timeout window in which the daemon must
# still treat an unanswered attempt as possibly landing (docs/design.md, "Settled means verified").
LATE_MS: Final = (1100, 1900)
SAMPLE_EVERY: Final = 10.0
FLUSH_BUDGET: Final = 600.0
ANSWER_SLACK: Final = 600.0
READY: Final = " ready: socket "
MB: Final = 1e6


@dataclass
class Findings:
    violations: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def check(self, ok: bool, violation: str) -> None:
        if not ok:
            self.violations.append(violation)


_T0 = time.monotonic()


def progress(message: str) -> None:
    print(f"[{time.monotonic() - _T0:6.1f} s] {message}", file=sys.stderr, flush=True)


# --- the daemon ---------------------------------------------------------------------------------


def soak_config(directory: Path, endpoint: str) -> dict[str, Any]:
    return {
        "socket": {"path": str(directory / "s"), "mode": "0600"},
        "http": {"listen": ""},
        "sls": {"endpoint": endpoint, "access_key_id": KEY_ID, "access_key_secret": KEY_SECRET},
        "commit": {
            "interval": "1s",
            "max_in_flight": 64,
            "request_timeout": f"{REQUEST_TIMEOUT:g}s",
            "shutdown_timeout": "30s",
            "wait_timeout": "60s",
            "retry": {"max_attempts": 5, "initial_backoff": "100ms", "max_backoff": "2s"},
        },
        "state": {"dir": str(directory / "state"), "fsync": "batch"},
        "log": {"level": "info"},
        "groups": [
            {
                "name": "bench",
                "project": "bench-project",
                "logstore": LOGSTORE,
                "consumer_group": "cg",
            }
        ],
    }


class Daemon:
    """A `cpmgr run` child: its stderr lines, kept as they come."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stderr is not None
        while line := await self.proc.stderr.readline():
            text = line.decode(errors="replace").rstrip("\n")
            self.lines.append(text)
            if READY in text:
                self._ready.set()
        self._ready.set()  # ended: whoever waits finds out below

    async def ready(self, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout)
        if self.proc.returncode is not None or not any(READY in line for line in self.lines):
            raise BenchError("cpmgr run did not start:\n" + "\n".join(self.lines[-20:]))

    async def terminate(self, timeout: float = 60.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.proc.wait(), timeout)
        await self._reader
        return code

    def count(self, text: str) -> int:
        return sum(1 for line in self.lines if text in line)


@contextlib.asynccontextmanager
async def cpmgr_run(config_path: Path) -> AsyncIterator[Daemon]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr",
        "run",
        "--config",
        str(config_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    daemon = Daemon(proc)
    try:
        yield daemon
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


# --- what runs beside it ------------------------------------------------------------------------


def late_fault_available() -> bool:
    """Whether this emulator has the explicit late-apply fault (`--late-rate`)."""
    done = subprocess.run(
        [sys.executable, "-m", "cpmgr.emulator", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    return "--late-rate" in done.stdout


def fault_args(seed: int, late: bool) -> tuple[str, ...]:
    args = ["--seed", str(seed), "--error-rate", "0.05", "--throttle-rate", "0.02"]
    args += ["--reset-rate", "0.03", "--latency-ms", f"{LATENCY_MS[0]}:{LATENCY_MS[1]}"]
    if late:
        args += ["--late-rate", "0.02", "--late-ms", f"{LATE_MS[0]}:{LATE_MS[1]}"]
    return tuple(args)


def open_idle(path: str, count: int) -> list[socket.socket]:
    conns = []
    for _ in range(count):
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        conn.connect(path)
        conns.append(conn)
    return conns


def ping_all(conns: list[socket.socket], timeout: float = 30.0) -> int:
    """How many of the idle connections answer a ping with `{"ok":true}`."""
    answered = 0
    for conn in conns:
        conn.settimeout(timeout)
        try:
            conn.sendall(b'{"op":"ping"}\n')
            if conn.recv(4096).startswith(b'{"ok":true'):
                answered += 1
        except OSError:
            pass
    return answered


@dataclass(frozen=True)
class Sample:
    at: float
    rss: int
    fds: int


async def sample_forever(pid: int, samples: list[Sample], started: float) -> None:
    while True:
        samples.append(Sample(time.monotonic() - started, tree_rss_bytes(pid), open_fds(pid)))
        await asyncio.sleep(SAMPLE_EVERY)


# --- the checks ---------------------------------------------------------------------------------


def _number(checkpoint: str) -> int:
    return int(base64.b64decode(checkpoint)) - CURSOR_BASE


def check_final(state: dict[str, Any], load: Load, shards: int, found: Findings) -> None:
    """Every shard at the emulator holds the last value accepted; count backward steps."""
    per_client = shards // CLIENTS
    expected: dict[int, str] = {}
    for client in load.clients:
        expected.update(last_cursors(client.index, client.sent, per_client))
    wrong = [
        shard
        for shard, value in sorted(expected.items())
        if state["checkpoints"].get(shard_key(shard, LOGSTORE)) != value
    ]
    found.check(
        not wrong,
        f"{len(wrong)} of {len(expected)} shards at the emulator differ from the last accepted "
        f"value (first: {wrong[:5]})",
    )
    backwards = corrected = 0
    for shard in expected:
        numbers = [_number(v) for v in state["history"].get(shard_key(shard, LOGSTORE), [])]
        steps = sum(1 for a, b in itertools.pairwise(numbers) if b < a)
        backwards += steps
        corrected += 1 if steps else 0
    found.notes.append(
        f"history went backwards {backwards} time(s) on {corrected} shard(s) (late requests "
        "landing after a newer value), each corrected by the end"
        if not wrong
        else f"history went backwards {backwards} time(s) on {corrected} shard(s)"
    )


def check_flat(samples: list[Sample], found: Findings) -> None:
    # The first sample is taken before the clients start. A leak grows with time, so the last
    # sample would top everything seen in the first half; warm-up growth does not.
    loaded = samples[1:] or samples
    early = loaded[: max(1, len(loaded) // 2)]
    last = samples[-1]
    rss_ref = max(s.rss for s in early)
    fds_ref = max(s.fds for s in early)
    found.notes.append(
        f"RSS MB first/last/max: {samples[0].rss / MB:.1f} / {last.rss / MB:.1f} / "
        f"{max(s.rss for s in samples) / MB:.1f}; fds first/last/max: {samples[0].fds} / "
        f"{last.fds} / {max(s.fds for s in samples)} ({len(samples)} samples, every "
        f"{SAMPLE_EVERY:g} s)"
    )
    found.check(
        last.rss <= rss_ref * 1.10 + 5 * MB,
        f"RSS grew: {last.rss / MB:.1f} MB at the end, at most {rss_ref / MB:.1f} MB in the "
        "first half",
    )
    found.check(
        last.fds <= fds_ref + 32,
        f"fds grew: {last.fds} at the end, at most {fds_ref} in the first half",
    )


async def final_flush(path: str, found: Findings) -> None:
    """`flush` until it reports every shard committed (10% faults can exhaust a shard's
    retries); a violation if that takes longer than FLUSH_BUDGET."""
    started = time.monotonic()
    deadline = started + FLUSH_BUDGET
    rounds: list[str] = []
    async with AsyncCpmgrClient(path, timeout=FLUSH_BUDGET + 10) as client:
        while True:
            remaining = deadline - time.monotonic()
            try:
                committed = await client.flush(timeout=max(1.0, remaining))
            except CpmgrProtocolError as exc:
                failed = len(exc.answer.get("failed", []))
                rounds.append(f"{exc.code} ({failed} shard(s) failed)")
                if exc.code == "CommitFailed" and remaining > 0:
                    continue
                found.violations.append(f"the final flush failed: {exc}")
                return
            rounds.append(f"{committed} committed")
            took = time.monotonic() - started
            found.notes.append(f"final flush: {'; '.join(rounds)}; {took:.0f} s")
            return


# --- the run ------------------------------------------------------------------------------------


async def soak(args: argparse.Namespace, directory: Path) -> Findings:
    found = Findings()
    late = late_fault_available()
    found.notes.append(
        "late-apply fault: "
        + (
            "on (2%, held 1.1-1.9 s)"
            if late
            else "not in this emulator; late landings come from latency beyond request_timeout only"
        )
    )
    seconds = args.minutes * 60
    async with emulator_process(
        directory / "emulator.log",
        shards={LOGSTORE: args.shards},
        extra=fault_args(args.seed, late),
    ) as emulator:
        config_path = directory / "cpmgr.yaml"
        config = soak_config(directory, emulator.url)
        config_path.write_text(json.dumps(config))
        async with cpmgr_run(config_path) as daemon:
            await daemon.ready()
            idle = open_idle(config["socket"]["path"], args.idle)
            samples: list[Sample] = []
            sampler = asyncio.create_task(
                sample_forever(daemon.proc.pid, samples, time.monotonic())
            )
            shape = LoadShape(
                clients=CLIENTS,
                lines=10**9,
                shards=args.shards // CLIENTS,
                rate=args.rate / CLIENTS,
                duration=seconds,
                summary=True,
            )
            progress(f"daemon ready; {args.idle} idle connections open; clients start")
            # Open loop: a daemon that falls behind answers late; minutes late is still exact.
            load = await run_load(config["socket"]["path"], shape, slack=ANSWER_SLACK)
            progress("clients done; pinging the idle connections")
            sampler.cancel()
            found.check(load.ok == load.sent, f"{load.sent - load.ok} commits were refused")
            worst = max(c.summary.get("p99", 0.0) for c in load.clients)
            found.notes.append(
                f"clients: {load.ok:,} commits accepted in {load.seconds:.0f} s "
                f"({load.rate:,.0f}/s); answer p99 (worst client) {worst * 1e3:.1f} ms"
            )
            answered = await asyncio.to_thread(ping_all, idle)
            found.check(answered == len(idle), f"{len(idle) - answered} idle connections lost")
            found.notes.append(f"idle connections answering a ping at the end: {answered}")
            progress("flushing")
            await final_flush(config["socket"]["path"], found)
            progress("SIGTERM")
            sampler.cancel()
            for conn in idle:
                conn.close()
            code = await daemon.terminate()
            found.check(code == 0, f"cpmgr run exited {code}")
            found.check(daemon.count("Traceback") == 0, "a traceback in the daemon's log")
            found.notes.append(
                f"daemon log: {len(daemon.lines)} lines, {daemon.count(' WARNING ')} warnings, "
                f"{daemon.count(' ERROR ')} errors"
            )
            check_flat(samples, found)
            progress("the daemon exited; waiting out the emulator's longest delay")
        # A request the daemon gave up on may still land until the emulator's longest delay.
        await asyncio.sleep(max(LATENCY_MS[1], LATE_MS[1] if late else 0) / 1e3 + 0.5)
        state = await emulator_state(emulator.url)
        calls = state["requests"].get("UpdateCheckPoint", {})
        found.notes.append(f"UpdateCheckPoint at the emulator by outcome: {calls}")
        check_final(state, load, args.shards, found)
    return found


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=5000.0, help="commits/s, all clients")
    parser.add_argument("--shards", type=int, default=1000)
    parser.add_argument("--idle", type=int, default=500, help="idle connections held open")
    parser.add_argument("--seed", type=int, default=1, help="the emulator's fault seed")
    return parser.parse_args(argv)


async def main() -> int:
    args = parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cps", dir="/tmp") as root:
        try:
            found = await soak(args, Path(root))
        except BenchError as exc:
            print(f"soak: ERROR: {exc}")
            return 1
    print(
        f"soak: {args.minutes:g} min, {args.rate:,.0f} commits/s over {args.shards} shards, "
        f"{args.idle} idle connections, ~10% faults; {time.monotonic() - started:.0f} s"
    )
    for note in found.notes:
        print(f"- {note}")
    for violation in found.violations:
        print(f"VIOLATION: {violation}")
    print("soak: FAILED" if found.violations else "soak: OK")
    return 1 if found.violations else 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))
