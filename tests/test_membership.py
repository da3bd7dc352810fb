"""Consumer-group membership end to end (docs/protocol.md, "Membership"): consumers join
daemons over the socket, the daemons heartbeat the in-process emulator, shards move between
members with their last checkpoints committed first. Short timings: heartbeat 200 ms, timeout
2 s."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from lifecycle_helpers import cursor, remote_key
from membership_helpers import (
    CONSUMER_GROUP,
    Consumer,
    RunningDaemon,
    assigned,
    consumer,
    emulator,
    history,
    join,
    member_config,
    running_daemon,
)

from cpmgr.emulator import EmulatorHandle


@contextlib.asynccontextmanager
async def one_daemon(
    sock_dir: Path, **membership: object
) -> AsyncIterator[tuple[EmulatorHandle, RunningDaemon]]:
    async with emulator() as emu:
        data = member_config(sock_dir / "a.sock", emu.url, membership=membership)
        async with running_daemon(data) as daemon:
            yield emu, daemon


async def test_a_member_joins_and_is_assigned_every_shard_with_where_to_start(
    sock_dir: Path,
) -> None:
    async with one_daemon(sock_dir) as (_emu, daemon), consumer(daemon.socket_path) as peer:
        answer = await peer.ask({"op": "join", "group": "orders", "consumer": "pod-a-1"})
        assert answer == {"ok": True, "group": "orders", "consumer": "pod-a-1"}
        shards = await assigned(peer, 8)
        assert sorted(shards) == list(range(8))
        assert all(shards.values())  # the begin cursor of each shard
        held = await peer.ask({"op": "assignment", "group": "orders"})
        assert held["consumer"] == "pod-a-1"
        assert held["shards"] == [{"shard": s, "state": "held"} for s in range(8)]


async def test_commits_go_out_as_the_member_and_others_are_refused(sock_dir: Path) -> None:
    async with one_daemon(sock_dir) as (emu, daemon), consumer(daemon.socket_path) as peer:
        await peer.ask({"op": "join", "group": "orders", "consumer": "pod-a-1"})
        await assigned(peer, 8)
        commit = {"op": "commit", "group": "orders", "shard": 3, "checkpoint": cursor(150)}
        assert await peer.ask({**commit, "wait": True}) == {"ok": True}
        stored = emu.state.group(
            "lifecycle-project", "lifecycle-logstore", CONSUMER_GROUP
        ).checkpoints[3]
        assert (stored.checkpoint, stored.consumer) == (cursor(150), "pod-a-1")
        async with consumer(daemon.socket_path) as stranger:
            refused = await stranger.ask(commit)
            assert refused["error"]["code"] == "NotMember"
            named = await stranger.ask({**commit, "consumer": "pod-b"})
            assert named["error"]["code"] == "NotMember"
            as_member = await stranger.ask({**commit, "consumer": "pod-a-1"})
            assert as_member == {"ok": True}
        wrong = await peer.ask({**commit, "consumer": "pod-b"})
        assert wrong["error"]["code"] == "BadRequest"
        items = [{"shard": s, "checkpoint": cursor(200 + s)} for s in (1, 2)]
        batch = {"op": "commit", "group": "orders", "checkpoints": items, "wait": True}
        assert await peer.ask(batch) == {"ok": True, "accepted": 2}
        group = emu.state.group("lifecycle-project", "lifecycle-logstore", CONSUMER_GROUP)
        assert {group.checkpoints[s].consumer for s in (1, 2)} == {"pod-a-1"}
        assert emu.state.history[remote_key(CONSUMER_GROUP, 3)] == [cursor(150)]


async def test_release_commits_the_last_checkpoint_then_refuses_later_commits(
    sock_dir: Path,
) -> None:
    async with one_daemon(sock_dir) as (emu, daemon), consumer(daemon.socket_path) as peer:
        await peer.ask({"op": "join", "group": "orders", "consumer": "pod-a-1"})
        await assigned(peer, 8)
        peer.send({"op": "commit", "group": "orders", "shard": 5, "checkpoint": cursor(77)})
        peer.send({"op": "release", "group": "orders", "shard": 5})
        peer.send({"op": "commit", "group": "orders", "shard": 5, "checkpoint": cursor(78)})
        answers = [await asyncio.wait_for(peer.answers.get(), 10) for _ in range(3)]
        assert [a["ok"] for a in answers] == [True, True, False]
        assert answers[1]["checkpoint"] == cursor(77)
        assert answers[2]["error"]["code"] == "NotOwner"
        assert emu.state.history[remote_key(CONSUMER_GROUP, 5)] == [cursor(77)]


async def test_membership_errors(sock_dir: Path) -> None:
    async with one_daemon(sock_dir) as (_emu, daemon), consumer(daemon.socket_path) as peer:
        join = {"op": "join", "group": "orders", "consumer": "pod-a-1"}
        assert (await peer.ask(join))["ok"]
        assert (await peer.ask(join))["error"]["code"] == "BadRequest"
        async with consumer(daemon.socket_path) as other:
            assert (await other.ask(join))["error"]["code"] == "ConsumerInUse"
            unknown = await other.ask({**join, "group": "nope"})
            assert unknown["error"]["code"] == "UnknownGroup"
            release = await other.ask({"op": "release", "group": "orders", "shard": 1})
            assert release["error"]["code"] == "NotMember"
        members = await peer.ask({"op": "members"})
        assert [(m["group"], m["consumer"]) for m in members["members"]] == [("orders", "pod-a-1")]


@contextlib.asynccontextmanager
async def two_daemons(
    sock_dir: Path, **membership: object
) -> AsyncIterator[tuple[EmulatorHandle, RunningDaemon, RunningDaemon]]:
    async with emulator() as emu:
        first = member_config(sock_dir / "a.sock", emu.url, membership=membership)
        second = member_config(sock_dir / "b.sock", emu.url, membership=membership)
        async with running_daemon(first) as a, running_daemon(second) as b:
            yield emu, a, b


def owners(emu: EmulatorHandle) -> dict[str, list[int]]:
    return emu.state.assignments("lifecycle-project", "lifecycle-logstore", CONSUMER_GROUP)


async def settle_into(peers: list[Consumer], total: int) -> None:
    """Until the peers' held shards (from their events) cover `total` shards exactly once and
    their counts are at most one apart (revokes are answered with a release at once)."""

    def settled() -> bool:
        held = [s for p in peers for s in p.held]
        counts = [len(p.held) for p in peers]
        return sorted(held) == list(range(total)) and max(counts) - min(counts) <= 1

    while not settled():
        waits = [asyncio.ensure_future(p.events.get()) for p in peers]
        done, pending = await asyncio.wait(waits, timeout=10, return_when=asyncio.FIRST_COMPLETED)
        for wait in pending:
            wait.cancel()
        if not done:
            raise AssertionError(f"not settled: {[sorted(p.held) for p in peers]}")
        for peer, wait in zip(peers, waits, strict=True):
            if wait in done:
                await answer_revokes(peer, wait.result())


async def answer_revokes(peer: Consumer, event: dict[str, object]) -> None:
    """A well-behaved consumer: on `revoked`, release the shard at once."""
    if event["event"] == "revoked":
        shard = event["shard"]
        assert isinstance(shard, int)
        answer = await peer.ask({"op": "release", "group": "orders", "shard": shard})
        assert answer["ok"], answer
        peer.held.discard(shard)


async def test_three_members_on_two_daemons_share_eight_shards_at_most_one_apart(
    sock_dir: Path,
) -> None:
    async with (
        two_daemons(sock_dir) as (emu, a, b),
        consumer(a.socket_path) as p1,
        consumer(a.socket_path) as p2,
        consumer(b.socket_path) as p3,
    ):
        peers = [p1, p2, p3]
        for index, peer in enumerate(peers):
            join = {"op": "join", "group": "orders", "consumer": f"c{index}"}
            assert (await peer.ask(join))["ok"]
        await settle_into(peers, 8)
        counts = sorted(len(p.held) for p in peers)
        assert counts[-1] - counts[0] <= 1, counts
        assert sorted(s for shards in owners(emu).values() for s in shards) == list(range(8))


async def test_a_closed_connection_hands_its_shards_over_within_one_heartbeat(
    sock_dir: Path,
) -> None:
    async with two_daemons(sock_dir) as (emu, a, b), consumer(b.socket_path) as stays:
        async with consumer(a.socket_path) as leaves:
            await join(leaves, "leaves")
            await assigned(leaves, 8)
            for shard in range(8):
                leaves.send(
                    {"op": "commit", "group": "orders", "shard": shard, "checkpoint": cursor(500)}
                )
            await join(stays, "stays")
            # The answers to the commits came back: they are accepted, not yet committed.
            for _ in range(8):
                assert (await asyncio.wait_for(leaves.answers.get(), 10))["ok"]
            closed_at = asyncio.get_running_loop().time()
        taken = await assigned(stays, 8)
        took = asyncio.get_running_loop().time() - closed_at
        # One heartbeat interval (200 ms) plus one request, not the group's 2 s timeout.
        assert took < 1.0, took
        assert taken == {shard: cursor(500) for shard in range(8)}
        for shard in range(8):
            commit = {"op": "commit", "group": "orders", "shard": shard, "checkpoint": cursor(600)}
            assert await stays.ask(commit) == {"ok": True}
        assert (await stays.ask({"op": "flush", "group": "orders"}))["ok"]
        histories = {shard: history(emu, shard) for shard in range(8)}
        assert histories == {shard: [cursor(500), cursor(600)] for shard in range(8)}


async def test_a_new_member_gets_each_revoked_shard_with_its_final_checkpoint(
    sock_dir: Path,
) -> None:
    async with (
        two_daemons(sock_dir) as (emu, a, b),
        consumer(a.socket_path) as first,
        consumer(b.socket_path) as second,
    ):
        if True:
            await join(first, "first")
            await assigned(first, 8)
            await join(second, "second")
            finals: dict[int, str] = {}
            handed: dict[int, float] = {}
            while len(handed) < 4:
                event = await first.event("revoked")
                shard = event["shard"]
                assert event["reason"] == "rebalance" and event["deadline"] == 1.0
                finals[shard] = cursor(1000 + shard)
                commit = {"op": "commit", "group": "orders", "shard": shard}
                assert await first.ask({**commit, "checkpoint": finals[shard]}) == {"ok": True}
                answer = await first.ask({"op": "release", "group": "orders", "shard": shard})
                assert answer == {"ok": True, "checkpoint": finals[shard]}
                handed[shard] = asyncio.get_running_loop().time()
            got = {}
            while len(got) < 4:
                event = await second.event("assigned")
                got[event["shard"]] = event
                assert event["_at"] >= handed[event["shard"]]
            assert {s: e["checkpoint"] for s, e in got.items()} == finals
            assert all(history(emu, s) == [finals[s]] for s in finals)


async def test_a_member_that_ignores_revoked_is_released_at_the_deadline(
    sock_dir: Path,
) -> None:
    async with (
        two_daemons(sock_dir) as (emu, a, b),
        consumer(a.socket_path) as stubborn,
        consumer(b.socket_path) as newcomer,
    ):
        if True:
            await join(stubborn, "stubborn")
            await assigned(stubborn, 8)
            await join(newcomer, "newcomer")
            revoked = await stubborn.event("revoked")
            shard = revoked["shard"]
            commit = {"op": "commit", "group": "orders", "shard": shard}
            # Still its shard until the deadline: the value is accepted and committed then.
            assert await stubborn.ask({**commit, "checkpoint": cursor(42)}) == {"ok": True}
            event = await newcomer.event("assigned")
            assert event["_at"] - revoked["_at"] >= 1.0  # release_timeout: 1 s
            late = await stubborn.ask({**commit, "shard": event["shard"], "checkpoint": cursor(43)})
            assert late["error"]["code"] == "NotOwner"
            assert cursor(42) in [history(emu, s)[-1] for s in range(8) if history(emu, s)]
