"""`cpmgr run` as a child process: its config, its stderr read line by line, its signals."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
PROJECT = "lifecycle-project"
LOGSTORE = "lifecycle-logstore"
READY_LINE = " ready: socket "
# The daemon's own defaults would make a failing test hang for minutes, not seconds.
START_TIMEOUT = 20.0
LINE_TIMEOUT = 10.0


def cursor(number: int) -> str:
    """A checkpoint as consumers send it: the base64 of a decimal cursor."""
    return base64.b64encode(str(number).encode()).decode()


def remote_key(consumer_group: str, shard: int) -> str:
    """The emulator's key for one shard's checkpoint."""
    return f"{PROJECT}/{LOGSTORE}/{consumer_group}/{shard}"


def group(name: str, consumer_group: str, **extra: object) -> dict[str, object]:
    """One `groups[]` entry on the shared test logstore."""
    return {
        "name": name,
        "project": PROJECT,
        "logstore": LOGSTORE,
        "consumer_group": consumer_group,
        **extra,
    }


@contextlib.contextmanager
def short_socket_dir() -> Iterator[Path]:
    """A fresh directory under /tmp: pytest's tmp_path is too long for a Unix socket path."""
    with tempfile.TemporaryDirectory(prefix="cp", dir="/tmp") as name:
        yield Path(name)


def daemon_config(
    *,
    socket_path: Path,
    endpoint: str,
    groups: list[dict[str, object]],
    credentials: dict[str, str] | None = None,
    interval: str = "1h",
    shutdown_timeout: str = "5s",
    max_attempts: int = 3,
    initial_backoff: str = "20ms",
    max_backoff: str = "100ms",
    socket_mode: str = "0660",
    lag_interval: str = "0",
) -> dict[str, Any]:
    """A complete config: no HTTP, a long interval unless told, quick retries; lag reading off
    unless told (these daemons are about commits: the emulator's requests are theirs alone)."""
    sls: dict[str, object] = {"endpoint": endpoint, **(credentials or {})}
    return {
        "socket": {"path": str(socket_path), "mode": socket_mode},
        "http": {"listen": ""},
        "sls": sls,
        "commit": {
            "interval": interval,
            "request_timeout": "2s",
            "shutdown_timeout": shutdown_timeout,
            "wait_timeout": "5s",
            "retry": {
                "max_attempts": max_attempts,
                "initial_backoff": initial_backoff,
                "max_backoff": max_backoff,
            },
        },
        "log": {"level": "info", "format": "text"},
        "lag": {"interval": lag_interval},
        "groups": groups,
    }


def write_yaml(path: Path, data: object) -> Path:
    """Write `data` as YAML atomically, so a SIGHUP never reads half a file."""
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    os.replace(scratch, path)
    return path


def write_credentials(path: Path, key_id: str, secret: str, *, mtime_ns: int | None = None) -> None:
    """Rotate a credentials file the way an STS agent does: a new file renamed over the old.

    The mtime is set explicitly: two writes within the file system's timestamp granularity
    would otherwise look unchanged.
    """
    write_raw(path, json.dumps({"AccessKeyId": key_id, "AccessKeySecret": secret}), mtime_ns)


def write_raw(path: Path, text: str, mtime_ns: int | None = None) -> None:
    """Replace `path` with `text`; its mtime is `mtime_ns`, or a second after the old one."""
    if mtime_ns is None:
        old = path.stat().st_mtime_ns if path.exists() else time.time_ns()
        mtime_ns = old + 1_000_000_000
    scratch = path.with_name(path.name + ".new")
    scratch.write_text(text, encoding="utf-8")
    os.utime(scratch, ns=(mtime_ns, mtime_ns))
    os.replace(scratch, path)


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This environment without any ALIBABA_CLOUD_* variable, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD_")}
    env["PYTHONPATH"] = str(REPO)
    return {**env, **(extra or {})}


