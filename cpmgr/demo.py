"""`make run`: the emulator, the daemon and a synthetic consumer, with live progress; and two
consumers sharing a consumer group through two daemons, one of which stops half-way.

Starts `cpmgr emulator` (writing WRITE_RATE log groups per second to every shard) and
`cpmgr run --config config/local.yaml` as child processes on free loopback ports. The synthetic
consumer reads the checkpoint groups' shards slower than data arrives for the first half, then
faster (never past a shard's end) until it has caught up, committing through the socket as it
reads; every second the demo prints what reached the emulator, the commit latency, and each
group's consumer lag (log groups and seconds, from the daemon's /metrics). For the config's
membership group a second `cpmgr run` of the same config starts (its own socket and port);
consumer-a joins through the first daemon, consumer-b through the second, and they share the
shards. Half-way the second daemon is stopped: consumer-b hands its shards back and consumer-a
takes them over. Every change of who holds what is printed. After `--duration` seconds from the
consumers' start (or Ctrl-C; never before the takeover is complete, within bounds) the consumers
stop,
then the daemons (which flush), then the emulator; the demo checks that every shard's last
checkpoint reached the emulator and that no shard was held by both consumers at once, and exits
1 if not.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from cpmgr.client import AsyncCpmgrClient, CpmgrUnavailable
from cpmgr.config import Config, GroupConfig, load_config
from cpmgr.demo_members import Board, DemoMember, check_holdings, join

KEY_ID = "local-test-key-id"
KEY_SECRET = "local-test-key-secret"
SHARDS_PER_LOGSTORE = 4
# A share of SLS answers the emulator fails, so the demo shows retries doing their work.
ERROR_RATE = 0.05
DEFAULT_DURATION = 12.0
WRITE_RATE = 20  # log groups per second the emulator appends to every shard
EMULATOR_START_TIMEOUT = 30.0  # seconds
# The synthetic consumer reads at these multiples of WRITE_RATE: slower for the first
# SLOW_SHARE of the run (it falls behind), then faster until it has caught up.
SLOW_SPEED, FAST_SPEED, SLOW_SHARE = 0.25, 4.0, 0.5
READ_TICK = 0.1  # seconds between two reads (and commits) of the synthetic consumer
BALANCE_WAIT = 10.0  # the longest the demo waits for both consumers to hold shards


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


def _number(cursor: str | None) -> int | None:
    if not cursor:
        return None
    try:
        return int(base64.b64decode(cursor))
    except ValueError:
        return None


@dataclass
class Ports:
    emulator: int = field(default_factory=_free_port)
    http: int = field(default_factory=_free_port)
    http_b: int = field(default_factory=_free_port)  # the second daemon's, for membership


def _emulator_args(config: Config, port: int) -> list[str]:
    args = [
        "emulator",
        f"--listen=127.0.0.1:{port}",
        f"--access-key-id={KEY_ID}",
        f"--access-key-secret={KEY_SECRET}",
        "--latency-ms=2:20",
        f"--error-rate={ERROR_RATE}",
        "--seed=1",
        f"--write-rate={WRITE_RATE}",
    ]
    for group in config.groups:
        args.append(f"--logstore={group.project}/{group.logstore}:{SHARDS_PER_LOGSTORE}")
        if group.membership is None or not group.membership.create:
            # With `create: true` the daemons make the consumer group themselves.
            args.append(f"--consumer-group={group.project}/{group.logstore}/{group.consumer_group}")
    return args


def _checkpoint_groups(config: Config) -> list[GroupConfig]:
    """The groups the synthetic consumer commits to (membership groups have members)."""
    return [group for group in config.groups if group.membership is None]


async def _spawn(
    args: list[str],
    env: dict[str, str],
    log_path: str | None = None,
    *,
    stdout: int = asyncio.subprocess.DEVNULL,
) -> asyncio.subprocess.Process:
    log_fd = None if log_path is None else os.open(log_path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        return await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cpmgr",
            *args,
            env=env,
            stdout=stdout,
            stderr=log_fd,
            # Own process group: Ctrl-C reaches only the demo, which stops the children in order.
            start_new_session=True,
        )
    finally:
        if log_fd is not None:
            os.close(log_fd)  # the child has its own copy


async def _start_emulator(
    config: Config, port: int, env: dict[str, str]
) -> asyncio.subprocess.Process:
    """`cpmgr emulator`, once it listens: the daemons' first requests must not be refused (a
    busy machine can take seconds to start it). Its one line on stdout says it listens."""
    emulator = await _spawn(_emulator_args(config, port), env, stdout=asyncio.subprocess.PIPE)
    assert emulator.stdout is not None
    try:
        line = await asyncio.wait_for(emulator.stdout.readline(), EMULATOR_START_TIMEOUT)
    except TimeoutError:
        line = b""
    if not line.startswith(b"cpmgr emulator listening on "):
        await _stop_child(emulator, "emulator", 5)
        raise SystemExit(f"the emulator did not start (said {line!r}); see its errors above")
    return emulator


async def _wait_until_ready(path: str, daemon: asyncio.subprocess.Process) -> AsyncCpmgrClient:
    for _ in range(200):
        if daemon.returncode is not None:
            raise SystemExit(f"the daemon exited early with code {daemon.returncode}")
        client = AsyncCpmgrClient(path, reconnect_attempts=0)
        try:
            await client.ping()
            return client
        except CpmgrUnavailable:
            await client.close()
            await asyncio.sleep(0.05)
    raise SystemExit("the daemon did not start listening within 10 s")


Positions = dict[tuple[str, int], int]


async def _feed(
    client: AsyncCpmgrClient, config: Config, stop: asyncio.Event, ports: Ports, duration: float
) -> Positions:
    """Read every checkpoint group's shards from their begin cursor, at SLOW_SPEED x WRITE_RATE
    for the first SLOW_SHARE of `duration`, then at FAST_SPEED x (never past the shard's end);
    commit each shard's new position every READ_TICK (or as soon as a late tick comes)."""
    groups = _checkpoint_groups(config)
    started = time.monotonic()
    async with aiohttp.ClientSession() as session:
        cursors = await _emulator_shards(session, ports)
        keys = [(g.name, s) for g in groups for s in range(SHARDS_PER_LOGSTORE)]
        where = {(g.name, s): _data_key(g, s) for g in groups for s in range(SHARDS_PER_LOGSTORE)}
        positions: Positions = {key: cursors[where[key]][0] for key in keys}
        # What the reader may still read: a fraction of a log group carries over to the next tick
        # (cursors are too large for a float to count single log groups).
        allowance = dict.fromkeys(keys, 0.0)
        last = started
        while not stop.is_set():
            # By the time passed, not per tick: on a busy machine ticks come late, and a reader
            # that read a tick's worth per tick would fall behind for good.
            now = time.monotonic()
            slow = now - started < duration * SLOW_SHARE
            step = WRITE_RATE * (SLOW_SPEED if slow else FAST_SPEED) * max(now - last, READ_TICK)
            last = now
            with contextlib.suppress(aiohttp.ClientError):
                cursors = await _emulator_shards(session, ports)
            for key in keys:
                allowance[key] += step
                advance = min(int(allowance[key]), cursors[where[key]][1] - positions[key])
                if advance > 0:
                    positions[key] += advance
                allowance[key] = min(allowance[key] - max(advance, 0), step)
            for group in groups:
                batch = {
                    shard: _cursor(positions[group.name, shard])
                    for shard in range(SHARDS_PER_LOGSTORE)
                }
                await client.commit_many(group.name, batch)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=READ_TICK)
    return positions


