"""Crash safety of a real `cpmgr run`: SIGKILL at random moments under load, restart, and show
that every acknowledged checkpoint reaches SLS and that nothing there ever goes backwards."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import random
import shutil
import signal
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError, CpmgrUnavailable
from cpmgr.emulator import EmulatorHandle, running_emulator

REPO = Path(__file__).resolve().parents[1]
PROJECT, LOGSTORE, CONSUMER_GROUP, GROUP = "crash-project", "ls", "cg", "orders"
SHARDS = 8
WORKERS = 4  # each owns SHARDS // WORKERS shards, so its values per shard only increase
KILLS = 21
COMMIT_INTERVAL = 1.0  # longer than most lives: acknowledged values often exist only in the journal
EARLY_KILL_SHARE = 0.15  # lives killed before they report ready (during replay, bind, ...)
READY_DEADLINE = 20.0
STOP_DEADLINE = 20.0
SEED = 20240611


def cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


def number(value: str) -> int:
    return int(base64.b64decode(value, validate=True))


def remote_key(shard: int) -> str:
    return f"{PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}/{shard}"


def write_config(
    path: Path, *, socket_path: str, state_dir: Path, endpoint: str, fsync: str
) -> Path:
    config = {
        "socket": {"path": socket_path},
        "http": {"listen": ""},
        "sls": {"endpoint": endpoint, "access_key_id": "id", "access_key_secret": "secret"},
        "commit": {
            "interval": f"{COMMIT_INTERVAL}s",
            "request_timeout": "2s",
            "retry": {"max_attempts": 5, "initial_backoff": "10ms", "max_backoff": "100ms"},
            "shutdown_timeout": "10s",
        },
        "state": {"dir": str(state_dir), "fsync": fsync, "fsync_interval": "50ms"},
        "log": {"level": "info"},
        "groups": [
            {
                "name": GROUP,
                "project": PROJECT,
                "logstore": LOGSTORE,
                "consumer_group": CONSUMER_GROUP,
                "consumer": "crash-consumer",
            }
        ],
    }
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def socket_path() -> Iterator[str]:
    """A socket path short enough for AF_UNIX (tmp_path may be too long)."""
    directory = tempfile.mkdtemp(prefix="cpx", dir="/tmp")
    try:
        yield os.path.join(directory, "s")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


# --- the daemon as a child process ------------------------------------------------------------


class DaemonProcess:
    """One `cpmgr run` child; its stderr is read as it comes and `ready` set by the ready line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.ready = asyncio.Event()
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read_stderr())

    @classmethod
    async def spawn(cls, config: Path) -> DaemonProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cpmgr",
            "run",
            "--config",
            str(config),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        return cls(proc)

    async def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        async for raw in self.proc.stderr:
            line = raw.decode(errors="replace").rstrip("\n")
            self.lines.append(line)
            if " ready: socket " in line:
                self.ready.set()

    async def wait_ready(self) -> None:
        """Return once the daemon logged that it is ready; fail if it exits or takes too long."""
        ready = asyncio.create_task(self.ready.wait())
        exited = asyncio.create_task(self.proc.wait())
        try:
            await asyncio.wait(
                {ready, exited}, timeout=READY_DEADLINE, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            ready.cancel()
            exited.cancel()
        assert self.ready.is_set(), f"the daemon did not become ready:\n{self.log_tail()}"

    async def stop(self, sig: signal.Signals) -> int:
        """Send `sig` (unless it already exited), wait for the exit; its return code."""
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(sig)
        return await self.finished()

    async def finished(self) -> int:
        """Wait for the exit and the end of stderr; the return code."""
        code = await self.proc.wait()
        await self._reader
        return code

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])

    def assert_no_traceback(self) -> None:
        assert not any("Traceback" in line for line in self.lines), self.log_tail(200)


@asynccontextmanager
async def daemon_running(config: Path) -> AsyncIterator[DaemonProcess]:
    """A daemon that is SIGKILLed on the way out if the body did not stop it."""
    daemon = await DaemonProcess.spawn(config)
    try:
        yield daemon
    finally:
        if daemon.proc.returncode is None:
            await daemon.stop(signal.SIGKILL)
        await daemon.finished()


# --- the load -----------------------------------------------------------------------------------


@dataclass
class Ledger:
    """What the consumers sent and what the daemon acknowledged, per shard (highest values)."""

    sent: dict[int, int] = field(default_factory=dict)
    acked: dict[int, int] = field(default_factory=dict)
    journal_only: int = 0
    """Restarts at which some acknowledged value had not reached SLS yet."""


