"""The processes a benchmark talks to: the server under test (cpmgr's daemon or a bare asyncio
server, each in bench/server_proc.py), the emulator, the SLS sink; and the daemon's config."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
from harness import (
    BENCH_DIR,
    STARTUP_TIMEOUT,
    BenchError,
    Load,
    LoadShape,
    peak_rss_bytes,
    process_cpu_seconds,
    read_line,
    run_load,
    spawned,
    tree_cpu_seconds,
    tree_rss_bytes,
)
from loadgen import cursor

from cpmgr.client import AsyncCpmgrClient

PROJECT: Final = "bench-project"
LOGSTORE: Final = "ls"
CONSUMER_GROUP: Final = "cg"
GROUP: Final = "bench"
KEY_ID: Final = "bench-key-id"
KEY_SECRET: Final = "bench-key-secret"
SERVER_PROC: Final = str(BENCH_DIR / "server_proc.py")
_STOP_TIMEOUT: Final = 60.0  # a daemon's drain: shutdown_timeout plus the close grace


# --- the daemon's configuration ---------------------------------------------------------------


def daemon_config(
    socket_path: Path,
    *,
    endpoint: str = "http://127.0.0.1:9",
    logstore: str = LOGSTORE,
    interval: str = "1h",
    state_dir: Path | None = None,
    fsync: str = "batch",
    shard_metrics: bool = False,
    shutdown_timeout: str = "1s",
    request_timeout: str = "5s",
    lag_interval: str = "0",
) -> dict[str, Any]:
    """One group `bench`; HTTP on a free loopback port; the committer's timer far away unless
    `interval`; a short final flush, since most runs stop with nothing worth committing; lag
    reading off unless `lag_interval` (scenario l measures it; elsewhere its requests would
    compete with what is measured)."""
    return {
        "socket": {"path": str(socket_path), "mode": "0600"},
        "http": {"listen": "127.0.0.1:0", "shard_metrics": shard_metrics},
        "sls": {"endpoint": endpoint, "access_key_id": KEY_ID, "access_key_secret": KEY_SECRET},
        "commit": {
            "interval": interval,
            "shutdown_timeout": shutdown_timeout,
            "request_timeout": request_timeout,
        },
        "state": {"dir": str(state_dir) if state_dir else None, "fsync": fsync},
        "log": {"level": "warning"},
        "lag": {"interval": lag_interval},
        "groups": [
            {
                "name": GROUP,
                "project": PROJECT,
                "logstore": logstore,
                "consumer_group": CONSUMER_GROUP,
            }
        ],
    }


# --- making many shards dirty -----------------------------------------------------------------

FEED_BATCH: Final = 100


def feed_shape(shards: int, round_number: int) -> LoadShape:
    """One client giving each of `shards` shards (a multiple of FEED_BATCH) one new value, in
    batch lines of FEED_BATCH; round r's cursors are higher than any of an earlier round."""
    lines = shards // FEED_BATCH
    return LoadShape(
        clients=1,
        lines=lines,
        shards=shards,
        batch=FEED_BATCH,
        window=8,
        duration=3600.0,
        first=round_number * lines,
    )


def fed_values(shards: int, round_number: int) -> dict[str, int]:
    """What `feed_shape` leaves at SLS once committed: checkpoint -> how many shards hold it."""
    lines = shards // FEED_BATCH
    return {cursor(round_number * lines + n): FEED_BATCH for n in range(lines)}


# --- the server under test --------------------------------------------------------------------


@dataclass
class Server:
    """A running bench/server_proc.py: its socket, HTTP address (daemon only) and pid."""

    proc: asyncio.subprocess.Process
    socket: str
    http: str | None
    pid: int
    log: Path

    async def _command(self, command: str, timeout: float = 30.0) -> str:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command.encode() + b"\n")
        return await read_line(self.proc, timeout, f"server ({command})")

    async def lag_start(self) -> None:
        await self._command("lag-start")

    async def lag_stop(self) -> dict[str, float]:
        stats: dict[str, float] = json.loads(await self._command("lag-stop"))
        return stats

    async def stop(self) -> int:
        """Shut down as on SIGTERM; the exit code the daemon reported."""
        answer = await self._command("stop", _STOP_TIMEOUT)
        return int(answer.removeprefix("stopped "))

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return tree_rss_bytes(self.pid)

    def peak_rss_bytes(self) -> int:
        return peak_rss_bytes(self.pid)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text().splitlines()[-lines:])
        return ""

    async def load(self, shape: LoadShape) -> Load:
        """Client processes against this server, checked: every answer ok."""
        result = await run_load(self.socket, shape, self.cpu_seconds)
        result.check()
        return result

    async def flush(self, timeout: float) -> int:
        """`flush` over the socket; how many checkpoints it committed."""
        async with AsyncCpmgrClient(self.socket, timeout=timeout + 5) as client:
            committed: int = await client.flush(timeout=timeout)
            return committed


