"""`cpmgr commit|flush|get|status` against a live ingest server: output and exit codes."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from test_ingest import (
    Failure,
    FakeCommitter,
    FlushResult,
    Outcome,
    Remote,
    make_config,
    running,
)

from cpmgr import __version__
from cpmgr.cli import main
from cpmgr.clientcli import CLIENT_COMMANDS, add_client_commands, run_client_command
from cpmgr.config import Config
from cpmgr.store import CheckpointStore, ErrorInfo


def cp(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


@pytest.fixture
def config() -> Iterator[Config]:
    directory = Path(tempfile.mkdtemp(prefix="cp", dir="/tmp"))
    try:
        yield make_config(directory / "s")
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="cpmgr")
    add_client_commands(root.add_subparsers(dest="command"))
    return root


@dataclass
class Result:
    code: int
    out: str
    err: str


async def cli(*argv: str) -> Result:
    args = parser().parse_args(list(argv))
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(args.handler, args, out=out, err=err)
    return Result(code, out.getvalue(), err.getvalue())


def test_the_subcommands_are_registered() -> None:
    assert CLIENT_COMMANDS == ("commit", "flush", "get", "status", "members")
    for argv in (["commit", "g", "1", "MTA="], ["flush"], ["get", "g"], ["status"], ["members"]):
        args = parser().parse_args(argv)
        assert args.handler is run_client_command
        assert args.client_command == argv[0]


@pytest.mark.parametrize(
    "argv",
    [
        ["commit", "orders", "-1", "MTA="],
        ["commit", "orders", "x", "MTA="],
        ["commit", "orders", "1"],
        ["commit", "orders", "1", "MTA=", "--timeout", "0"],
        ["flush", "--timeout", "nan"],
        ["get"],
        ["status", "extra"],
    ],
)
def test_bad_usage_exits_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        parser().parse_args(argv)
    assert info.value.code == 2
    assert capsys.readouterr().err


async def test_commit(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    async with running(config, store) as server:
        result = await cli(
            "commit", "orders", "3", cp(10), "--consumer", "c", "--socket", server.path
        )
        assert result == Result(0, f"accepted: orders shard 3 = {cp(10)}\n", "")
        refused = await cli("commit", "orders", "3", cp(9), "--socket", server.path)
        assert refused.code == 1
        assert refused.out == ""
        assert refused.err.startswith("cpmgr: CheckpointRegression: shard 3:")
        forced = await cli("commit", "orders", "3", cp(9), "--force", "--socket", server.path)
        assert forced.code == 0
    attempt = store.snapshot()[0]
    assert (attempt.checkpoint, attempt.consumer) == (
        cp(9),
        None,
    )  # the consumer goes with its value


async def test_commit_wait(config: Config) -> None:
    committer = FakeCommitter()
    async with running(config, committer=committer) as server:
        result = await cli(
            "commit", "orders", "3", cp(1), "--wait", "--timeout", "2.5", "--socket", server.path
        )
    assert result == Result(0, f"committed: orders shard 3 = {cp(1)}\n", "")
    assert committer.waits[0][3] == 2.5


async def test_json_prints_the_answer(config: Config) -> None:
    async with running(config) as server:
        ok = await cli("commit", "orders", "1", cp(1), "--json", "--socket", server.path)
        refused = await cli("commit", "nope", "1", cp(1), "--json", "--socket", server.path)
    assert (ok.code, json.loads(ok.out)) == (0, {"ok": True})
    assert refused.code == 1
    assert json.loads(refused.out) == {
        "ok": False,
        "error": {"code": "UnknownGroup", "message": "unknown group 'nope'"},
    }


async def test_get_table_and_json(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    store.accept("orders", 1, cp(5))
    store.on_success(store.snapshot()[0], at=1764130000.25)
    store.accept("orders", 1, cp(6))
    store.accept("orders", 12, cp(7))
    store.on_retryable_failure(store.snapshot(shards=[12])[0], ErrorInfo("ServerBusy", "slow", 1.0))
    async with running(config, store) as server:
        table = await cli("get", "orders", "--socket", server.path)
        one = await cli("get", "orders", "12", "--json", "--socket", server.path)
        unseen = await cli("get", "orders", "40", "--socket", server.path)
    assert table.code == 0
    assert table.out.splitlines() == [
        "GROUP   SHARD  PENDING  COMMITTED  COMMITTED_AT              LAST_ERROR        LAG  "
        "LAG_SECONDS  LAG_STATE",
        "orders  1      Ng==     NQ==       2025-11-26T04:06:40.250Z  -                 -    "
        "-            -",
        "orders  12     Nw==     -          -                         ServerBusy: slow  -    "
        "-            -",
    ]
    assert json.loads(one.out)["shards"][0]["last_error"] == {
        "code": "ServerBusy",
        "message": "slow",
        "at": 1.0,
    }
    assert unseen.out.splitlines()[1].split() == ["orders", "40"] + ["-"] * 7


async def test_get_remote(config: Config) -> None:
    committer = FakeCommitter(remote_entries={0: Remote(0, cp(3), 1764130000000000, "c0")})
    async with running(config, committer=committer) as server:
        result = await cli("get", "orders", "--remote", "--socket", server.path)
    header, row = result.out.splitlines()
    assert header.split()[-3:] == ["REMOTE", "REMOTE_UPDATED", "REMOTE_CONSUMER"]
    # SLS's microseconds are shown like every other time: ISO 8601, to the millisecond.
    assert row.split() == ["orders", "0"] + ["-"] * 7 + [cp(3), "2025-11-26T04:06:40.000Z", "c0"]


async def test_status(config: Config) -> None:
    store = CheckpointStore(["orders", "audit"])
    store.accept("orders", 1, cp(1))
    async with running(config, store) as server:
        result = await cli("status", "--socket", server.path)
        raw = await cli("status", "--json", "--socket", server.path)
    lines = result.out.splitlines()
    assert lines[0].startswith(f"cpmgr {__version__}, up ")
    assert lines[1:] == [
        "GROUP   PENDING  TRACKED  FAILURES  LAST_SUCCESS  LAG  LAG_SECONDS  STALLED",
        "orders  1        1        0         -             -    -            -",
        "audit   0        0        0         -             -    -            -",
    ]
    assert json.loads(raw.out)["groups"]["orders"]["pending"] == 1


async def test_flush(config: Config) -> None:
    committer = FakeCommitter(flush_result=FlushResult(3))
    async with running(config, committer=committer) as server:
        ok = await cli("flush", "--socket", server.path)
        committer.flush_result = FlushResult(
            1, (Failure("orders", 4, "ShardNotExist", "gone", True),)
        )
        failed = await cli("flush", "orders", "--timeout", "2", "--socket", server.path)
    assert ok == Result(0, "committed 3 shard(s)\n", "")
    assert failed.code == 1
    assert failed.err.splitlines() == [
        "cpmgr: CommitFailed: 1 shard(s) could not be committed",
        "committed 1 shard(s)",
        "GROUP   SHARD  CODE           DROPPED  MESSAGE",
        "orders  4      ShardNotExist  yes      gone",
    ]
    assert committer.flushes[1] == ("orders", 2.0)


@pytest.mark.parametrize(
    ("dropped", "note"), [(True, "value dropped"), (False, "value still pending")]
)
async def test_wait_failure_says_whether_the_value_was_dropped(
    config: Config, dropped: bool, note: str
) -> None:
    committer = FakeCommitter(outcomes={1: Outcome(False, "ConsumerNotMatch", "held", dropped)})
    async with running(config, committer=committer) as server:
        result = await cli("commit", "orders", "1", cp(1), "--wait", "--socket", server.path)
    assert result.code == 1
    assert result.err == f"cpmgr: ConsumerNotMatch: held ({note})\n"


async def test_wait_without_a_committer_is_refused(config: Config) -> None:
    async with running(config) as server:
        result = await cli("commit", "orders", "1", cp(1), "--wait", "--socket", server.path)
    assert result.code == 1
    assert result.err == "cpmgr: BadRequest: wait is not available\n"


async def test_unreachable_daemon_exits_3(config: Config) -> None:
    result = await cli("status", "--socket", config.socket.path)
    assert result.code == 3
    assert "could not be reached" in result.err
    assert config.socket.path in result.err


async def test_socket_comes_from_the_environment(
    config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with running(config):
        monkeypatch.setenv("CPMGR_SOCKET", config.socket.path)
        result = await cli("status")
    assert result.code == 0


@pytest.mark.parametrize("shard", ["1_0", " +2", "-1", "٣"])
def test_a_shard_argument_must_be_plain_digits(
    shard: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["get", "orders", shard, "--socket", "/nonexistent.sock"])
    assert info.value.code == 2
    assert "not a shard number" in capsys.readouterr().err


def test_commit_timeout_without_wait_is_bad_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["commit", "orders", "1", cp(1), "--timeout", "5", "--socket", "/nonexistent.sock"])
    assert info.value.code == 2
    assert "--timeout only applies with --wait" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["commit", "flush", "get", "members", "join"])
def test_every_positional_argument_has_help(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit):
        main([command, "--help"])
    help_text = capsys.readouterr().out
    positional = help_text.split("positional arguments:")[1].split("options:")[0]
    entries = [line.split() for line in positional.splitlines() if line.strip()]
    assert entries and all(len(words) > 1 for words in entries), help_text