async def spawn_daemon(
    config_path: Path, env: dict[str, str] | None = None
) -> asyncio.subprocess.Process:
    """`python -m cpmgr run --config PATH` with its stderr piped; `env` adds variables."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr",
        "run",
        "--config",
        str(config_path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env=child_env(env),
    )


class DaemonProcess:
    """A running `cpmgr run`: every stderr line it wrote so far, and waits on new ones."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._stderr_closed = False
        self._changed = asyncio.Condition()
        self._reader = asyncio.create_task(self._read_stderr())

    @property
    def log(self) -> str:
        """Everything the daemon logged so far."""
        return "\n".join(self.lines)

    def send(self, sig: signal.Signals) -> None:
        self.process.send_signal(sig)

    async def _read_stderr(self) -> None:
        assert self.process.stderr is not None
        while line := await self.process.stderr.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        async with self._changed:
            self._stderr_closed = True
            self._changed.notify_all()

    def _find(self, text: str) -> str | None:
        return next((line for line in self.lines if text in line), None)

    async def wait_for_line(self, text: str, *, timeout: float = LINE_TIMEOUT) -> str:
        """The first line containing `text`, as soon as the daemon writes it."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(
                        lambda: self._find(text) is not None or self._stderr_closed
                    ),
                    timeout,
                )
            except TimeoutError:
                raise AssertionError(
                    f"no log line with {text!r} in {timeout}s:\n{self.log}"
                ) from None
            found = self._find(text)
        if found is None:
            raise AssertionError(f"the daemon closed stderr without logging {text!r}:\n{self.log}")
        return found

    async def wait_for_count(self, text: str, count: int, *, timeout: float = LINE_TIMEOUT) -> None:
        """Until `count` lines containing `text` were written."""

        def seen() -> bool:
            return sum(text in line for line in self.lines) >= count or self._stderr_closed

        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(seen), timeout)
            except TimeoutError:
                raise AssertionError(
                    f"fewer than {count} log lines with {text!r} in {timeout}s:\n{self.log}"
                ) from None

    async def exit_code(self, *, timeout: float) -> int:
        """Wait (at most `timeout` seconds) for the process to end and its stderr to be read."""
        try:
            code = await asyncio.wait_for(self.process.wait(), timeout)
            await asyncio.wait_for(self._reader, timeout)
        except TimeoutError:
            raise AssertionError(
                f"the daemon was still running after {timeout}s:\n{self.log}"
            ) from None
        return code

    async def kill(self) -> None:
        """Stop the process if it still runs, and the stderr reader with it."""
        if self.process.returncode is None:
            self.process.kill()
        await self.process.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._reader, 5)
        self._reader.cancel()


@asynccontextmanager
async def running_daemon(
    config_path: Path, *, env: dict[str, str] | None = None
) -> AsyncIterator[DaemonProcess]:
    """A `cpmgr run` child that has logged its ready line; killed on exit if still running."""
    daemon = DaemonProcess(await spawn_daemon(config_path, env))
    try:
        await daemon.wait_for_line(READY_LINE, timeout=START_TIMEOUT)
        yield daemon
    finally:
        await daemon.kill()


async def run_to_exit(config_path: Path) -> tuple[int, list[str]]:
    """Run a daemon expected to give up at startup: its exit code and stderr lines."""
    daemon = DaemonProcess(await spawn_daemon(config_path))
    try:
        return await daemon.exit_code(timeout=START_TIMEOUT), daemon.lines
    finally:
        await daemon.kill()


class StallableSleep:
    """The emulator's latency sleep, which a test can turn into a hang (SLS stops answering)
    and release again; it counts the requests it holds, so tests wait on them, not on time."""

    def __init__(self) -> None:
        self.held = 0
        self._released = asyncio.Event()
        self._released.set()
        self._changed = asyncio.Condition()

    def stall(self) -> None:
        self._released.clear()

    def release(self) -> None:
        self._released.set()

    async def __call__(self, seconds: float) -> None:
        if self._released.is_set():
            await asyncio.sleep(seconds)
            return
        async with self._changed:
            self.held += 1
            self._changed.notify_all()
        await self._released.wait()

    async def wait_held(self, count: int, *, timeout: float = LINE_TIMEOUT) -> None:
        """Until `count` requests are held (at most `timeout` seconds)."""
        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(lambda: self.held >= count), timeout)


async def eventually(
    condition: Callable[[], bool],
    *,
    what: str,
    daemon: DaemonProcess | None = None,
    timeout: float = 10.0,
) -> None:
    """Wait until `condition()` holds, checking every 20 ms, for at most `timeout` seconds.

    Only for what another process does to the in-process emulator: there is no event to
    wait on across the process boundary, so this polls, with a hard deadline.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            log = daemon.log if daemon is not None else ""
            raise AssertionError(f"not within {timeout}s: {what}\n{log}")
        await asyncio.sleep(0.02)
