"""`cpmgr run` as a real process: SIGTERM drains, SIGHUP reloads, credentials rotate, startup
failures are one line and the contract's exit code.

The emulator runs in the test's own loop with access keys, so every signature is checked.
"""

from __future__ import annotations

import asyncio
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from lifecycle_helpers import (
    LOGSTORE,
    PROJECT,
    StallableSleep,
    cursor,
    daemon_config,
    eventually,
    group,
    remote_key,
    run_to_exit,
    running_daemon,
    write_credentials,
    write_raw,
    write_yaml,
)

from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError, CpmgrUnavailable
from cpmgr.emulator import EmulatorHandle, running_emulator

KEY_ID = "lifecycle-key-id"
KEY_SECRET = "lifecycle-secret-0f9c2a"
OLD_KEY_ID = "rotated-out-key-id"
OLD_SECRET = "rotated-out-secret-7d41e3"
KEYS = {"access_key_id": KEY_ID, "access_key_secret": KEY_SECRET}
REFUSE_ALL = [500, "InternalServerError"]
CREDENTIALS_CODES = {"Unauthorized", "SignatureNotMatch", "InvalidAccessKeyId"}


@pytest.fixture
def stall() -> StallableSleep:
    return StallableSleep()


@pytest.fixture
async def emulator(stall: StallableSleep) -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:8"],
        consumer_groups=[f"{PROJECT}/{LOGSTORE}/{name}" for name in ("cg-a", "cg-b", "cg-c")],
        access_key_id=KEY_ID,
        access_key_secret=KEY_SECRET,
        sleep=stall,
    ) as handle:
        try:
            yield handle
        finally:
            stall.release()  # let held requests end, so the emulator closes at once


def committed(emulator: EmulatorHandle) -> dict[str, str]:
    checkpoints: dict[str, str] = emulator.state.snapshot()["checkpoints"]
    return checkpoints


def update_requests(emulator: EmulatorHandle) -> dict[str, int]:
    return dict(emulator.state.requests.get("UpdateCheckPoint", {}))


def left_behind(lines: list[str]) -> list[str]:
    """What the daemon reported as left behind, without the log prefix, sorted."""
    return sorted(line.partition("left behind: ")[2] for line in lines if "left behind" in line)


def hang_sls(emulator: EmulatorHandle, stall: StallableSleep) -> None:
    """From now on every SLS request is held unanswered (until the test ends)."""
    stall.stall()
    emulator.faults.update({"latency_ms": [1, 1]})


def refuse_everything(emulator: EmulatorHandle, *consumer_groups: str) -> None:
    emulator.faults.update(
        {"force": {f"{PROJECT}/{LOGSTORE}/{cg}": REFUSE_ALL for cg in consumer_groups}}
    )


# --------------------------------------------------------------------------- SIGTERM


