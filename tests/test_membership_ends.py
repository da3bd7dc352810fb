"""Shards that end (CONTRACT section 7, `ended`): a member reads a read-only shard to its end,
cpmgr sends `ended` once SLS has the end cursor, and with `order` only then are the children of
the split or merge assigned; a read-only shard with nothing left is finished by cpmgr itself.
A real daemon in this process against the in-process emulator; the emulator's `shard_events`
prove what happened before what."""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path

from lifecycle_helpers import LOGSTORE, PROJECT, remote_key
from membership_helpers import (
    CONSUMER_GROUP,
    KEY_ID,
    SECRET,
    WAIT,
    Consumer,
    RunningDaemon,
    assigned,
    consumer,
    emulator,
    join,
    member_config,
    running_daemon,
)

from cpmgr.client import Assigned, AsyncCpmgrClient, Ended
from cpmgr.emulator import EmulatorHandle
from cpmgr.emulator.shards import HASH_SPACE, Shard, decode_cursor, encode_cursor
from cpmgr.sls.client import SLSClient
from cpmgr.sls.signer import Credentials

HALF = f"{HASH_SPACE // 2:032x}"
STEP = 2  # log groups the consumer reads per batch (fewer than arrive: it falls behind)
WRITE = 3  # log groups written to every read-write shard per batch read


@contextlib.asynccontextmanager
async def ordered_member(
    sock_dir: Path, shards: int
) -> AsyncIterator[tuple[EmulatorHandle, RunningDaemon, Consumer]]:
    """An emulator whose consumer group has `order`, a daemon, and `pod-a` joined (not waited
    for: the test says what it expects first)."""
    async with emulator(shards) as emu:
        emu.state.group(PROJECT, LOGSTORE, CONSUMER_GROUP).order = True
        data = member_config(sock_dir / "a.sock", emu.url)
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            yield emu, daemon, peer


@contextlib.asynccontextmanager
async def sls(emu: EmulatorHandle) -> AsyncIterator[SLSClient]:
    """The daemon's SLS client, for SplitShard and MergeShards over HTTP."""
    async with SLSClient(endpoint=emu.url, credentials=lambda: Credentials(KEY_ID, SECRET)) as c:
        yield c


def shard_of(emu: EmulatorHandle, number: int) -> Shard:
    return emu.state.logstore(PROJECT, LOGSTORE).shards[number]


def write_everywhere(emu: EmulatorHandle) -> None:
    """Data keeps arriving: WRITE log groups on every read-write shard."""
    for shard in emu.state.logstore(PROJECT, LOGSTORE).shards.values():
        if not shard.read_only:
            shard.append(WRITE, int(time.time()))


async def read_and_commit(peer: Consumer, emu: EmulatorHandle, positions: dict[int, int]) -> None:
    """One batch from each shard the consumer reads, each committed as read (data arriving
    meanwhile); a shard is done once it is read-only and read to its end."""
    write_everywhere(emu)
    for number, position in list(positions.items()):
        shard = shard_of(emu, number)
        following = min(position + STEP, shard.end)
        if following == position:
            if shard.read_only:
                del positions[number]
            continue
        answer = await peer.ask(
            {
                "op": "commit",
                "group": "orders",
                "shard": number,
                "checkpoint": encode_cursor(following),
            }
        )
        assert answer == {"ok": True}, answer
        positions[number] = following


def events(emu: EmulatorHandle) -> list[tuple[str, int]]:
    """(event, shard) of every split, merge, finished shard and assignment, in order."""
    return [(str(e["event"]), int(str(e["shard"]))) for e in emu.state.shard_events]


def socket_events(peer: Consumer) -> list[tuple[str, int]]:
    return [(m["event"], m["shard"]) for m in peer.log if m.get("event") in ("assigned", "ended")]


def committed_by(emu: EmulatorHandle, shard: int) -> tuple[str, str]:
    stored = emu.state.group(PROJECT, LOGSTORE, CONSUMER_GROUP).checkpoints[shard]
    return stored.checkpoint, stored.consumer


async def test_a_split_under_load_ends_the_parent_before_its_children_are_assigned(
    sock_dir: Path,
) -> None:
    async with ordered_member(sock_dir, 1) as (emu, _daemon, peer), sls(emu) as client:
        positions = {s: decode_cursor(c) for s, c in (await assigned(peer, 1)).items()}
        for _ in range(5):
            await read_and_commit(peer, emu, positions)
        split = await client.split_shard(PROJECT, LOGSTORE, 0, key=HALF)
        assert [(s.shard, s.read_only) for s in split] == [(0, True), (1, False), (2, False)]
        end = shard_of(emu, 0).end
        assert positions[0] < end  # the parent still has data to read
        while positions:
            await read_and_commit(peer, emu, positions)
        assert (await peer.event("ended"))["shard"] == 0
        children = await assigned(peer, 2)
        assert sorted(children) == [1, 2]
        seen = socket_events(peer)
        assert seen[:2] == [("assigned", 0), ("ended", 0)]
        assert sorted(seen[2:]) == [("assigned", 1), ("assigned", 2)]
        # SLS finished the parent at its end, committed by pod-a, before anyone got a child.
        assert events(emu)[:3] == [("assigned", 0), ("split", 0), ("finished", 0)]
        assert sorted(events(emu)[3:]) == [("assigned", 1), ("assigned", 2)]
        assert committed_by(emu, 0) == (encode_cursor(end), "pod-a")
        history = [decode_cursor(c) for c in emu.state.history[remote_key(CONSUMER_GROUP, 0)]]
        assert history == sorted(set(history)) and history[-1] == end
        late = {"op": "commit", "group": "orders", "shard": 0, "checkpoint": encode_cursor(end)}
        assert (await peer.ask(late))["error"]["code"] == "NotOwner"
        assert children == {s: shard_of(emu, s).begin_cursor for s in (1, 2)}


