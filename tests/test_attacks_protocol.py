"""Attacks on the request parser, against a real `cpmgr run`: hostile lines are
answered `BadRequest` at once, every other consumer keeps being served, and SIGTERM still acts."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from lifecycle_helpers import (
    PROJECT,
    DaemonProcess,
    cursor,
    daemon_config,
    group,
    remote_key,
    running_daemon,
    write_yaml,
)
from test_ingest import connect

from cpmgr.emulator import EmulatorHandle, running_emulator

LOGSTORE = "lifecycle-logstore"
KEYS = {"access_key_id": "parser-attack-id", "access_key_secret": "parser-attack-secret"}
# Under socket.max_line_bytes (1 MiB): the daemon must read these lines whole and parse them.
LINE_BYTES = 1_000_000
# Generous for a loaded machine; the quadratic parser needed hours for one such line.
ANSWER_WITHIN = 15.0


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:8"],
        consumer_groups=[f"{PROJECT}/{LOGSTORE}/cg-a"],
        access_key_id=KEYS["access_key_id"],
        access_key_secret=KEYS["access_key_secret"],
    ) as handle:
        yield handle


@asynccontextmanager
async def daemon_for(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> AsyncIterator[tuple[DaemonProcess, str]]:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock, endpoint=emulator.url, credentials=KEYS, groups=[group("orders", "cg-a")]
    )
    async with running_daemon(write_yaml(tmp_path / "cpmgr.yaml", config)) as daemon:
        yield daemon, str(sock)


def fill(prefix: str, unit: str, suffix: str = "") -> bytes:
    count = (LINE_BYTES - len(prefix) - len(suffix)) // len(unit)
    return (prefix + unit * count + suffix).encode()


ATTACK_LINES = {
    # The line that froze a live daemon: brackets, then an unterminated string of `\"`.
    "quadratic escape": fill("[" * 33 + '"', '\\"'),
    "escape inside a request": fill('{"op":"ping","x":' + "[{" * 40 + '"', '\\"\\\\'),
    "deep nesting": fill("", "["),
    "huge number": fill('{"op":"ping","id":1,"x":', "9", "}"),
    "nested past the limit": fill('{"op":"ping","x":[', "[" * 32 + "]" * 32 + ",", "0]}"),
}


async def test_attack_quadratic_escape_lines_are_answered_while_others_are_served(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    async with (
        daemon_for(emulator, sock_dir, tmp_path) as (daemon, sock),
        connect(sock) as attacker,
        connect(sock) as consumer,
    ):
        # Every attack line pipelined at once, then a ping: each gets its answer, in order.
        await attacker.send(b"".join(line + b"\n" for line in ATTACK_LINES.values()))
        await attacker.send(b'{"op":"ping","id":"after"}\n')
        answers = [await asyncio.wait_for(attacker.answer(), ANSWER_WITHIN) for _ in ATTACK_LINES]
        assert [answer["error"]["code"] for answer in answers] == ["BadRequest"] * len(answers)
        assert "nested deeper" in answers[-1]["error"]["message"]
        assert await attacker.answer() == {"ok": True, "id": "after"}
        # Another consumer's commit goes all the way to SLS.
        commit = {"op": "commit", "group": "orders", "shard": 1, "checkpoint": cursor(42)}
        assert await consumer.ask({**commit, "wait": True}) == {"ok": True}
        assert emulator.state.snapshot()["checkpoints"][remote_key("cg-a", 1)] == cursor(42)
        # And the daemon still acts on SIGTERM.
        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=ANSWER_WITHIN) == 0


async def test_attack_500kb_consumer_name_is_refused_before_it_reaches_sls(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    huge = "c" * 500_000
    commit = {"op": "commit", "group": "orders", "wait": True}
    single_commit = {**commit, "shard": 2, "checkpoint": cursor(7)}
    async with daemon_for(emulator, sock_dir, tmp_path) as (_, sock), connect(sock) as client:
        single = await client.ask({**single_commit, "consumer": huge, "id": 1})
        assert single["error"]["code"] == "BadRequest"
        assert single["error"]["message"].startswith("consumer: must be 1-128 characters")
        items = [{"shard": shard, "checkpoint": cursor(7)} for shard in range(3)]
        items[2]["consumer"] = "pod a/1"
        many = await client.ask({**commit, "checkpoints": items})
        assert many["error"]["message"].startswith("checkpoints[2].consumer: must be")
        # Nothing of either was accepted: SLS never saw those shards.
        assert emulator.state.snapshot()["checkpoints"] == {}
        # A name within the rule goes through, and SLS holds it as the shard's consumer.
        assert await client.ask({**single_commit, "consumer": "pod-a-1"}) == {"ok": True}
        got = await client.ask({"op": "get", "group": "orders", "shard": 2, "remote": True})
        assert got["shards"][0]["remote"]["consumer"] == "pod-a-1"
