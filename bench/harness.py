"""What the benchmarks share: child processes that always end, processes seen through /proc,
the load-generating clients, statistics and the machine description."""

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
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Final, Protocol

BENCH_DIR: Final = Path(__file__).resolve().parent
LOADGEN: Final = str(BENCH_DIR / "loadgen.py")
STOP_GRACE: Final = 5.0
STARTUP_TIMEOUT: Final = 60.0
_LINE_LIMIT: Final = 64 * 1024 * 1024  # a client's answer carries its latencies


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
        limit=_LINE_LIMIT,
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
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
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


# --- processes seen through /proc --------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (field 3 onwards), or None."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def tree_pids(root: int) -> list[int]:
    """`root` and every live descendant (a server may run helpers in child processes)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := _stat_fields(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU time `pid` has used so far (0 once it is gone)."""
    fields = _stat_fields(pid)
    if fields is None:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int) -> float:
    """CPU time of `root` and its live descendants."""
    return sum(process_cpu_seconds(pid) for pid in tree_pids(root))


def _status_kib(pid: int, key: str) -> int:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def tree_rss_bytes(root: int) -> int:
    """Resident memory of `root` and its live descendants."""
    return sum(_status_kib(pid, "VmRSS") for pid in tree_pids(root)) * 1024


def peak_rss_bytes(pid: int) -> int:
    """The highest resident memory `pid` has had (VmHWM)."""
    return _status_kib(pid, "VmHWM") * 1024


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def cpu_seconds() -> float:
    """User plus system CPU time of this process so far, every thread included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# --- load from client processes ---------------------------------------------------------------


@dataclass(frozen=True)
class ClientResult:
    index: int
    sent: int
    ok: int
    first_error: str | None
    start: float
    end: float
    latencies: list[float]
    summary: dict[str, float]


@dataclass(frozen=True)
class Load:
    """What the client processes of one run did, and the CPU time the server spent meanwhile."""

    clients: tuple[ClientResult, ...]
    server_cpu: float
    per_line: int  # checkpoints per line

    @property
    def sent(self) -> int:
        return sum(c.sent for c in self.clients)

    @property
    def ok(self) -> int:
        return sum(c.ok for c in self.clients)

    @property
    def checkpoints(self) -> int:
        return self.ok * self.per_line

    @property
    def seconds(self) -> float:
        """From the first client's first write to the last client's last answer."""
        return max(c.end for c in self.clients) - min(c.start for c in self.clients)

    @property
    def rate(self) -> float:
        """Answered lines per second."""
        return self.ok / self.seconds

    @property
    def checkpoint_rate(self) -> float:
        return self.checkpoints / self.seconds

    @property
    def cpu_us_per_line(self) -> float:
        return self.server_cpu / self.ok * 1e6

    @property
    def latencies(self) -> list[float]:
        return [value for client in self.clients for value in client.latencies]

    def check(self) -> None:
        """BenchError unless every line sent was answered `{"ok":true...`."""
        for client in self.clients:
            if client.ok != client.sent:
                raise BenchError(
                    f"client {client.index}: {client.sent - client.ok} of {client.sent} "
                    f"answers were errors, first: {client.first_error}"
                )


@dataclass(frozen=True)
class LoadShape:
    """What the client processes send: see bench/loadgen.py."""

    clients: int
    lines: int  # per client
    shards: int  # per client
    batch: int = 1
    window: int = 256
    rate: float | None = None  # lines/s per client: open loop
    duration: float = 10.0
    first: int = 0  # number of the first line (its cursor)
    summary: bool = False  # open loop: latency percentiles only, not every latency

    def argv(self, socket_path: str, index: int) -> list[str]:
        options = ["--socket", socket_path, "--index", str(index), "--lines", str(self.lines)]
        options += ["--shards", str(self.shards), "--batch", str(self.batch)]
        options += ["--window", str(self.window), "--duration", str(self.duration)]
        options += ["--first", str(self.first)]
        if self.rate:
            options += ["--rate", str(self.rate)]
        if self.summary:
            options += ["--summary"]
        return [sys.executable, LOADGEN, *options]


async def run_load(
    socket_path: str,
    shape: LoadShape,
    server_cpu: Callable[[], float] = lambda: 0.0,
    *,
    slack: float = STARTUP_TIMEOUT,
) -> Load:
    """Start the client processes on the socket, release them together, collect; `server_cpu`
    reads the CPU time of the server under test. A client silent for `slack` seconds beyond
    the load's duration is a BenchError."""
    async with contextlib.AsyncExitStack() as stack:
        procs = [
            await stack.enter_async_context(spawned(*shape.argv(socket_path, index)))
            for index in range(shape.clients)
        ]
        for index, proc in enumerate(procs):
            ready = await read_line(proc, STARTUP_TIMEOUT, f"client {index}")
            if ready != "ready":
                raise BenchError(f"client {index}: expected 'ready', got {ready!r}")
        cpu_before = server_cpu()
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        answers = [
            await read_line(proc, shape.duration + slack, f"client {i}")
            for i, proc in enumerate(procs)
        ]
        cpu = server_cpu() - cpu_before
        # They exit after their answer; signalling one that is exiting would race the reaper.
        await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), STOP_GRACE)
    results = tuple(ClientResult(**json.loads(answer)) for answer in answers)
    return Load(results, cpu, shape.batch)


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


def table(header: Sequence[str], rows: Sequence[Sequence[str]], *, left: int = 1) -> str:
    """A markdown table; the first `left` columns left-aligned, the others right-aligned."""
    align = ["---"] * left + ["---:"] * (len(header) - left)
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


class Findings(Protocol):
    def markdown(self) -> str: ...


async def report_standalone(
    prefix: str, temp_parent: Path, measure: Callable[[Path], Awaitable[Findings]]
) -> int:
    """A scenario run on its own (`python bench/X_bench.py`): the machine, the load around the
    run and what `measure(temp_dir)` found, as markdown on stdout; 1 if the run broke."""
    load_before = load_average()
    neighbours = Neighbours()
    with tempfile.TemporaryDirectory(prefix=prefix, dir=temp_parent) as root:
        try:
            found = await measure(Path(root))
        except BenchError as exc:
            print(f"benchmark failed: {exc}", file=sys.stderr, flush=True)
            return 1
        lines = machine_lines(Path(root))
    print("\n".join(lines))
    print(
        f"- load average before: {load_before}, after: {load_average()}; other processes "
        f"used {neighbours.share():.0%} of the machine meanwhile\n"
    )
    print(found.markdown())
    return 0