async def test_a_merge_under_load_ends_both_parents_before_the_child_is_assigned(
    sock_dir: Path,
) -> None:
    async with ordered_member(sock_dir, 2) as (emu, _daemon, peer), sls(emu) as client:
        positions = {s: decode_cursor(c) for s, c in (await assigned(peer, 2)).items()}
        for _ in range(5):
            await read_and_commit(peer, emu, positions)
        merged = await client.merge_shards(PROJECT, LOGSTORE, 0)
        assert [(s.shard, s.read_only) for s in merged] == [(2, False), (0, True), (1, True)]
        ends = {s: shard_of(emu, s).end for s in (0, 1)}
        while positions:
            await read_and_commit(peer, emu, positions)
        assert await assigned(peer, 1) == {2: shard_of(emu, 2).begin_cursor}
        seen = socket_events(peer)
        assert sorted(seen[:2]) == [("assigned", 0), ("assigned", 1)]
        assert sorted(seen[2:4]) == [("ended", 0), ("ended", 1)]
        assert seen[4:] == [("assigned", 2)]
        happened = events(emu)
        assert happened.index(("assigned", 2)) > max(
            happened.index(("finished", 0)), happened.index(("finished", 1))
        )
        assert happened.count(("assigned", 2)) == 1
        for shard, end in ends.items():
            assert committed_by(emu, shard) == (encode_cursor(end), "pod-a")


async def test_an_empty_read_only_shard_is_finished_without_any_consumer_commit(
    sock_dir: Path,
) -> None:
    async with emulator(1) as emu:
        emu.state.group(PROJECT, LOGSTORE, CONSUMER_GROUP).order = True
        emu.state.split_shard(PROJECT, LOGSTORE, 0, key=HALF, count=None)  # before anyone reads
        end = shard_of(emu, 0).end_cursor
        data = member_config(sock_dir / "a.sock", emu.url)
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            assert (await peer.event())["event"] == "ended"  # never `assigned`: nothing to read
            assert sorted(await assigned(peer, 2)) == [1, 2]
            # The consumer sent nothing but its join: the end was committed by cpmgr, as pod-a.
            assert [m["event"] for m in peer.log if m.get("shard") == 0] == ["ended"]
            handoffs = daemon.daemon.registry.get_sample_value(
                "cpmgr_shard_handoffs_total", {"group": "orders", "reason": "ended"}
            )
            assert handoffs == 1
        assert emu.state.history[remote_key(CONSUMER_GROUP, 0)] == [end]
        assert committed_by(emu, 0) == (end, "pod-a")
        assert events(emu)[:3] == [("split", 0), ("assigned", 0), ("finished", 0)]


async def test_a_held_shard_split_with_nothing_left_is_committed_again_and_ended(
    sock_dir: Path,
) -> None:
    async with ordered_member(sock_dir, 1) as (emu, _daemon, peer), sls(emu) as client:
        positions = {s: decode_cursor(c) for s, c in (await assigned(peer, 1)).items()}
        shard_of(emu, 0).append(5, int(time.time()))
        end = shard_of(emu, 0).end_cursor
        commit = {"op": "commit", "group": "orders", "shard": 0, "checkpoint": end, "wait": True}
        assert await peer.ask(commit) == {"ok": True}  # caught up while the shard is read-write
        assert positions[0] < decode_cursor(end)
        await client.split_shard(PROJECT, LOGSTORE, 0, key=HALF)  # the end stays where it is
        # SLS finishes a read-only shard only on a commit landing at its end after the split:
        # cpmgr sends the same value again itself, though it is what SLS already has.
        assert (await peer.event("ended"))["shard"] == 0
        assert sorted(await assigned(peer, 2)) == [1, 2]
        assert emu.state.history[remote_key(CONSUMER_GROUP, 0)] == [end, end]
        assert events(emu)[:3] == [("assigned", 0), ("split", 0), ("finished", 0)]


async def test_the_python_client_surfaces_ended_and_forgets_the_shard(sock_dir: Path) -> None:
    async with emulator(1) as emu, sls(emu) as client:
        emu.state.group(PROJECT, LOGSTORE, CONSUMER_GROUP).order = True
        data = member_config(sock_dir / "a.sock", emu.url)
        async with (
            running_daemon(data) as daemon,
            AsyncCpmgrClient(daemon.socket_path) as cpmgr,
            cpmgr.join("orders", "pod-py") as member,
        ):
            first = await member.next_event(timeout=WAIT)
            assert isinstance(first, Assigned) and first.shard == 0
            shard_of(emu, 0).append(4, int(time.time()))
            await client.split_shard(PROJECT, LOGSTORE, 0, key=HALF)
            await member.commit(0, shard_of(emu, 0).end_cursor)  # read to its end
            ended = await member.next_event(timeout=WAIT)
            assert ended == Ended(group="orders", consumer="pod-py", shard=0, raw={})
            assert 0 not in member.shards
            children = [await member.next_event(timeout=WAIT) for _ in range(2)]
            assert sorted(e.shard for e in children if isinstance(e, Assigned)) == [1, 2]
            assert member.shards == {1: "held", 2: "held"}
