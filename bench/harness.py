"""What the benchmarks share: child processes that always end, the load-generating clients,
the loopback emulator process, the daemon's config, statistics and the machine description."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final

import aiohttp

from cpmgr.config import Config, parse_config
from cpmgr.sls.signer import Credentials

BENCH_DIR: Final = Path(__file__).resolve().parent
LOADGEN: Final = str(BENCH_DIR / "loadgen.py")
PROJECT: Final = "bench-project"
LOGSTORE: Final = "ls"
CONSUMER_GROUP: Final = "cg"
EMULATOR_SHARDS: Final = 1000
CREDENTIALS: Final = Credentials("bench-key-id", "bench-key-secret")
_STOP_GRACE: Final = 5.0
_STARTUP_TIMEOUT: Final = 60.0


class BenchError(Exception):
    """A run did not do what it was measuring (an error answer, a lost commit, a dead child)."""


# --- child processes --------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def spawned(
    *argv: str, stderr: IO[Any] | int | None = None
) -> AsyncIterator[asyncio.subprocess.Process]:
    """A child process with piped stdin/stdout, stopped (TERM, then KILL) on the way out."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=stderr,
    )
    try:
        yield proc
    finally:
        await _stop(proc)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.stdin is not None:
        proc.stdin.close()
    if proc.returncode is None:
        proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE)
        except TimeoutError:
            proc.kill()
    await proc.wait()


async def read_line(proc: asyncio.subprocess.Process, timeout: float, what: str) -> str:
    """The next stdout line of `proc`; BenchError if it ends or is silent for `timeout` s."""
    assert proc.stdout is not None
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), timeout)
    except TimeoutError:
        raise BenchError(f"{what}: no output within {timeout:g} s") from None
    if not line:
        raise BenchError(f"{what}: exited (code {await proc.wait()}) before answering")
    return line.decode().strip()


# --- load from client processes ---------------------------------------------------------------


@dataclass(frozen=True)
class ClientResult:
    index: int
    sent: int
    ok: int
    first_error: str | None
    start: float
    end: float


@dataclass(frozen=True)
class Load:
    """What the client processes of one run did, and the CPU time this process spent meanwhile."""

    clients: tuple[ClientResult, ...]
    server_cpu: float

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.clients)

    @property
    def ok(self) -> int:
        return sum(c.ok for c in self.clients)

    @property
    def seconds(self) -> float:
        """From the first client's first write to the last client's last answer."""
        return max(c.end for c in self.clients) - min(c.start for c in self.clients)

    @property
    def rate(self) -> float:
        return self.ok / self.seconds

    @property
    def cpu_us_per_line(self) -> float:
        return self.server_cpu / self.ok * 1e6

    def check(self) -> None:
        """BenchError unless every line sent was answered `{"ok":true}`."""
        for client in self.clients:
            if client.ok != client.sent:
                raise BenchError(
                    f"client {client.index}: {client.sent - client.ok} of {client.sent} "
                    f"answers were errors, first: {client.first_error}"
                )


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def run_load(
    socket_path: str,
    *,
    clients: int,
    lines: int,
    shards: int,
    window: int,
    duration: float,
) -> Load:
    """Start `clients` loadgen processes on the socket, release them together, collect."""
    options = ["--socket", socket_path, "--lines", str(lines), "--shards", str(shards)]
    options += ["--window", str(window), "--duration", str(duration)]
    async with contextlib.AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(
                spawned(sys.executable, LOADGEN, *options, "--index", str(index))
            )
            for index in range(clients)
        ]
        for index, proc in enumerate(procs):
            ready = await read_line(proc, _STARTUP_TIMEOUT, f"client {index}")
            if ready != "ready":
                raise BenchError(f"client {index}: expected 'ready', got {ready!r}")
        cpu_before = cpu_seconds()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        answers = [
            await read_line(proc, duration + _STARTUP_TIMEOUT, f"client {i}")
            for i, proc in enumerate(procs)
        ]
        cpu = cpu_seconds() - cpu_before
        # They exit after their answer; signalling one that is exiting would race the reaper.
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), _STOP_GRACE)
    results = tuple(ClientResult(**json.loads(answer)) for answer in answers)
    return Load(results, cpu)


# --- the emulator in its own process ----------------------------------------------------------


@dataclass(frozen=True)
class Emulator:
    """The emulator child process: where it listens, and its pid to read its CPU time."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        """User plus system CPU time the emulator has used so far (from /proc)."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextlib.asynccontextmanager
async def emulator_process(log_path: Path) -> AsyncIterator[Emulator]:
    """`python -m cpmgr.emulator` on 127.0.0.1 (any port) with one logstore of
    EMULATOR_SHARDS shards and one group, verifying v1 signatures."""
    argv = [sys.executable, "-m", "cpmgr.emulator", "--listen", "127.0.0.1:0", "--seed", "1"]
    argv += ["--logstore", f"{PROJECT}/{LOGSTORE}:{EMULATOR_SHARDS}"]
    argv += ["--consumer-group", f"{PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}"]
    argv += ["--access-key-id", CREDENTIALS.access_key_id]
    argv += ["--access-key-secret", CREDENTIALS.access_key_secret]
    with log_path.open("wb") as log_file:
        async with spawned(*argv, stderr=log_file) as proc:
            announced = await read_line(proc, _STARTUP_TIMEOUT, "emulator")
            prefix = "cpmgr emulator listening on "
            if not announced.startswith(prefix):
                raise BenchError(f"emulator: unexpected first line {announced!r}")
            yield Emulator(announced.removeprefix(prefix), proc.pid)


