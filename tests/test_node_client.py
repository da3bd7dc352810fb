"""The Node.js client (clients/node) against a real `cpmgr run` daemon and the emulator: this
test starts both and runs `node --test`, so `make test` runs the Node tests too."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from pathlib import Path

import pytest
from lifecycle_helpers import (
    LOGSTORE,
    PROJECT,
    REPO,
    daemon_config,
    group,
    running_daemon,
    write_yaml,
)

from cpmgr.emulator import GroupSpec, running_emulator

NODE_DIR = REPO / "clients" / "node"
NODE_TIMEOUT = 300.0
SHARDS = 8
MEMBERS = "node-members"  # the SLS consumer group of the membership group "members"
MEMBERSHIP = {"heartbeat_interval": "200ms", "timeout": "2s", "release_timeout": "2s"}


def node_binary() -> str:
    """`node`, 20 or newer: every machine that runs the suite has it, so its absence fails."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("`node` is not on PATH: the Node client's tests need Node.js 20 or newer")
    return node


async def run_node_tests(node: str, env: dict[str, str]) -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        node,
        "--test",
        "--test-reporter=tap",
        "test/",
        cwd=NODE_DIR,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), NODE_TIMEOUT)
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        pytest.fail(f"node --test ran longer than {NODE_TIMEOUT}s:\n{out.decode()}")
    assert process.returncode is not None
    return process.returncode, out.decode()


async def test_node_is_20_or_newer() -> None:
    process = await asyncio.create_subprocess_exec(
        node_binary(), "--version", stdout=asyncio.subprocess.PIPE
    )
    out, _ = await process.communicate()
    match = re.fullmatch(r"v(\d+)\..*", out.decode().strip())
    assert match is not None and int(match.group(1)) >= 20, out


async def test_the_node_client_against_a_real_daemon(sock_dir: Path, tmp_path: Path) -> None:
    node = node_binary()
    groups = {"orders": "node-orders", "audit": "node-audit"}
    async with running_emulator(
        logstores=[f"{PROJECT}/{LOGSTORE}:{SHARDS}"],
        consumer_groups=[
            *(f"{PROJECT}/{LOGSTORE}/{cg}" for cg in groups.values()),
            GroupSpec(PROJECT, LOGSTORE, MEMBERS, 2),
        ],
    ) as emulator:
        socket_path = sock_dir / "cpmgr.sock"
        config = daemon_config(
            socket_path=socket_path,
            endpoint=emulator.url,
            credentials={"access_key_id": "id", "access_key_secret": "secret"},
            groups=[
                *(group(name, cg, consumer="node-1") for name, cg in groups.items()),
                group("members", MEMBERS, membership=MEMBERSHIP),
            ],
        )
        config["commit"]["request_timeout"] = "300ms"  # heartbeat_interval + it < timeout / 2
        async with running_daemon(write_yaml(tmp_path / "cpmgr.yaml", config)):
            env = {
                "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
                "CPMGR_SOCKET": str(socket_path),
                "CPMGR_TEST_EMULATOR": emulator.url,
                "CPMGR_TEST_REMOTE": f"{PROJECT}/{LOGSTORE}/{groups['orders']}",
                "CPMGR_TEST_MEMBER_REMOTE": f"{PROJECT}/{LOGSTORE}/{MEMBERS}",
                "CPMGR_TEST_SHARDS": str(SHARDS),
            }
            code, out = await run_node_tests(node, env)
    assert code == 0, out
    # The count guards against a runner that finds no test file and passes.
    assert re.search(r"^# pass ([1-9]\d*)$", out, re.MULTILINE), out
    assert re.search(r"^# fail 0$", out, re.MULTILINE), out
    assert re.search(r"^# skipped 0$", out, re.MULTILINE), out