class Gate:
    """Tells consumers that lost their daemon when the next one is up, or that the load is over."""

    def __init__(self) -> None:
        self._changed = asyncio.Condition()
        self._up = False
        self._closed = False

    async def open(self) -> None:
        async with self._changed:
            self._up = True
            self._changed.notify_all()

    def shut(self) -> None:
        """No daemon is up (synchronous: called right before the kill)."""
        self._up = False

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()

    async def passable(self) -> bool:
        """Wait until a daemon is up (True) or the load is over (False)."""
        async with self._changed:
            await self._changed.wait_for(lambda: self._up or self._closed)
            return not self._closed


async def deliver(client: AsyncCpmgrClient, shards: Sequence[int], value: int, gate: Gate) -> bool:
    """Commit `value` to `shards` (one batch if several) until the daemon answers ok; False if
    the load ended first."""
    while await gate.passable():
        try:
            if len(shards) == 1:
                await client.commit(GROUP, shards[0], cursor(value))
            else:
                await client.commit_many(GROUP, {shard: cursor(value) for shard in shards})
            return True
        except CpmgrUnavailable:
            continue  # killed: send the same value again once a daemon is up
    return False


async def consumer(
    path: str,
    shards: tuple[int, ...],
    values: Iterator[int],
    ledger: Ledger,
    gate: Gate,
    rng: random.Random,
) -> None:
    """Commit ever larger values to random shards of `shards` (a quarter as batches of all)
    until the gate closes; any refusal ends it with CpmgrProtocolError."""
    async with AsyncCpmgrClient(
        path, timeout=30, reconnect_attempts=2, initial_backoff=0.02, max_backoff=0.1
    ) as client:
        while True:
            value = next(values)
            targets = shards if rng.random() < 0.25 else (rng.choice(shards),)
            ledger.sent.update(dict.fromkeys(targets, value))
            if not await deliver(client, targets, value, gate):
                return
            ledger.acked.update(dict.fromkeys(targets, value))


@asynccontextmanager
async def consumers_running(
    path: str, ledger: Ledger, gate: Gate
) -> AsyncIterator[list[asyncio.Task[None]]]:
    """WORKERS consumers, each owning every WORKERS-th shard. They are stopped by closing the
    gate, not cancelled: AsyncCpmgrClient swallows a cancel that lands while it closes a dead
    connection, and these lose theirs at every kill."""
    values = itertools.count(1)
    tasks = [
        asyncio.create_task(
            consumer(
                path,
                tuple(range(w, SHARDS, WORKERS)),
                values,
                ledger,
                gate,
                random.Random(SEED + 1 + w),
            )
        )
        for w in range(WORKERS)
    ]
    try:
        yield tasks
    finally:
        await gate.close()
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), STOP_DEADLINE
        )
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"a consumer failed: {failures[0]!r}"


def raise_if_failed(tasks: list[asyncio.Task[None]]) -> None:
    for task in tasks:
        if task.done():
            task.result()  # before the gate closes, a consumer only ends by raising


# --- the checks ---------------------------------------------------------------------------------


async def daemon_latest(path: str) -> dict[int, int]:
    """Per shard, the newest value the daemon holds (pending, else committed)."""
    async with AsyncCpmgrClient(path, timeout=30) as client:
        entries = await client.get(GROUP)
    return {e["shard"]: number(e["pending"] or e["committed"]) for e in entries}


async def check_replayed(path: str, ledger: Ledger, emulator: EmulatorHandle) -> None:
    """Every acknowledged value (or a newer one that was sent) is back in the restarted daemon."""
    acked = dict(ledger.acked)
    remote = emulator.state.snapshot()["checkpoints"]
    latest = await daemon_latest(path)
    sent = dict(ledger.sent)  # after the answer: consumers may reconnect to this daemon already
    for shard, value in acked.items():
        assert latest.get(shard, -1) >= value, f"shard {shard}: acknowledged {value} was lost"
    for shard, value in latest.items():
        assert value <= sent[shard], f"shard {shard}: {value} was never sent"
    if any(
        remote_key(s) not in remote or number(remote[remote_key(s)]) < v for s, v in acked.items()
    ):
        ledger.journal_only += 1


async def check_regression_guard(path: str, ledger: Ledger) -> None:
    """After a restart, a value below an acknowledged one is refused."""
    async with AsyncCpmgrClient(path, timeout=30) as client:
        for shard, value in sorted(ledger.acked.items()):
            with pytest.raises(CpmgrProtocolError) as refused:
                await client.commit(GROUP, shard, cursor(value - 1))
            assert refused.value.code == "CheckpointRegression"


