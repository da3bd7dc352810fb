"""`make run` (python -m cpmgr.demo on config/local.yaml), run for real and read as a user
would: it exits 0 and its printed story holds up. Two consumers share the membership group's
shards, consumer-b's daemon stops half-way, consumer-a takes its shards over at their last
checkpoints, and no shard is ever held by both."""

from __future__ import annotations

import asyncio
import re
import sys
from collections import defaultdict

import pytest
from lifecycle_helpers import REPO

from cpmgr.demo import SHARDS_PER_LOGSTORE
from cpmgr.demo_members import Board, Holding, check_holdings

DURATION = 8.0
LIMIT = 90.0  # generous: startup, two shutdowns and a loaded machine
EVENT = re.compile(
    r"^\d\d:\d\d:\d\d members: (consumer-[ab]) (assigned|released \((\w+)\)) shard (\d+) "
    r"at record (\d+)$"
)
STOPPING = "members: stopping consumer-b's daemon"
LAG = re.compile(r"\borders (\d+) log groups / (\d+) s")


async def run_demo() -> tuple[int, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cpmgr.demo",
        "--config",
        "config/local.yaml",
        "--duration",
        str(DURATION),
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(process.communicate(), LIMIT)
    except TimeoutError:
        process.kill()
        out, _ = await process.communicate()
        pytest.fail(f"the demo ran longer than {LIMIT}s:\n{out.decode()}")
    assert process.returncode is not None
    return process.returncode, out.decode()


def shard_stories(out: str) -> dict[int, list[tuple[str, str, str, int]]]:
    """Per shard: (consumer, action, reason, record) in the order printed."""
    stories: dict[int, list[tuple[str, str, str, int]]] = defaultdict(list)
    for line in out.splitlines():
        match = EVENT.match(line)
        if match:
            consumer, action, reason, shard, record = match.groups()
            kind = "assigned" if action == "assigned" else "released"
            stories[int(shard)].append((consumer, kind, reason or "", int(record)))
    return stories


async def test_make_run_shares_the_shards_and_hands_them_over() -> None:
    code, out = await run_demo()
    assert code == 0, out
    assert "PROBLEM" not in out and "--- the last lines" not in out, out
    # The checkpoint part, as before: every shard's last checkpoint reached the emulator.
    assert "all 8 shards committed at their last checkpoint" in out, out
    assert "consumer-a took over consumer-b's shards" in out, out
    assert "consumer-b's daemon stopped (exit code 0)" in out, out
    assert "\ndaemon stopped (exit code 0)" in out, out
    assert STOPPING in out, out
    # It says what it does to SLS, and how to look at the daemon while it runs.
    assert "answers 5% of requests with 500 InternalServerError" in out, out
    assert re.search(r"cpmgr status --socket /\S+/cpmgr\.sock\n", out), out
    # The consumer reads slower than the emulator writes, then catches up: the lag of orders
    # (log groups, seconds) grows to seconds, then falls back to fewer seconds and less than
    # half the log groups. (Not necessarily on the last line: with the emulator's 5% errors a
    # shard whose read failed keeps its previous, larger figure for an interval. How far it
    # falls by the end depends on the CPU the reader got: on a loaded machine it ended at 2 s
    # after a worst of 4 s.)
    lag = [(int(groups), int(seconds)) for groups, seconds in LAG.findall(out)]
    assert lag, out
    worst = max(range(len(lag)), key=lambda index: lag[index][1])
    assert lag[worst][1] >= 2, out
    caught_up = [figures for figures in lag[worst:] if figures[1] < lag[worst][1]]
    assert caught_up and min(caught_up)[0] < lag[worst][0] / 2, out
    assert "lagging)" in out, out

    stories = shard_stories(out)
    assert sorted(stories) == list(range(SHARDS_PER_LOGSTORE)), out
    b_shards = set()
    b_reasons = set()
    for shard, story in stories.items():
        # Held by one consumer at a time: assigned, released, assigned, ... released.
        kinds = [kind for _, kind, _, _ in story]
        assert kinds == ["assigned", "released"] * (len(story) // 2), (shard, story)
        for (holder, _, _, _), (releaser, _, _, _) in zip(story[::2], story[1::2], strict=True):
            assert holder == releaser, (shard, story)
        # Each new owner starts at the record its predecessor released the shard at.
        for released, assigned in zip(story[1::2], story[2::2], strict=False):
            assert assigned[3] == released[3], (shard, story)
        for consumer, kind, reason, _ in story:
            if consumer == "consumer-b":
                b_shards.add(shard)
                if kind == "released":
                    b_reasons.add(reason)
        # The end: consumer-a held it and handed it back when it left.
        assert story[-1][:3] == ("consumer-a", "released", "leave"), (shard, story)
    assert b_shards, f"consumer-b never held a shard:\n{out}"
    # consumer-b handed its shards back when its daemon stopped (and maybe at a rebalance).
    assert "shutdown" in b_reasons and b_reasons <= {"shutdown", "rebalance"}, out
    # They shared: at some point each held shards (whichever joined SLS first got all four).
    both = re.compile(r"members: holds  consumer-a \[[\d ]+\]  consumer-b \[[\d ]+\]$", re.M)
    assert both.search(out), f"the consumers never shared the shards:\n{out}"


def holding(consumer: str, shard: int, start: float, end: float, first: int, last: int) -> Holding:
    return Holding(consumer, shard, start, first, last, end=end, how="released (rebalance)")


def test_the_demo_check_catches_an_overlap_a_gap_and_a_missed_commit() -> None:
    board = Board(shards=2)
    board.holdings = [
        holding("consumer-a", 0, 1.0, 2.5, 100, 150),
        holding("consumer-b", 0, 2.0, 3.0, 150, 170),  # starts before consumer-a released
        holding("consumer-a", 1, 1.0, 2.0, 100, 120),
        holding("consumer-b", 1, 2.1, 3.0, 110, 130),  # starts behind the released checkpoint
    ]
    problems = check_holdings(board, {0: 170, 1: 125})  # shard 1's last commit never arrived
    assert problems == [
        "shard 0 held by consumer-a and consumer-b at once",
        "shard 1: consumer-b started at 110, not at consumer-a's last checkpoint 120",
        "shard 1: the emulator has 125, the last checkpoint was 130",
    ]
    board.holdings[1].start = 2.6
    board.holdings[3].first = 120
    assert check_holdings(board, {0: 170, 1: 130}) == []
