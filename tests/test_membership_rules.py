"""Each membership rule and the shutdown (docs/protocol.md, "Membership"), one test named
after it, against daemons in this process and the in-process emulator."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from lifecycle_helpers import LOGSTORE, PROJECT, cursor, remote_key, write_yaml
from lifecycle_helpers import running_daemon as process_daemon
from membership_helpers import (
    CONSUMER_GROUP,
    Consumer,
    assigned,
    consumer,
    emulator,
    join,
    member_config,
    one_member,
    running_daemon,
)

from cpmgr.emulator import EmulatorHandle


class Heartbeats:
    """Every heartbeat body the emulator receives, as (consumer, shards), as it arrives."""

    def __init__(self, emu: EmulatorHandle) -> None:
        self.calls: list[tuple[str, list[int]]] = []
        self._arrived = asyncio.Event()
        original = emu.state.heartbeat

        def recording(*args: Any) -> list[int]:
            self.calls.append((args[3], sorted(args[4])))
            self._arrived.set()
            return original(*args)

        emu.state.heartbeat = recording  # type: ignore[method-assign]

    async def of(self, name: str, count: int) -> list[list[int]]:
        """The bodies of the next `count` heartbeats of `name`."""
        start = len(self.calls)
        while True:
            bodies = [body for who, body in self.calls[start:] if who == name]
            if len(bodies) >= count:
                return bodies[:count]
            self._arrived.clear()
            await asyncio.wait_for(self._arrived.wait(), 10)


async def test_rule_the_heartbeat_body_keeps_a_revoked_shard_until_its_release(
    sock_dir: Path,
) -> None:
    async with emulator() as emu:
        heartbeats = Heartbeats(emu)
        data = member_config(sock_dir / "a.sock", emu.url, membership={"release_timeout": "5s"})
        async with (
            running_daemon(data) as daemon,
            consumer(daemon.socket_path) as first,
            consumer(daemon.socket_path) as second,
        ):
            await join(first, "first")
            await assigned(first, 8)
            await join(second, "second")
            shard = (await first.event("revoked"))["shard"]
            # Three heartbeats later the revoked shard is still reported, so SLS keeps it.
            assert all(shard in body for body in await heartbeats.of("first", 3))
            await first.ask({"op": "release", "group": "orders", "shard": shard})
            assert all(shard not in body for body in await heartbeats.of("first", 2))


async def test_rule_readyz_is_503_while_a_member_has_no_heartbeat_for_half_the_timeout(
    sock_dir: Path,
) -> None:
    async with one_member(sock_dir) as (emu, daemon, peer):
        assert daemon.daemon._ready_for_probes()
        emu.faults.update({"reset_rate": 1.0})
        await peer.event("lost")  # after timeout - interval; half the timeout has passed
        assert not daemon.daemon._ready_for_probes()
        emu.faults.update({"reset_rate": 0.0})
        await assigned(peer, 8)
        assert daemon.daemon._ready_for_probes()


async def test_rule_journal_replay_commits_as_the_journaled_member_before_its_heartbeat(
    sock_dir: Path, tmp_path: Path
) -> None:
    async with emulator(timeout=60) as emu:
        data = member_config(sock_dir / "a.sock", emu.url, shutdown_timeout="1s")
        data["state"] = {"dir": str(tmp_path / "journal"), "fsync": "always"}
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            await assigned(peer, 8)
            commit = {"op": "commit", "group": "orders", "shard": 2, "checkpoint": cursor(99)}
            assert await peer.ask(commit) == {"ok": True}
            emu.faults.update({"reset_rate": 1.0})  # the final flush cannot reach SLS
            assert await daemon.shut_down() == 0  # journaled: left for the next start
        emu.faults.update({"reset_rate": 0.0})
        order: list[str] = []
        heartbeat = emu.state.heartbeat

        def recording_heartbeat(*args: Any) -> list[int]:
            order.append(f"heartbeat {args[3]}")
            return heartbeat(*args)

        emu.state.heartbeat = recording_heartbeat  # type: ignore[method-assign]
        update = emu.state.update_checkpoint

        def recording_update(*args: Any, **kwargs: Any) -> None:
            order.append(f"commit {kwargs['consumer']} {kwargs['force_success']}")
            update(*args, **kwargs)

        emu.state.update_checkpoint = recording_update  # type: ignore[method-assign]
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            await peer.event("assigned")
        assert order[:2] == ["commit pod-a False", "heartbeat pod-a"]
        assert emu.state.history[remote_key(CONSUMER_GROUP, 2)] == [cursor(99)]


async def test_shutdown_refuses_joins_revokes_everything_then_sends_empty_heartbeats(
    sock_dir: Path,
) -> None:
    async with one_member(sock_dir, options={"shutdown_timeout": "4s"}) as (emu, daemon, peer):
        heartbeats = Heartbeats(emu)
        stopping = asyncio.create_task(daemon.shut_down())
        revoked = [await peer.event("revoked") for _ in range(8)]
        # deadline = min(release_timeout 1 s, shutdown_timeout / 2 = 2 s)
        assert {(e["reason"], e["deadline"]) for e in revoked} == {("shutdown", 1.0)}
        async with consumer(daemon.socket_path) as late:
            refused = await late.ask({"op": "join", "group": "orders", "consumer": "late"})
            assert refused["error"]["code"] == "ShuttingDown"
        # Commits and releases of revoked shards still work while draining.
        commit = {"op": "commit", "group": "orders", "shard": 0, "checkpoint": cursor(5)}
        assert await peer.ask(commit) == {"ok": True}
        released = await peer.ask({"op": "release", "group": "orders", "shard": 0})
        assert released == {"ok": True, "checkpoint": cursor(5)}
        assert await stopping == 0
        assert heartbeats.calls[-1] == ("pod-a", [])
        assert emu.state.assignments(PROJECT, LOGSTORE, CONSUMER_GROUP) == {}


async def test_a_member_whose_empty_heartbeat_was_its_leave_is_not_registered_again(
    sock_dir: Path,
) -> None:
    # Between the last release and the final empty heartbeat the daemon flushes, and the
    # heartbeat loop goes on: its `[]`, answered `[]`, was the leave, and a final `[]` after it
    # registered the member again with every shard, until its timeout.
    async with one_member(sock_dir, options={"shutdown_timeout": "4s"}) as (emu, daemon, peer):
        heartbeats = Heartbeats(emu)
        committer = daemon.daemon.committer
        flush = committer.flush

        async def flush_after_a_heartbeat(**options: Any) -> Any:
            await heartbeats.of("pod-a", 1)  # the member goes on heartbeating meanwhile
            return await flush(**options)

        committer.flush = flush_after_a_heartbeat  # type: ignore[method-assign]
        stopping = asyncio.create_task(daemon.shut_down())
        for _ in range(8):
            shard = (await peer.event("revoked"))["shard"]
            released = await peer.ask({"op": "release", "group": "orders", "shard": shard})
            assert released["ok"], released
        assert await stopping == 0
        assert heartbeats.calls[-1] == ("pod-a", [])
        assert emu.state.assignments(PROJECT, LOGSTORE, CONSUMER_GROUP) == {}


async def test_a_shard_released_at_shutdown_is_not_taken_back_from_the_next_heartbeat(
    sock_dir: Path,
) -> None:
    # SLS keeps assigning a shard to a member that still heartbeats: at shutdown the member
    # must not take back what it just handed over, or the drain waits for it to the deadline.
    async with emulator() as emu:
        heartbeats = Heartbeats(emu)
        settings = {"release_timeout": "4s"}  # the release deadline outlasts six heartbeats
        data = member_config(
            sock_dir / "a.sock", emu.url, membership=settings, shutdown_timeout="10s"
        )
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            await assigned(peer, 8)
            stopping = asyncio.create_task(daemon.shut_down())
            [await peer.event("revoked") for _ in range(8)]
            released = await peer.ask({"op": "release", "group": "orders", "shard": 0})
            assert released["ok"] is True
            # Heartbeats go one at a time, and each answer still assigns shard 0: by the sixth
            # after the release, a member that took it back would have read its checkpoint
            # and told the consumer (events come before the answer that follows them).
            bodies = await heartbeats.of("pod-a", 6)
            assert all(0 not in body for body in bodies)
            assert 0 in emu.state.assignments(PROJECT, LOGSTORE, CONSUMER_GROUP)["pod-a"]
            (member,) = (await peer.ask({"op": "members"}))["members"]
            assert [view["shard"] for view in member["shards"]] == list(range(1, 8))
            events = [peer.events.get_nowait() for _ in range(peer.events.qsize())]
            assert [e for e in events if e["event"] == "assigned"] == []
            for shard in range(1, 8):
                await peer.ask({"op": "release", "group": "orders", "shard": shard})
            assert await stopping == 0


async def test_leave_releases_every_shard_and_ends_the_membership(sock_dir: Path) -> None:
    async with one_member(sock_dir) as (emu, _daemon, peer):
        commit = {"op": "commit", "group": "orders", "shard": 4, "checkpoint": cursor(8)}
        assert await peer.ask(commit) == {"ok": True}
        assert await peer.ask({"op": "leave", "group": "orders"}) == {"ok": True, "released": 8}
        assert emu.state.history[remote_key(CONSUMER_GROUP, 4)] == [cursor(8)]
        assert emu.state.assignments(PROJECT, LOGSTORE, CONSUMER_GROUP) == {}
        assert (await peer.ask({"op": "members"}))["members"] == []
        again = await peer.ask(commit)
        assert again["error"]["code"] == "NotMember"


async def test_a_leaving_member_takes_nothing_back_while_its_releases_finish(
    sock_dir: Path,
) -> None:
    # Shard 0's last checkpoint takes a second to reach SLS; the other seven are released at
    # once and heartbeats go on meanwhile, each still assigning them to pod-a.
    async with emulator() as emu:
        heartbeats = Heartbeats(emu)
        data = member_config(sock_dir / "a.sock", emu.url, membership={"timeout": "6s"})
        data["commit"]["request_timeout"] = "2s"
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            await assigned(peer, 8)
            await _leave_while_shard_0_is_slow(emu, heartbeats, peer)


async def _leave_while_shard_0_is_slow(
    emu: EmulatorHandle, heartbeats: Heartbeats, peer: Consumer
) -> None:
    emu.faults.update({"latency_ms": [1000, 1000], "apis": ["UpdateCheckPoint"]})
    commit = {"op": "commit", "group": "orders", "shard": 0, "checkpoint": cursor(8)}
    assert await peer.ask(commit) == {"ok": True}
    leaving = asyncio.create_task(peer.ask({"op": "leave", "group": "orders"}))
    bodies = await heartbeats.of("pod-a", 3)
    assert not leaving.done() and all(body in ([0], []) for body in bodies)
    assert await leaving == {"ok": True, "released": 8}
    events = [peer.events.get_nowait() for _ in range(peer.events.qsize())]
    assert [e for e in events if e["event"] == "assigned"] == []
    assert emu.state.history[remote_key(CONSUMER_GROUP, 0)][-1] == cursor(8)
    assert emu.state.assignments(PROJECT, LOGSTORE, CONSUMER_GROUP) == {}


async def test_membership_metrics_and_status(sock_dir: Path) -> None:
    async with one_member(sock_dir) as (_emu, daemon, peer):
        registry = daemon.daemon.registry
        assert registry.get_sample_value("cpmgr_members", {"group": "orders"}) == 1
        assert registry.get_sample_value("cpmgr_held_shards", {"group": "orders"}) == 8
        ok = {"group": "orders", "code": "OK"}
        assert registry.get_sample_value("cpmgr_heartbeat_requests_total", ok) >= 1
        last = registry.get_sample_value(
            "cpmgr_last_heartbeat_timestamp_seconds", {"group": "orders"}
        )
        assert last is not None and last > 0
        await peer.ask({"op": "release", "group": "orders", "shard": 0})
        handed = {"group": "orders", "reason": "rebalance"}
        assert registry.get_sample_value("cpmgr_shard_handoffs_total", handed) == 1
        status = (await peer.ask({"op": "status"}))["groups"]["orders"]["membership"]
        assert status["members"] == 1 and status["held_shards"] == 7


async def test_create_makes_a_missing_consumer_group_with_its_timeout_and_order(
    sock_dir: Path,
) -> None:
    async with emulator() as emu:
        emu.state.delete_group(PROJECT, LOGSTORE, CONSUMER_GROUP)
        settings = {"create": True, "timeout": "3s", "order": True}
        data = member_config(sock_dir / "a.sock", emu.url, membership=settings)
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            await assigned(peer, 8)
        made = emu.state.group(PROJECT, LOGSTORE, CONSUMER_GROUP)
        assert (made.timeout, made.order) == (3, True)


async def test_rule_not_owner_holds_with_a_journal_too(sock_dir: Path, tmp_path: Path) -> None:
    async with emulator() as emu:
        data = member_config(sock_dir / "a.sock", emu.url)
        data["state"] = {"dir": str(tmp_path / "journal"), "fsync": "never"}
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            await join(peer, "pod-a")
            await assigned(peer, 8)
            await peer.ask({"op": "release", "group": "orders", "shard": 1})
            commit = {"op": "commit", "group": "orders", "checkpoint": cursor(3)}
            assert await peer.ask({**commit, "shard": 0}) == {"ok": True}
            refused = await peer.ask({**commit, "shard": 1})
            assert refused["error"]["code"] == "NotOwner"
            async with consumer(daemon.socket_path) as stranger:
                assert (await stranger.ask({**commit, "shard": 0}))["error"]["code"] == "NotMember"


async def test_rule_if_cpmgr_dies_its_members_see_their_connection_drop(
    sock_dir: Path, tmp_path: Path
) -> None:
    async with emulator() as emu:
        data = member_config(sock_dir / "a.sock", emu.url)
        config_path = write_yaml(tmp_path / "cpmgr.yaml", data)
        async with process_daemon(config_path) as daemon:
            await daemon.wait_for_line(" ready: socket ")
            async with consumer(str(sock_dir / "a.sock")) as peer:
                await join(peer, "pod-a")
                await assigned(peer, 8)
                await daemon.kill()
                # The read loop ends at EOF: the consumer must stop every shard and join again.
                assert peer._pump is not None
                await asyncio.wait_for(peer._pump, 10)
                assert peer.reader.at_eof()


async def test_a_rejoin_waits_for_the_previous_connections_teardown(sock_dir: Path) -> None:
    async with emulator() as emu:
        data = member_config(sock_dir / "a.sock", emu.url)
        async with running_daemon(data) as daemon:
            async with consumer(daemon.socket_path) as first:
                await join(first, "pod-a")
                await assigned(first, 8)
                commit = {"op": "commit", "group": "orders", "shard": 2, "checkpoint": cursor(7)}
                assert await first.ask(commit) == {"ok": True}
            async with consumer(daemon.socket_path) as again:
                await join(again, "pod-a")  # not ConsumerInUse: it waits for the teardown
                back = await assigned(again, 8)
            assert back[2] == cursor(7)  # the teardown committed it before the rejoin
