"""Attacks on the journal of a real `cpmgr run`: damage on disk must never move SLS backwards."""

from __future__ import annotations

import signal
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lifecycle_helpers import (
    LOGSTORE,
    PROJECT,
    cursor,
    daemon_config,
    group,
    remote_key,
    running_daemon,
    write_yaml,
)

from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError
from cpmgr.emulator import EmulatorHandle, running_emulator
from cpmgr.journal import LOG_NAME

CONSUMER_GROUP = "cg-journal"
KEYS = {"access_key_id": "journal-key-id", "access_key_secret": "journal-secret-5e1d"}


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:4"],
        consumer_groups=[f"{PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}"],
        **KEYS,
    ) as handle:
        yield handle


def damage_record(log: Path, *, containing: bytes) -> None:
    """Flip one byte inside the one log record that contains `containing`."""
    lines = log.read_bytes().splitlines(keepends=True)
    [index] = [i for i, line in enumerate(lines) if containing in line]
    lines[index] = lines[index].replace(b'"g":"', b'"g":"#', 1)
    log.write_bytes(b"".join(lines))


async def test_a_damaged_middle_journal_record_does_not_rewind_sls(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    state = tmp_path / "state"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", CONSUMER_GROUP)],
    )
    config["state"] = {"dir": str(state), "fsync": "always"}
    path = write_yaml(tmp_path / "cpmgr.yaml", config)

    # The log becomes accept(100) commit(100) accept(200) commit(200).
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        for value in (100, 200):
            await client.commit("orders", 0, cursor(value))
            assert await client.flush() == 1
        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0
    damage_record(state / LOG_NAME, containing=b'"t":"a","n":3,')  # accept(200)

    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await daemon.wait_for_line("corrupt record")
        [shard] = await client.get("orders", 0)
        assert shard["pending"] is None
        assert shard["committed"] == cursor(200)
        assert await client.flush() == 0  # nothing to send
        with pytest.raises(CpmgrProtocolError) as refused:  # 200 is still the baseline
            await client.commit("orders", 0, cursor(150))
        assert refused.value.code == "CheckpointRegression"
        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0
    assert emulator.state.history[remote_key(CONSUMER_GROUP, 0)] == [cursor(100), cursor(200)]