async def _emulator_shards(
    session: aiohttp.ClientSession, ports: Ports
) -> dict[str, tuple[int, int]]:
    """(begin, end) positions by "PROJECT/LOGSTORE/SHARD", from the emulator's state."""
    async with session.get(f"http://127.0.0.1:{ports.emulator}/_emulator/state") as resp:
        state = await resp.json()
    return {
        key: (_number(shard["begin"]) or 0, _number(shard["end"]) or 0)
        for key, shard in state["shards"].items()
    }


def _data_key(group: GroupConfig, shard: int) -> str:
    return f"{group.project}/{group.logstore}/{shard}"


async def _emulator_checkpoints(session: aiohttp.ClientSession, ports: Ports) -> dict[str, str]:
    async with session.get(f"http://127.0.0.1:{ports.emulator}/_emulator/state") as resp:
        state = await resp.json()
    checkpoints: dict[str, str] = state["checkpoints"]
    return checkpoints


async def _metrics_text(session: aiohttp.ClientSession, ports: Ports) -> str:
    async with session.get(f"http://127.0.0.1:{ports.http}/metrics") as resp:
        return await resp.text()


def _shard_key(group: GroupConfig, shard: int) -> str:
    return f"{group.project}/{group.logstore}/{group.consumer_group}/{shard}"