def check_emulator(emulator: EmulatorHandle, ledger: Ledger) -> None:
    """Each shard's SLS checkpoint is at least the acknowledged value and at most the highest
    sent; its history never goes backwards."""
    snapshot = emulator.state.snapshot()
    for shard in range(SHARDS):
        final = number(snapshot["checkpoints"][remote_key(shard)])
        assert ledger.acked[shard] <= final <= ledger.sent[shard], f"shard {shard}"
        history = [number(v) for v in snapshot["history"][remote_key(shard)]]
        assert history == sorted(history), f"shard {shard} went backwards: {history}"


# --- the test -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Life:
    """How one daemon dies: before it reports ready, or `delay` seconds after."""

    early: bool
    delay: float


def plan_lives(rng: random.Random) -> list[Life]:
    # Mostly short lives (acknowledged values only in the journal), some past a commit cycle
    # (so SLS sees commits from many lives), a few cut off during startup and replay.
    def life() -> Life:
        if rng.random() < EARLY_KILL_SHARE:
            return Life(early=True, delay=rng.uniform(0.0, 0.4))
        if rng.random() < 0.35:
            return Life(early=False, delay=rng.uniform(COMMIT_INTERVAL, COMMIT_INTERVAL + 0.3))
        return Life(early=False, delay=rng.uniform(0.02, 0.4))

    return [life() for _ in range(KILLS)]


async def live_and_die(
    config: Path,
    life: Life,
    *,
    socket_path: str,
    ledger: Ledger,
    gate: Gate,
    emulator: EmulatorHandle,
) -> None:
    """Start a daemon, let the consumers at it, SIGKILL it after the planned delay."""
    async with daemon_running(config) as daemon:
        if not life.early:
            await daemon.wait_ready()  # it took over the dead one's lock and socket
            await check_replayed(socket_path, ledger, emulator)
            await gate.open()
        # The random moment of the crash: this sleep is the schedule, not a wait for a state.
        await asyncio.sleep(life.delay)
        gate.shut()
        code = await daemon.stop(signal.SIGKILL)
        assert code == -signal.SIGKILL, f"the daemon exited by itself:\n{daemon.log_tail()}"
        daemon.assert_no_traceback()


async def last_life(
    config: Path, *, socket_path: str, ledger: Ledger, emulator: EmulatorHandle
) -> None:
    """Restart once more: replay, the regression guard, a flush, a clean SIGTERM."""
    async with daemon_running(config) as daemon:
        await daemon.wait_ready()
        await check_replayed(socket_path, ledger, emulator)
        await check_regression_guard(socket_path, ledger)
        async with AsyncCpmgrClient(socket_path, timeout=60) as client:
            await client.flush(timeout=30)
        assert await daemon.stop(signal.SIGTERM) == 0, daemon.log_tail()
        daemon.assert_no_traceback()


@pytest.mark.slow
@pytest.mark.parametrize("fsync", ["always", "batch"])
async def test_sigkill_under_load_loses_no_acknowledged_checkpoint(
    tmp_path: Path, socket_path: str, fsync: str
) -> None:
    lives = plan_lives(random.Random(SEED))
    ledger = Ledger()
    gate = Gate()
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:{SHARDS}"],
        consumer_groups=[f"{PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}"],
        seed=SEED,
        error_rate=0.05,
        throttle_rate=0.02,
        reset_rate=0.02,
        latency_ms=(1, 5),
    ) as emulator:
        config = write_config(
            tmp_path / "cpmgr.yaml",
            socket_path=socket_path,
            state_dir=tmp_path / "state",
            endpoint=emulator.url,
            fsync=fsync,
        )
        async with consumers_running(socket_path, ledger, gate) as consumers:
            for life in lives:
                await live_and_die(
                    config,
                    life,
                    socket_path=socket_path,
                    ledger=ledger,
                    gate=gate,
                    emulator=emulator,
                )
                raise_if_failed(consumers)
        commits_while_crashing = sum(len(v) for v in emulator.state.history.values())

        # No faults for the last life, so its final flush is deterministic.
        emulator.faults.update({"error_rate": 0, "throttle_rate": 0, "reset_rate": 0})
        await last_life(config, socket_path=socket_path, ledger=ledger, emulator=emulator)

        assert sorted(ledger.acked) == list(range(SHARDS))
        assert commits_while_crashing > 0  # SLS saw commits from lives that were then killed
        assert ledger.journal_only >= KILLS // 2  # most kills left values only in the journal
        check_emulator(emulator, ledger)
