"""The README's shell blocks and the getting-started path of docs/operations.md, run as written
with bash on a fresh copy of the repository (its tracked files, and the virtualenv that
`make run` sets up), against the emulator they start."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
OPERATIONS = REPO / "docs" / "operations.md"
RUN_LIMIT = 180  # seconds for one block: start, commits and a drain on a loaded machine


def _sh_blocks(text: str) -> list[str]:
    return re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def checkout() -> Iterator[Path]:
    """The repository's tracked files in a short /tmp path (Unix socket paths stay short),
    with `.venv` being this test run's virtualenv, as `make run` would leave it."""
    tracked = subprocess.run(
        ["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True
    ).stdout.decode()
    with tempfile.TemporaryDirectory(prefix="cpr", dir="/tmp") as name:
        root = Path(name)
        for relative in filter(None, tracked.split("\0")):
            source = REPO / relative
            if source.is_file():  # a file deleted but not yet committed is skipped
                (root / relative).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(source, root / relative)
        venv = Path(sys.prefix)
        assert (venv / "bin" / "activate").exists(), "the tests run in a virtualenv"
        (root / ".venv").symlink_to(venv)
        yield root


def _run(script: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`bash -e` of `script` in its own process group, which is ended afterwards whatever
    the script left running."""
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("CPMGR_", "ALIBABA_CLOUD_", "VIRTUAL_ENV", "PYTHON"))
    }
    env |= {"CPMGR_EMULATOR_PORT": str(_free_port()), "CPMGR_HTTP_PORT": str(_free_port())}
    process = subprocess.Popen(
        ["bash", "-e", "-o", "pipefail", "-c", script],
        cwd=cwd,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = process.communicate(timeout=RUN_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, _ = process.communicate()
        pytest.fail(f"the block ran longer than {RUN_LIMIT}s:\n{out}")
    finally:
        with contextlib.suppress(ProcessLookupError):  # unless nothing was left running
            os.killpg(process.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(process.args, process.returncode, out, "")


def test_the_two_commands_are_the_makefile_targets() -> None:
    first = _sh_blocks(README.read_text(encoding="utf-8"))[0]
    commands = [line.split("#")[0].strip() for line in first.splitlines()]
    assert commands == ["make run", "make test"]
    # What they run, without running them (make test would run this suite again; the demo
    # that make run starts is run by tests/test_demo.py).
    plans = {
        target: subprocess.run(
            ["make", "-n", "--always-make", target],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for target in ("run", "test")
    }
    assert "python -m cpmgr.demo --config config/local.yaml" in plans["run"]
    assert "'.[dev]'" not in plans["run"], "make run installs only the runtime dependencies"
    assert "bash .ci/ensure-tools" in plans["test"]
    assert "pytest -q" in plans["test"] and "mypy" in plans["test"]


def test_the_readme_using_it_block_runs_as_written(checkout: Path) -> None:
    blocks = _sh_blocks(README.read_text(encoding="utf-8"))
    assert len(blocks) == 2, "a new shell block in the README needs a run here"
    result = _run(blocks[1], checkout)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert "check-config" not in out  # nothing was refused
    assert "committed: orders shard 3 = MTUyNDE1NTM3OTM3MzkwODQ5Ng==" in out
    lines = out.splitlines()
    (header,) = [line for line in lines if line.startswith("GROUP ") and "REMOTE" in line]
    (row,) = [line for line in lines if line.startswith("orders  3 ")]
    remote = dict(zip(header.split(), row.split(), strict=True))["REMOTE"]
    assert remote == "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="  # what SLS (the emulator) holds
    assert '{"ok":true,"group":"clicks","consumer":"pod-a-1"}' in out
    assert "every accepted checkpoint is committed" in out
    assert "stopped (exit code 0)" in out
    assert "Traceback" not in out


def test_the_getting_started_path_of_the_operations_guide_runs_as_written(
    checkout: Path,
) -> None:
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("## Getting started", 1)[1].split("\n## ", 1)[0]
    (block,) = _sh_blocks(section)
    result = _run(block, checkout)
    assert result.returncode == 0, result.stdout
    out = result.stdout
    assert '{"ready": true}' in out
    assert 'cpmgr_commit_requests_total{code="OK",group="orders"} 4.0' in out
    assert 'cpmgr_pending_shards{group="orders"} 0.0' in out
    assert "journal replayed from .run/state" in out
    assert "every accepted checkpoint is committed" in out
    assert "stopped (exit code 0)" in out
    assert "Traceback" not in out