@contextlib.asynccontextmanager
async def server_process(
    argv: list[str], socket_path: Path, log_path: Path
) -> AsyncIterator[Server]:
    with log_path.open("wb") as log_file:
        async with spawned(sys.executable, SERVER_PROC, *argv, stderr=log_file) as proc:
            try:
                ready = await read_line(proc, STARTUP_TIMEOUT, "server")
            except BenchError as exc:
                raise BenchError(f"{exc}: {_tail(log_path)}") from None
            if not ready.startswith("ready "):
                raise BenchError(f"server: expected 'ready', got {ready!r}: {_tail(log_path)}")
            info = json.loads(ready.removeprefix("ready "))
            yield Server(proc, str(socket_path), info["http"], info["pid"], log_path)


def _tail(path: Path) -> str:
    with contextlib.suppress(OSError):
        return " | ".join(path.read_text().splitlines()[-5:])
    return ""


@contextlib.asynccontextmanager
async def running_daemon(run_dir: Path, config: dict[str, Any]) -> AsyncIterator[Server]:
    """cpmgr's daemon (`cpmgr.daemon.run`) in its own process, with `config`."""
    config_path = run_dir / "cpmgr.yaml"
    config_path.write_text(json.dumps(config))  # JSON is YAML
    socket_path = Path(config["socket"]["path"])
    argv = ["daemon", "--config", str(config_path)]
    async with server_process(argv, socket_path, run_dir / "daemon.log") as server:
        yield server


@contextlib.asynccontextmanager
async def running_bare(run_dir: Path, kind: str) -> AsyncIterator[Server]:
    """A bare asyncio server of bench/baseline.py in its own process."""
    socket_path = run_dir / "s"
    argv = ["baseline", "--kind", kind, "--socket", str(socket_path)]
    async with server_process(argv, socket_path, run_dir / "baseline.log") as server:
        yield server


# --- the emulator and the sink, each in its own process ----------------------------------------


@dataclass(frozen=True)
class Remote:
    """An SLS stand-in child process: where it listens, and its pid to read its CPU time."""

    url: str
    pid: int

    def cpu_seconds(self) -> float:
        return process_cpu_seconds(self.pid)


@contextlib.asynccontextmanager
async def emulator_process(
    log_path: Path, *, shards: dict[str, int], extra: tuple[str, ...] = ()
) -> AsyncIterator[Remote]:
    """`python -m cpmgr.emulator` on 127.0.0.1 (any port), verifying v1 signatures, with one
    logstore per entry of `shards` (name -> shard count) and group CONSUMER_GROUP on each."""
    argv = [sys.executable, "-m", "cpmgr.emulator", "--listen", "127.0.0.1:0", "--seed", "1"]
    for logstore, count in shards.items():
        argv += ["--logstore", f"{PROJECT}/{logstore}:{count}"]
        argv += ["--consumer-group", f"{PROJECT}/{logstore}/{CONSUMER_GROUP}"]
    argv += ["--access-key-id", KEY_ID, "--access-key-secret", KEY_SECRET, *extra]
    async with _announced(argv, log_path, "cpmgr emulator listening on ") as remote:
        yield remote


@contextlib.asynccontextmanager
async def sink_process(log_path: Path) -> AsyncIterator[Remote]:
    """bench/sink.py: accepts every UpdateCheckPoint at almost no CPU cost."""
    argv = [sys.executable, str(BENCH_DIR / "sink.py")]
    async with _announced(argv, log_path, "sink listening on ") as remote:
        yield remote


@contextlib.asynccontextmanager
async def _announced(argv: list[str], log_path: Path, prefix: str) -> AsyncIterator[Remote]:
    with log_path.open("wb") as log_file:
        async with spawned(*argv, stderr=log_file) as proc:
            announced = await read_line(proc, STARTUP_TIMEOUT, argv[-1])
            if not announced.startswith(prefix):
                raise BenchError(f"{argv[1]}: unexpected first line {announced!r}")
            yield Remote(announced.removeprefix(prefix), proc.pid)


async def get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as session, session.get(url) as reply:
        reply.raise_for_status()
        document: dict[str, Any] = await reply.json(content_type=None)
        return document


async def emulator_state(url: str) -> dict[str, Any]:
    """The emulator's `GET /_emulator/state` document."""
    return await get_json(f"{url}/_emulator/state")


def update_calls(state: dict[str, Any], code: str | None = None) -> int:
    """UpdateCheckPoint requests the emulator has answered (with `code`, or any outcome)."""
    by_code: dict[str, int] = state["requests"].get("UpdateCheckPoint", {})
    return by_code.get(code, 0) if code else sum(by_code.values())


def shard_key(shard: int, logstore: str = LOGSTORE) -> str:
    """How the emulator's state names a shard of CONSUMER_GROUP."""
    return f"{PROJECT}/{logstore}/{CONSUMER_GROUP}/{shard}"


async def scrape(http: str) -> str:
    """The daemon's /metrics text."""
    async with aiohttp.ClientSession() as session, session.get(f"{http}/metrics") as reply:
        reply.raise_for_status()
        return await reply.text()


def sample(text: str, name: str) -> float | None:
    """The value of the first sample line of /metrics text starting with `name` (with labels
    if given, e.g. 'cpmgr_pending_shards{group="bench"}'); None if there is none."""
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == name or ("{" not in name and key.startswith(name + "{")):
            return float(value)
    return None