def _latency_line(metrics: str) -> str:
    count = total = 0.0
    requests: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name == "cpmgr_commit_duration_seconds_count":
                count += sample.value
            elif sample.name == "cpmgr_commit_duration_seconds_sum":
                total += sample.value
            elif sample.name == "cpmgr_commit_requests_total":
                code = sample.labels["code"]
                requests[code] = requests.get(code, 0.0) + sample.value
    mean_ms = 1000 * total / count if count else 0.0
    codes = ", ".join(f"{code} {int(n)}" for code, n in sorted(requests.items()))
    return f"commits {int(count)}, mean commit latency {mean_ms:.1f} ms; requests: {codes}"


async def _report(ports: Ports, config: Config, stop: asyncio.Event) -> None:
    async with aiohttp.ClientSession() as session:
        shards = await _emulator_shards(session, ports)
        begins = {key: begin for key, (begin, _) in shards.items()}
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            with contextlib.suppress(aiohttp.ClientError):
                checkpoints = await _emulator_checkpoints(session, ports)
                metrics = await _metrics_text(session, ports)
                _print_progress(checkpoints, begins, metrics, config)


def _relative(position: int | None, begin: int) -> str:
    return "-" if position is None else str(position - begin)


def _lag_line(metrics: str) -> str:
    """Each group's consumer lag from the daemon's metrics: "orders 120 log groups / 6 s"."""
    wanted = ("log_groups", "seconds", "lagging", "stalled")
    names = {
        "cpmgr_consumer_lag_log_groups": "log_groups",
        "cpmgr_consumer_lag_seconds": "seconds",
        "cpmgr_lagging_shards": "lagging",
        "cpmgr_stalled_shards": "stalled",
    }
    figures: dict[str, dict[str, int]] = {}
    for family in text_string_to_metric_families(metrics):
        for sample in family.samples:
            if sample.name in names:
                group = figures.setdefault(sample.labels["group"], dict.fromkeys(wanted, 0))
                group[names[sample.name]] = int(sample.value)
    parts = [_group_lag(group, figures[group]) for group in sorted(figures)]
    return f"lag {', '.join(parts) if parts else '(no reading yet)'}"


def _group_lag(group: str, figures: dict[str, int]) -> str:
    states = [f"{figures[state]} {state}" for state in ("lagging", "stalled") if figures[state]]
    shown = f" ({', '.join(states)})" if states else ""
    return f"{group} {figures['log_groups']} log groups / {figures['seconds']} s{shown}"


def _print_progress(
    checkpoints: dict[str, str], begins: dict[str, int], metrics: str, config: Config
) -> None:
    """Log groups committed per shard (counted from its begin), commit latency and lag."""
    parts = []
    for group in _checkpoint_groups(config):
        shown = " ".join(
            _relative(
                _number(checkpoints.get(_shard_key(group, shard))),
                begins.get(_data_key(group, shard), 0),
            )
            for shard in range(SHARDS_PER_LOGSTORE)
        )
        parts.append(f"{group.name}: [{shown}]")
    print(f"{time.strftime('%H:%M:%S')} committed {'  '.join(parts)}", flush=True)
    print(f"         {_latency_line(metrics)}", flush=True)
    print(f"         {_lag_line(metrics)}", flush=True)


async def _stop_child(proc: asyncio.subprocess.Process, name: str, timeout: float) -> int:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), timeout=timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    code = proc.returncode if proc.returncode is not None else -1
    print(f"{name} stopped (exit code {code})", flush=True)
    return code


@dataclass
class Daemon:
    """A `cpmgr run` child: its process, socket and name in the output."""

    name: str
    proc: asyncio.subprocess.Process
    socket_path: str
    log_path: str

    def log_tail(self, lines: int = 20) -> str:
        with open(self.log_path, errors="replace") as log_file:
            return "".join(log_file.readlines()[-lines:])


async def _start_daemon(
    name: str, config_path: str, env: dict[str, str], run_dir: str, http_port: int
) -> Daemon:
    """`cpmgr run` of the config, with its own run dir (socket) and metrics port. Its log goes
    to a file, shown only if something went wrong: two daemons' logs would drown the demo."""
    os.makedirs(run_dir, exist_ok=True)
    env = {**env, "CPMGR_RUN_DIR": run_dir, "CPMGR_HTTP_PORT": str(http_port)}
    log_path = os.path.join(run_dir, "daemon.log")
    proc = await _spawn(["run", "--config", config_path], env, log_path)
    return Daemon(name, proc, load_config(config_path, env).socket.path, log_path)


@dataclass
class Membership:
    """The membership part: two consumers, each through a daemon of its own."""

    group: GroupConfig
    board: Board
    members: list[DemoMember] = field(default_factory=list)
    clients: list[AsyncCpmgrClient] = field(default_factory=list)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    daemon_b: Daemon | None = None
    daemon_b_code: int | None = None


