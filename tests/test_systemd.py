"""The host install: readiness over NOTIFY_SOCKET from a real `cpmgr run`, the unit checked by
systemd-analyze, and deploy/systemd/install.sh building a working virtualenv."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from lifecycle_helpers import (
    LOGSTORE,
    PROJECT,
    REPO,
    DaemonProcess,
    cursor,
    daemon_config,
    group,
    short_socket_dir,
    write_yaml,
)

from cpmgr.client import AsyncCpmgrClient
from cpmgr.emulator import EmulatorHandle, running_emulator
from cpmgr.notify import notify

UNIT = REPO / "deploy" / "systemd" / "cpmgr.service"
INSTALL = REPO / "deploy" / "systemd" / "install.sh"
UNIT_BINARY = "/opt/cpmgr/bin/cpmgr"
NOTIFY_TIMEOUT = 20.0


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    with short_socket_dir() as path:
        yield path


@pytest.fixture
async def emulator() -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:4"], consumer_groups=[f"{PROJECT}/{LOGSTORE}/cg-a"]
    ) as handle:
        yield handle


class Manager:
    """The service manager's end of NOTIFY_SOCKET: a datagram socket the daemon writes to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    async def receive(self) -> dict[str, str]:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 4096), NOTIFY_TIMEOUT)
        pairs = (line.partition("=") for line in data.decode().splitlines())
        return {key: value for key, _, value in pairs}


@pytest.fixture
def manager(sock_dir: Path) -> Iterator[Manager]:
    manager = Manager(sock_dir / "notify")
    try:
        yield manager
    finally:
        manager.sock.close()


def test_notify_sends_one_datagram_and_is_a_no_op_outside_systemd(
    manager: Manager, sock_dir: Path
) -> None:
    assert notify("READY=1", env={}) is False
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(manager.path)}) is True
    assert manager.sock.recv(4096) == b"READY=1"
    # A manager that went away does not stop the daemon.
    assert notify("READY=1", env={"NOTIFY_SOCKET": str(sock_dir / "gone")}) is False


async def test_ready_is_sent_once_the_socket_listens_and_stopping_at_the_drain(
    emulator: EmulatorHandle, manager: Manager, sock_dir: Path, tmp_path: Path
) -> None:
    sock = sock_dir / "cpmgr.sock"
    config = daemon_config(
        socket_path=sock,
        endpoint=emulator.url,
        groups=[group("orders", "cg-a")],
    )
    config["sls"].update({"access_key_id": "id", "access_key_secret": "secret"})
    path = write_yaml(tmp_path / "cpmgr.yaml", config)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALIBABA_CLOUD_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr",
        "run",
        "--config",
        str(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        env={**env, "PYTHONPATH": str(REPO), "NOTIFY_SOCKET": str(manager.path)},
    )
    daemon = DaemonProcess(process)
    try:
        ready = await manager.receive()
        # What READY=1 promises a unit ordered after cpmgr: it can connect and commit now.
        assert ready["READY"] == "1" and str(sock) in ready["STATUS"]
        async with AsyncCpmgrClient(str(sock), reconnect_attempts=0) as client:
            await client.commit("orders", 0, cursor(1))
        daemon.send(signal.SIGTERM)
        stopping = await manager.receive()
        assert stopping["STOPPING"] == "1"
        assert await daemon.exit_code(timeout=NOTIFY_TIMEOUT) == 0
    finally:
        await daemon.kill()
    assert emulator.state.snapshot()["checkpoints"] == {f"{PROJECT}/{LOGSTORE}/cg-a/0": cursor(1)}


def _systemd_analyze() -> str:
    found = shutil.which("systemd-analyze") or (
        "/usr/bin/systemd-analyze" if Path("/usr/bin/systemd-analyze").exists() else None
    )
    if found is None:
        pytest.fail("systemd-analyze is missing: apt-get install systemd", pytrace=False)
    return found


def _verify(unit_text: str, binary: Path, directory: Path) -> subprocess.CompletedProcess[str]:
    """`systemd-analyze verify` of the unit, its ExecStart pointing at `binary`."""
    assert UNIT_BINARY in unit_text
    unit = directory / "cpmgr.service"
    unit.write_text(unit_text.replace(UNIT_BINARY, str(binary)), encoding="utf-8")
    return subprocess.run(
        [_systemd_analyze(), "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_systemd_analyze_verifies_the_unit(tmp_path: Path) -> None:
    cpmgr = Path(sys.executable).parent / "cpmgr"
    assert cpmgr.exists(), "the cpmgr console script of this virtualenv"
    result = _verify(UNIT.read_text(encoding="utf-8"), cpmgr, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout + result.stderr == ""


@pytest.mark.slow
def test_install_script_builds_a_working_virtualenv_from_the_lock(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "cpmgr"
    installed = subprocess.run(
        ["sh", str(INSTALL), "--prefix", str(prefix), "--venv-only"],
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
        env={**os.environ, "PYTHON": sys.executable},
    )
    assert installed.returncode == 0, installed.stderr
    cpmgr = prefix / "bin" / "cpmgr"
    version = subprocess.run([cpmgr, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.startswith("cpmgr ")
    checked = subprocess.run(
        [cpmgr, "check-config", "--config", str(REPO / "config" / "cpmgr.example.yaml")],
        capture_output=True,
        text=True,
        check=False,
        env={
            "PATH": "/usr/bin:/bin",
            "ALIBABA_CLOUD_ACCESS_KEY_ID": "id",
            "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "secret",
        },
    )
    assert checked.returncode == 0, checked.stderr
    # Only what requirements.lock pins (and cpmgr, pip) is in the virtualenv.
    frozen = subprocess.run(
        [prefix / "bin" / "pip", "freeze", "--all"], capture_output=True, text=True, check=True
    ).stdout
    locked = {
        line.split("==")[0].lower()
        for line in (REPO / "requirements.lock").read_text(encoding="utf-8").splitlines()
        if "==" in line and not line.startswith("#")
    }
    names = {re.split(r"==| @ ", line)[0].lower().replace("_", "-") for line in frozen.splitlines()}
    assert names - {"cpmgr", "pip"} <= locked, frozen
    # The unit, pointed at this install, passes systemd's own check.
    result = _verify(UNIT.read_text(encoding="utf-8"), cpmgr, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
