"""`make run`: the emulator, the daemon and a synthetic consumer, with live progress.

Starts `cpmgr emulator` and `cpmgr run --config config/local.yaml` as child processes on free
loopback ports, feeds advancing checkpoints for a few shards through the socket, and prints
what reached the emulator and the commit latency every second. Ctrl-C (or `--duration`)
stops the consumer, then the daemon (which flushes), then the emulator.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import random
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

from cpmgr.client import AsyncCpmgrClient, CpmgrUnavailable
from cpmgr.config import Config, GroupConfig, load_config

KEY_ID = "local-test-key-id"
KEY_SECRET = "local-test-key-secret"
SHARDS_PER_LOGSTORE = 4


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


def _emulator_args(config: Config, port: int) -> list[str]:
    args = [
        "emulator",
        f"--listen=127.0.0.1:{port}",
        f"--access-key-id={KEY_ID}",
        f"--access-key-secret={KEY_SECRET}",
        "--latency-ms=2:20",
        "--error-rate=0.05",
        "--seed=1",
    ]
    for group in config.groups:
        args.append(f"--logstore={group.project}/{group.logstore}:{SHARDS_PER_LOGSTORE}")
        args.append(f"--consumer-group={group.project}/{group.logstore}/{group.consumer_group}")
    return args


async def _spawn(args: list[str], env: dict[str, str]) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr",
        *args,
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        # Own process group: Ctrl-C reaches only the demo, which stops the children in order.
        start_new_session=True,
    )


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


async def _feed(client: AsyncCpmgrClient, config: Config, stop: asyncio.Event) -> Positions:
    rng = random.Random(7)
    positions: Positions = {
        (group.name, shard): 1_000_000 * (shard + 1)
        for group in config.groups
        for shard in range(SHARDS_PER_LOGSTORE)
    }
    while not stop.is_set():
        for group in config.groups:
            batch = {}
            for shard in range(SHARDS_PER_LOGSTORE):
                positions[group.name, shard] += rng.randrange(1, 50)
                batch[shard] = _cursor(positions[group.name, shard])
            await client.commit_many(group.name, batch)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=0.05)
    return positions


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
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=1.0)
            with contextlib.suppress(aiohttp.ClientError):
                checkpoints = await _emulator_checkpoints(session, ports)
                _print_progress(checkpoints, await _metrics_text(session, ports), config)


def _print_progress(checkpoints: dict[str, str], metrics: str, config: Config) -> None:
    parts = []
    for group in config.groups:
        values = [
            _number(checkpoints.get(_shard_key(group, s))) for s in range(SHARDS_PER_LOGSTORE)
        ]
        shown = " ".join("-" if v is None else str(v) for v in values)
        parts.append(f"{group.name}: [{shown}]")
    print(f"{time.strftime('%H:%M:%S')} committed {'  '.join(parts)}", flush=True)
    print(f"         {_latency_line(metrics)}", flush=True)


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


async def demo(config_path: str, duration: float | None) -> int:
    ports = Ports()
    run_dir = tempfile.mkdtemp(prefix="cpmgr-demo-")
    env = {
        **os.environ,
        "CPMGR_EMULATOR_PORT": str(ports.emulator),
        "CPMGR_HTTP_PORT": str(ports.http),
        "CPMGR_RUN_DIR": run_dir,
    }
    config = load_config(config_path, env)
    emulator = await _spawn(_emulator_args(config, ports.emulator), env)
    daemon = await _spawn(["run", "--config", config_path], env)
    print(
        f"emulator on 127.0.0.1:{ports.emulator}, daemon socket {config.socket.path}, "
        f"metrics http://127.0.0.1:{ports.http}/metrics; Ctrl-C stops",
        flush=True,
    )
    stop = asyncio.Event()

    def on_signal() -> None:
        if stop.is_set() and daemon.returncode is None:
            # Ctrl-C again: pass it on, so the daemon's second signal ends its drain at once.
            daemon.send_signal(signal.SIGTERM)
        stop.set()

    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGINT, on_signal)
    loop.add_signal_handler(signal.SIGTERM, on_signal)
    if duration is not None:
        loop.call_later(duration, stop.set)
    try:
        client = await _wait_until_ready(config.socket.path, daemon)
        async with client:
            reporter = asyncio.create_task(_report(ports, config, stop))
            positions = await _feed(client, config, stop)
            await reporter
        print("consumer stopped", flush=True)
        code = await _stop_child(daemon, "daemon", config.commit.shutdown_timeout + 5)
        await _verify(ports, config, positions)
    finally:
        if daemon.returncode is None:
            code = await _stop_child(daemon, "daemon", config.commit.shutdown_timeout + 5)
        await _stop_child(emulator, "emulator", 5)
        shutil.rmtree(run_dir, ignore_errors=True)
    return code


async def _verify(ports: Ports, config: Config, positions: Positions) -> None:
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
        print(f"NOT committed at their last checkpoint: {', '.join(missing)}", flush=True)
    else:
        print(f"all {len(positions)} shards committed at their last checkpoint", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpmgr.demo", description=__doc__)
    parser.add_argument("--config", default=str(Path("config") / "local.yaml"))
    parser.add_argument("--duration", type=float, default=None, help="stop after N seconds")
    args = parser.parse_args(argv)
    return asyncio.run(demo(args.config, args.duration))


if __name__ == "__main__":
    raise SystemExit(main())