async def test_sigterm_commits_everything_pending_and_exits_0(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", "cg-a"), group("payments", "cg-b")],
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit_many("orders", {0: cursor(100), 1: cursor(110), 2: cursor(120)})
        await client.commit("payments", 5, cursor(500))
        await client.commit("payments", 5, cursor(501))  # latest wins
        assert update_requests(emulator) == {}  # a 1 h interval: nothing was due yet

        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0

        with pytest.raises(CpmgrUnavailable):
            await client.ping()  # answered, then closed

    assert committed(emulator) == {
        remote_key("cg-a", 0): cursor(100),
        remote_key("cg-a", 1): cursor(110),
        remote_key("cg-a", 2): cursor(120),
        remote_key("cg-b", 5): cursor(501),
    }
    assert update_requests(emulator) == {"OK": 4}
    assert "every accepted checkpoint is committed" in daemon.log
    assert "were dropped" not in daemon.log
    assert "left behind" not in daemon.log
    assert "Traceback" not in daemon.log
    assert not sock.exists()


async def test_a_dropped_value_is_reported_at_exit_and_the_journal_replay_logged_once(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock, endpoint=emulator.url, credentials=KEYS, groups=[group("orders", "cg-a")]
    )
    config["state"] = {"dir": str(tmp_path / "state")}
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    emulator.faults.update(
        {"force": {f"{PROJECT}/{LOGSTORE}/cg-a": [404, "ConsumerGroupNotExist"]}}
    )
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit("orders", 0, cursor(100))
        with pytest.raises(CpmgrProtocolError):
            await client.flush()  # a permanent failure: the value is dropped
        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0

    assert sum("journal replayed" in line for line in daemon.lines) == 1, daemon.log
    assert "every accepted checkpoint is committed" not in daemon.log
    assert "1 accepted checkpoint(s) were dropped after a permanent failure" in daemon.log


async def test_sigterm_while_sls_refuses_everything_exits_1_and_logs_what_is_left(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", "cg-a"), group("payments", "cg-b")],
        max_attempts=2,
        shutdown_timeout="1s",
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        refuse_everything(emulator, "cg-a", "cg-b")
        await client.commit_many("orders", {3: cursor(30), 4: cursor(40)})
        await client.commit("payments", 0, cursor(7))

        sent = time.monotonic()
        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 1
        # The drain keeps retrying for the whole shutdown_timeout, and no longer.
        assert 1.0 <= time.monotonic() - sent < 3.0

    assert committed(emulator) == {}
    refused = update_requests(emulator)
    assert set(refused) == {"InternalServerError"}
    assert refused["InternalServerError"] > 6  # more than one round of 2 attempts per shard
    assert left_behind(daemon.lines) == [
        f"group orders shard 3 checkpoint {cursor(30)} (last error: InternalServerError: "
        f"injected InternalServerError for {PROJECT}/{LOGSTORE}/cg-a)",
        f"group orders shard 4 checkpoint {cursor(40)} (last error: InternalServerError: "
        f"injected InternalServerError for {PROJECT}/{LOGSTORE}/cg-a)",
        f"group payments shard 0 checkpoint {cursor(7)} (last error: InternalServerError: "
        f"injected InternalServerError for {PROJECT}/{LOGSTORE}/cg-b)",
    ]
    assert "Traceback" not in daemon.log


async def test_sigterm_during_a_short_outage_keeps_retrying_and_commits_everything(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", "cg-a")],
        max_attempts=2,
        shutdown_timeout="20s",
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        refuse_everything(emulator, "cg-a")
        await client.commit_many("orders", {1: cursor(10), 2: cursor(20)})
        daemon.send(signal.SIGTERM)
        await daemon.wait_for_line("failed with InternalServerError")  # a first round failed
        emulator.faults.update({"force": {f"{PROJECT}/{LOGSTORE}/cg-a": None}})
        assert await daemon.exit_code(timeout=20) == 0

    assert committed(emulator) == {
        remote_key("cg-a", 1): cursor(10),
        remote_key("cg-a", 2): cursor(20),
    }
    assert "left behind" not in daemon.log


async def test_sigterm_while_sls_hangs_exits_1_within_shutdown_timeout(
    emulator: EmulatorHandle, stall: StallableSleep, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    shutdown_timeout = 1.5
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", "cg-a")],
        shutdown_timeout=f"{shutdown_timeout}s",
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with (
        running_daemon(path) as daemon,
        AsyncCpmgrClient(str(sock)) as client,
        AsyncCpmgrClient(str(sock)) as waiting,
    ):
        hang_sls(emulator, stall)
        await client.commit("orders", 4, cursor(40))
        # A consumer waiting for its commit while SLS hangs: its request is in flight.
        waiter = asyncio.ensure_future(waiting.commit("orders", 5, cursor(50), wait=True))
        await stall.wait_held(1)

        sent = time.monotonic()
        daemon.send(signal.SIGTERM)
        await daemon.wait_for_line("shutting down")
        with pytest.raises(CpmgrProtocolError) as refused:
            await client.commit("orders", 4, cursor(41))
        assert refused.value.code == "ShuttingDown"
        await client.ping()  # everything but commits is still answered while draining

        assert await daemon.exit_code(timeout=shutdown_timeout + 10) == 1
        # The budget, then at most CLOSE_GRACE for the waiting consumer's answer.
        assert time.monotonic() - sent < shutdown_timeout + 2.0
        with pytest.raises(CpmgrProtocolError) as cut_off:
            await asyncio.wait_for(waiter, 5)
        assert cut_off.value.code == "ShuttingDown"

    assert committed(emulator) == {}
    left = left_behind(daemon.lines)
    assert [line.partition(" (")[0] for line in left] == [
        f"group orders shard 4 checkpoint {cursor(40)}",
        f"group orders shard 5 checkpoint {cursor(50)}",
    ]
    assert "Traceback" not in daemon.log


async def test_a_second_sigterm_exits_at_once(
    emulator: EmulatorHandle, stall: StallableSleep, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", "cg-a")],
        shutdown_timeout="30s",
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with (
        running_daemon(path) as daemon,
        AsyncCpmgrClient(str(sock)) as client,
        AsyncCpmgrClient(str(sock)) as flusher,
    ):
        hang_sls(emulator, stall)
        await client.commit("orders", 0, cursor(7))
        # A consumer blocked in a flush that cannot finish must not hold the exit up.
        flush = asyncio.ensure_future(flusher.flush(timeout=60))
        await stall.wait_held(1)
        daemon.send(signal.SIGTERM)
        await daemon.wait_for_line("shutting down")

        sent = time.monotonic()
        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 1
        assert time.monotonic() - sent < 2.0
        with pytest.raises(CpmgrProtocolError) as cut_off:
            await asyncio.wait_for(flush, 5)
        assert cut_off.value.code == "ShuttingDown"

    assert "second signal" in daemon.log
    assert f"left behind: group orders shard 0 checkpoint {cursor(7)}" in daemon.log
    assert "Traceback" not in daemon.log


# --------------------------------------------------------------------------- SIGHUP


async def test_sighup_with_a_good_file_swaps_groups_and_interval_keeping_pending_values(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", "cg-a"), group("billing", "cg-c")],
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit("orders", 0, cursor(10))
        await client.commit("billing", 2, cursor(20))
        with pytest.raises(CpmgrProtocolError) as unknown:
            await client.commit("payments", 1, cursor(1))
        assert unknown.value.code == "UnknownGroup"
        assert update_requests(emulator) == {}  # a 1 h interval: nothing was due yet

        reloaded = daemon_config(
            socket_path=sock,
            endpoint=emulator.url,
            credentials=KEYS,
            groups=[group("orders", "cg-a"), group("payments", "cg-b")],
            interval="50ms",
            socket_mode="0600",
        )
        write_yaml(path, reloaded)
        daemon.send(signal.SIGHUP)
        await daemon.wait_for_line("config reloaded: 2 group(s)")
        assert "socket.* changed; it takes effect after a restart" in daemon.log

        await client.commit("payments", 1, cursor(30))
        with pytest.raises(CpmgrProtocolError) as removed:
            await client.commit("billing", 2, cursor(21))
        assert removed.value.code == "UnknownGroup"

        # Nobody asks for a flush: the 50 ms interval commits orders and payments, and the
        # removed billing group was flushed on its way out.
        want = {
            remote_key("cg-a", 0): cursor(10),
            remote_key("cg-b", 1): cursor(30),
            remote_key("cg-c", 2): cursor(20),
        }
        await eventually(
            lambda: committed(emulator) == want, what=f"committed {want}", daemon=daemon
        )
        await client.commit("orders", 0, cursor(11))
        want[remote_key("cg-a", 0)] = cursor(11)
        await eventually(lambda: committed(emulator) == want, what="the next cycle", daemon=daemon)
        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0
    assert "Traceback" not in daemon.log


async def test_sighup_with_a_bad_file_changes_nothing_and_names_every_problem(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials=KEYS,
        groups=[group("orders", "cg-a")],
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit("orders", 0, cursor(10))
        bad = daemon_config(
            socket_path=sock,
            endpoint=emulator.url,
            credentials=KEYS,
            groups=[group("orders", "cg-a"), {"name": "payments", "project": PROJECT}],
            interval="soon",
        )
        write_yaml(path, bad)
        daemon.send(signal.SIGHUP)
        for problem in (
            "commit.interval: must be a duration",
            "groups[1].logstore: required",
            "groups[1].consumer_group: required",
        ):
            line = await daemon.wait_for_line(problem)
            assert "reload refused, keeping the running config" in line

        with pytest.raises(CpmgrProtocolError) as unknown:
            await client.commit("payments", 1, cursor(1))
        assert unknown.value.code == "UnknownGroup"
        [shard] = await client.get("orders", 0)
        assert shard["pending"] == cursor(10)
        assert update_requests(emulator) == {}  # still the 1 h interval
        assert "config reloaded" not in daemon.log

        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0
    assert committed(emulator) == {remote_key("cg-a", 0): cursor(10)}


# --------------------------------------------------------------------------- credentials


async def test_a_rotated_credentials_file_is_used_for_the_next_requests(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    keys = tmp_path / "sts.json"
    write_credentials(keys, OLD_KEY_ID, OLD_SECRET)
    emulator.app.keys.clear()
    emulator.app.keys[OLD_KEY_ID] = OLD_SECRET
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials={"credentials_file": str(keys)},
        groups=[group("orders", "cg-a")],
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        await client.commit("orders", 0, cursor(1), wait=True)

        # The server retires the old key as the file is rotated: the very next request signs
        # with the new key (no failed attempt first), because the file's mtime changed.
        emulator.app.keys.clear()
        emulator.app.keys[KEY_ID] = KEY_SECRET
        write_credentials(keys, KEY_ID, KEY_SECRET)
        await client.commit("orders", 0, cursor(2), wait=True)
        assert update_requests(emulator) == {"OK": 2}

        # A broken rotation keeps the last good keys, and says so.
        write_raw(keys, '{"AccessKeyId": "half-writ')
        await client.commit("orders", 0, cursor(3), wait=True)
        await daemon.wait_for_line("credentials file unusable, keeping the previous keys")
        assert update_requests(emulator) == {"OK": 3}

        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0

    assert committed(emulator) == {remote_key("cg-a", 0): cursor(3)}
    assert f"key id {KEY_ID}" in daemon.log
    for secret in (OLD_SECRET, KEY_SECRET):
        assert secret not in daemon.log


async def test_credentials_are_re_read_after_the_server_rejects_them(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    keys = tmp_path / "sts.json"
    write_credentials(keys, OLD_KEY_ID, OLD_SECRET)
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        credentials={"credentials_file": str(keys)},
        groups=[group("orders", "cg-a")],
        max_attempts=2,
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as daemon, AsyncCpmgrClient(str(sock)) as client:
        with pytest.raises(CpmgrProtocolError) as rejected:
            await client.commit("orders", 0, cursor(1), wait=True)
        assert rejected.value.code in CREDENTIALS_CODES
        assert rejected.value.dropped is False
        [shard] = await client.get("orders", 0)
        assert shard["pending"] == cursor(1)

        # Same mtime as before: only the rejection makes the daemon read the file again.
        write_credentials(keys, KEY_ID, KEY_SECRET, mtime_ns=keys.stat().st_mtime_ns)
        await client.commit("orders", 0, cursor(2), wait=True)

        daemon.send(signal.SIGTERM)
        assert await daemon.exit_code(timeout=10) == 0

    assert committed(emulator) == {remote_key("cg-a", 0): cursor(2)}
    for secret in (OLD_SECRET, KEY_SECRET):
        assert secret not in daemon.log


# --------------------------------------------------------------------------- startup failures


def assert_one_clear_line(lines: list[str], *expected: str) -> None:
    assert len(lines) == 1, "\n".join(lines)
    assert "Traceback" not in lines[0]
    for text in expected:
        assert text in lines[0]


async def test_an_invalid_config_is_one_line_and_exit_2(sock_dir: Path, tmp_path: Path) -> None:
    config = daemon_config(
        socket_path=sock_dir / "cpmgr.sock",
        endpoint="http://127.0.0.1:9",
        credentials=KEYS,
        groups=[group("orders", "cg-a")],
        interval="0s",
    )
    code, lines = await run_to_exit(write_yaml(tmp_path / "cpmgr.yaml", config))
    assert code == 2
    assert_one_clear_line(lines, "commit.interval: must be greater than 0")


async def test_a_socket_held_by_a_live_daemon_is_one_line_and_exit_1(
    emulator: EmulatorHandle, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock, endpoint=emulator.url, credentials=KEYS, groups=[group("orders", "cg-a")]
    )
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    async with running_daemon(path) as first, AsyncCpmgrClient(str(sock)) as client:
        code, lines = await run_to_exit(path)
        assert code == 1
        assert_one_clear_line(lines, "cannot start", str(sock), "already listening")
        await client.ping()  # the first daemon keeps its socket
        first.send(signal.SIGTERM)
        assert await first.exit_code(timeout=10) == 0


async def test_a_socket_directory_that_cannot_be_created_is_one_line_and_exit_1(
    sock_dir: Path, tmp_path: Path
) -> None:
    # A regular file where the directory should be: refused even to root, unlike a chmod.
    (sock_dir / "run").write_text("not a directory")
    sock = sock_dir / "run" / "cpmgr" / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint="http://127.0.0.1:9",
        credentials=KEYS,
        groups=[group("orders", "cg-a")],
    )
    code, lines = await run_to_exit(write_yaml(tmp_path / "cpmgr.yaml", config))
    assert code == 1
    assert_one_clear_line(lines, "cannot start", str(sock))


async def test_an_http_port_in_use_is_one_line_and_exit_1(sock_dir: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = daemon_config(
            socket_path=sock_dir / "cpmgr.sock",
            endpoint="http://127.0.0.1:9",
            credentials=KEYS,
            groups=[group("orders", "cg-a")],
        )
        config["http"] = {"listen": f"127.0.0.1:{port}"}
        code, lines = await run_to_exit(write_yaml(tmp_path / "cpmgr.yaml", config))
    assert code == 1
    assert_one_clear_line(lines, "cannot start", f"127.0.0.1:{port}")