async def _start_membership(
    group: GroupConfig, daemons: tuple[Daemon, Daemon], stop: asyncio.Event
) -> Membership:
    part = Membership(group, Board(SHARDS_PER_LOGSTORE), daemon_b=daemons[1])
    for seed, (name, daemon) in enumerate(zip(("consumer-a", "consumer-b"), daemons, strict=True)):
        client = await _wait_until_ready(daemon.socket_path, daemon.proc)
        part.clients.append(client)
        member = await join(client, group.name, name, part.board, seed)
        part.members.append(member)
        part.tasks.append(asyncio.create_task(member.run(stop)))
    return part


async def _membership_script(part: Membership, stop: asyncio.Event, duration: float) -> None:
    """Half-way (once both consumers hold shards), SIGTERM consumer-b's daemon: it revokes
    consumer-b's shards, which hands them back, and consumer-a takes them over. The demo ends
    `duration` after the start, but never before the takeover is complete (bounded)."""
    started = time.monotonic()
    if await _until(stop, lambda: False, duration / 2):
        return
    if await _until(stop, part.board.balanced, BALANCE_WAIT) or part.daemon_b is None:
        return
    print(f"{time.strftime('%H:%M:%S')} members: stopping consumer-b's daemon", flush=True)
    part.daemon_b_code = await _stop_child(part.daemon_b.proc, "consumer-b's daemon", 15)
    shards = list(range(SHARDS_PER_LOGSTORE))
    if await _until(stop, lambda: part.board.held_by("consumer-a") == shards, BALANCE_WAIT):
        return
    left = started + duration - time.monotonic()
    await _until(stop, lambda: False, max(left, 1.0))  # consumer-a reads on alone a while
    stop.set()


async def _until(stop: asyncio.Event, condition: Callable[[], bool], timeout: float) -> bool:
    """Wait until `condition` holds or `timeout` passed; True if `stop` was set meanwhile.
    The conditions are cheap looks at the board, so a 0.1 s poll is plenty for a demo."""
    deadline = time.monotonic() + timeout
    while not condition() and not stop.is_set():
        left = deadline - time.monotonic()
        if left <= 0:
            break
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=min(left, 0.1))
    return stop.is_set()


async def demo(config_path: str, duration: float) -> int:
    ports = Ports()
    run_dir = tempfile.mkdtemp(prefix="cpmgr-demo-")
    env = {**os.environ, "CPMGR_EMULATOR_PORT": str(ports.emulator)}
    config = load_config(config_path, {**env, "CPMGR_RUN_DIR": run_dir})
    members_group = next((g for g in config.groups if g.membership is not None), None)
    emulator = await _start_emulator(config, ports.emulator, env)
    daemon = await _start_daemon("daemon", config_path, env, run_dir, ports.http)
    daemon_b = None
    if members_group is not None:
        daemon_b = await _start_daemon(
            "consumer-b's daemon", config_path, env, os.path.join(run_dir, "b"), ports.http_b
        )
    print(
        f"emulator on 127.0.0.1:{ports.emulator}, daemon socket {daemon.socket_path}, "
        f"metrics http://127.0.0.1:{ports.http}/metrics; stops after {duration:g} s or Ctrl-C",
        flush=True,
    )
    print(
        f"the emulator answers {ERROR_RATE:.0%} of requests with 500 InternalServerError: the "
        "daemons retry them, and every checkpoint still arrives",
        flush=True,
    )
    print(
        f"watch the daemon beside it: .venv/bin/cpmgr status --socket {daemon.socket_path}",
        flush=True,
    )
    stop = _stop_on_signals(daemon)
    problems: list[str] = []
    code = 1  # until the daemon has stopped by itself
    try:
        positions, part = await _run_consumers(config, (daemon, daemon_b), stop, duration, ports)
        print("consumers stopped", flush=True)
        code = await _stop_child(daemon.proc, "daemon", config.commit.shutdown_timeout + 5)
        problems += await _verify(ports, config, positions)
        if part is not None:
            problems += await _verify_membership(ports, part)
    finally:
        for child in (daemon, daemon_b):
            if child is not None and child.proc.returncode is None:
                timeout = config.commit.shutdown_timeout + 5
                code = await _stop_child(child.proc, child.name, timeout) or code
        await _stop_child(emulator, "emulator", 5)
        if code or problems:
            _show_logs(child for child in (daemon, daemon_b) if child is not None)
        shutil.rmtree(run_dir, ignore_errors=True)
    for problem in problems:
        print(f"PROBLEM: {problem}", flush=True)
    return code or (1 if problems else 0)