async def emulator_state(url: str) -> dict[str, Any]:
    """The emulator's `GET /_emulator/state` document."""
    async with aiohttp.ClientSession() as session, session.get(f"{url}/_emulator/state") as reply:
        reply.raise_for_status()
        state: dict[str, Any] = await reply.json()
        return state


def update_calls(state: dict[str, Any]) -> int:
    """UpdateCheckPoint requests the emulator has answered, whatever the outcome."""
    by_code: dict[str, int] = state["requests"].get("UpdateCheckPoint", {})
    return sum(by_code.values())


def remote_checkpoint(state: dict[str, Any], shard: int) -> str | None:
    value: str | None = state["checkpoints"].get(f"{PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}/{shard}")
    return value


# --- the daemon's configuration ---------------------------------------------------------------


def bench_config(
    socket_path: str,
    *,
    endpoint: str = "http://127.0.0.1:9",
    interval: str = "1h",
    max_in_flight: int = 32,
    state_dir: Path | None = None,
    fsync: str = "batch",
) -> Config:
    """One group `bench`; no HTTP listener; the committer's timer far away unless `interval`."""
    return parse_config(
        {
            "socket": {"path": socket_path, "mode": "0600"},
            "http": {"listen": ""},
            "sls": {
                "endpoint": endpoint,
                "access_key_id": CREDENTIALS.access_key_id,
                "access_key_secret": CREDENTIALS.access_key_secret,
            },
            "commit": {"interval": interval, "max_in_flight": max_in_flight},
            "state": {"dir": str(state_dir) if state_dir else None, "fsync": fsync},
            "log": {"level": "warning"},
            "groups": [
                {
                    "name": "bench",
                    "project": PROJECT,
                    "logstore": LOGSTORE,
                    "consumer_group": CONSUMER_GROUP,
                }
            ],
        },
        {},
    )


# --- statistics and formatting ----------------------------------------------------------------


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of a non-empty sample."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float], fmt: str = ",.0f") -> str:
    """`min-max` of the repetitions, or `-` for a single one."""
    if len(values) < 2:
        return "-"
    return f"{min(values):{fmt}} - {max(values):{fmt}}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table; every column but the first right-aligned."""
    align = ["---"] + ["---:"] * (len(header) - 1)
    lines = [header, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# --- the machine ------------------------------------------------------------------------------


def cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def filesystem_of(path: Path) -> str:
    """`type (device)` of the mount holding `path`, from /proc/mounts."""
    best = ("", "unknown", "?")
    with contextlib.suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, mount, fstype, *_ = line.split()
            inside = str(path).startswith(mount.rstrip("/") + "/") or str(path) == mount
            if inside and len(mount) > len(best[0]):
                best = (mount, fstype, device)
    return f"{best[1]} ({best[2]})"


def load_average() -> str:
    return " / ".join(f"{value:.2f}" for value in os.getloadavg())


def fsync_latency(directory: Path, *, samples: int = 200) -> float:
    """Median seconds of appending 64 bytes to a file in `directory` and fsyncing it."""
    path = directory / "fsync-probe"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        timings = []
        for _ in range(samples):
            started = time.perf_counter()
            os.write(fd, b"x" * 63 + b"\n")
            os.fsync(fd)
            timings.append(time.perf_counter() - started)
    finally:
        os.close(fd)
        path.unlink()
    return median(timings)


def _machine_busy_seconds() -> float:
    """CPU seconds every process of the machine has used (summed over cores), from /proc/stat."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()
    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[1:9])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def _own_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)  # the reaped clients and emulator
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Neighbours:
    """How much CPU other processes took since this was made (a shared machine's noise).

    `extra` adds the CPU time of a child that is still running (it only reaches
    RUSAGE_CHILDREN once reaped)."""

    def __init__(self, extra: Callable[[], float] | None = None) -> None:
        self._extra = extra or (lambda: 0.0)
        self._busy = _machine_busy_seconds()
        self._own = self._own_now()
        self._wall = time.monotonic()

    def _own_now(self) -> float:
        return _own_seconds() + self._extra()

    def seconds(self) -> float:
        """CPU-seconds used by processes other than this one and its children."""
        busy = _machine_busy_seconds() - self._busy
        return max(0.0, busy - (self._own_now() - self._own))

    def share(self) -> float:
        """seconds() as a share of every core's time since the start."""
        capacity = (time.monotonic() - self._wall) * (os.cpu_count() or 1)
        return self.seconds() / capacity


def code_version() -> str:
    """The commit measured, and whether cpmgr/ had uncommitted changes."""
    repo = BENCH_DIR.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", "-C", str(repo), *args], capture_output=True, text=True, check=False
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "cpmgr")
    return f"{head} (with uncommitted changes in cpmgr/)" if dirty else head


def machine_lines(temp_root: Path) -> list[str]:
    """Markdown bullet lines describing where and when the numbers were taken."""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- date: {now}; code: commit {code_version()}",
        f"- CPU: {cpu_model()}, nproc {os.cpu_count()} "
        f"(usable by this process: {len(os.sched_getaffinity(0))})",
        f"- Python {platform.python_version()} ({sys.executable}), Linux {platform.release()}",
        f"- temp dir (sockets, journals): {temp_root} on {filesystem_of(temp_root)}; "
        f"append + fsync there takes {fsync_latency(temp_root) * 1e3:.2f} ms (median of 200)",
    ]