def _stop_on_signals(daemon: Daemon) -> asyncio.Event:
    """An event set by Ctrl-C or SIGTERM; a second one is passed on to the daemon."""
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set() and daemon.proc.returncode is None:
            # Ctrl-C again: pass it on, so the daemon's second signal ends its drain at once.
            daemon.proc.send_signal(signal.SIGTERM)
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, on_signal)
    loop.add_signal_handler(signal.SIGTERM, on_signal)
    return stop


async def _run_consumers(
    config: Config,
    daemons: tuple[Daemon, Daemon | None],
    stop: asyncio.Event,
    duration: float,
    ports: Ports,
) -> tuple[Positions, Membership | None]:
    """The synthetic checkpoint consumer and, with a membership group, the two members; until
    `stop` (set by the membership script, or after `duration` without one)."""
    daemon, daemon_b = daemons
    members_group = next((g for g in config.groups if g.membership is not None), None)
    part = None
    client = await _wait_until_ready(daemon.socket_path, daemon.proc)
    async with client:
        if members_group is not None and daemon_b is not None:
            part = await _start_membership(members_group, (daemon, daemon_b), stop)
            part.tasks.append(asyncio.create_task(_membership_script(part, stop, duration)))
        else:
            asyncio.get_running_loop().call_later(duration, stop.set)
        reporter = asyncio.create_task(_report(ports, config, stop))
        positions = await _feed(client, config, stop, ports, duration)
        await reporter
        if part is not None:
            await asyncio.gather(*part.tasks)
            for member_client in part.clients:
                await member_client.close()
    return positions, part


def _show_logs(daemons: Iterable[Daemon]) -> None:
    for daemon in daemons:
        print(f"--- the last lines of the {daemon.name}'s log:", flush=True)
        print(daemon.log_tail(), end="", flush=True)


async def _verify(ports: Ports, config: Config, positions: Positions) -> list[str]:
    """After the daemon's final flush, every shard's last checkpoint must be in the emulator."""
    async with aiohttp.ClientSession() as session:
        checkpoints = await _emulator_checkpoints(session, ports)
    groups = {g.name: g for g in config.groups}
    missing = [
        f"{name}/{shard}"
        for (name, shard), number in sorted(positions.items())
        if _number(checkpoints.get(_shard_key(groups[name], shard))) != number
    ]
    if missing:
        return [f"NOT committed at their last checkpoint: {', '.join(missing)}"]
    print(f"all {len(positions)} shards committed at their last checkpoint", flush=True)
    return []


async def _verify_membership(ports: Ports, part: Membership) -> list[str]:
    """Each membership shard held by one consumer at a time, handed over at its last
    checkpoint, and that checkpoint at the emulator; consumer-a took consumer-b's shards."""
    async with aiohttp.ClientSession() as session:
        checkpoints = await _emulator_checkpoints(session, ports)
    remote = {
        shard: _number(checkpoints.get(_shard_key(part.group, shard)))
        for shard in range(SHARDS_PER_LOGSTORE)
    }
    problems = check_holdings(part.board, remote)
    if part.daemon_b_code is not None:
        problems += _check_takeover(part)
    if problems:
        return [f"membership: {problem}" for problem in problems]
    took_over = ""
    if part.daemon_b_code is not None:
        took_over = ", consumer-a took over consumer-b's shards"
    print(
        f"membership: {len(part.board.holdings)} holdings of {SHARDS_PER_LOGSTORE} shards, "
        f"never two at once, each handed over at its last checkpoint{took_over}; "
        f"all {SHARDS_PER_LOGSTORE} last checkpoints reached the emulator",
        flush=True,
    )
    return []


def _check_takeover(part: Membership) -> list[str]:
    problems = []
    if part.daemon_b_code != 0:
        problems.append(f"consumer-b's daemon exited with code {part.daemon_b_code}")
    b_shards = {h.shard for h in part.board.holdings if h.consumer == "consumer-b"}
    if not b_shards:
        problems.append("consumer-b never held a shard")
    for shard in range(SHARDS_PER_LOGSTORE):
        held = [h for h in part.board.holdings if h.shard == shard]
        last = max(held, key=lambda h: h.start, default=None)
        if last is not None and last.consumer != "consumer-a":
            problems.append(f"shard {shard} ended with {last.consumer}, not consumer-a")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmgr.demo", description=__doc__)
    parser.add_argument("--config", default=str(Path("config") / "local.yaml"))
    parser.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        help=f"stop after N seconds (default {DEFAULT_DURATION:g}); Ctrl-C stops earlier",
    )
    args = parser.parse_args(argv)
    return asyncio.run(demo(args.config, args.duration))


if __name__ == "__main__":
    raise SystemExit(main())
