"""Membership when things go wrong (docs/protocol.md, "Membership"): SLS unreachable past the
timeout, a daemon stopped with members, a consumer of the official SDK in the same consumer
group, and a heartbeat that must not wait behind a 10,000-shard commit cycle."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path
from typing import Any

from aliyun.log import LogClient
from lifecycle_helpers import LOGSTORE, PROJECT, cursor, group
from membership_helpers import (
    CONSUMER_GROUP,
    KEY_ID,
    SECRET,
    Consumer,
    assigned,
    consumer,
    emulator,
    emulator_process,
    history,
    join,
    member_config,
    one_member,
    running_daemon,
)


async def test_sls_unreachable_past_the_timeout_loses_the_shards_then_they_come_back(
    sock_dir: Path,
) -> None:
    async with one_member(sock_dir) as (emu, _daemon, peer):
        commit = {"op": "commit", "group": "orders"}
        saved = {**commit, "shard": 0, "checkpoint": cursor(10), "wait": True}
        assert await peer.ask(saved) == {"ok": True}
        assert await peer.ask({**commit, "shard": 1, "checkpoint": cursor(20)}) == {"ok": True}
        emu.faults.update({"reset_rate": 1.0})
        lost = await peer.event("lost")
        assert lost["reason"] == "heartbeat_lost" and lost["shards"] == list(range(8))
        # What was accepted but not saved is dropped, and said so; nothing new is taken.
        shard = (await peer.ask({"op": "get", "group": "orders", "shard": 1}))["shards"][0]
        assert shard["pending"] is None and shard["last_error"]["code"] == "NotOwner"
        refused = await peer.ask({**commit, "shard": 1, "checkpoint": cursor(21)})
        assert refused["error"]["code"] == "NotOwner"
        emu.faults.update({"reset_rate": 0.0})
        back = await assigned(peer, 8)
        assert back[0] == cursor(10)
        assert history(emu, 1) == []


async def test_sigterm_commits_every_final_checkpoint_then_the_shards_move(
    sock_dir: Path,
) -> None:
    async with emulator() as emu:
        first = member_config(sock_dir / "a.sock", emu.url)
        second = member_config(sock_dir / "b.sock", emu.url)
        async with running_daemon(first) as a, running_daemon(second) as b:
            async with consumer(a.socket_path) as m1, consumer(a.socket_path) as m2:
                await join(m1, "m1")
                await assigned(m1, 8)
                for shard in range(8):
                    commit = {"op": "commit", "group": "orders", "shard": shard}
                    assert (await m1.ask({**commit, "checkpoint": cursor(700 + shard)}))["ok"]
                await join(m2, "m2")  # m1 is revoked 4 shards, which it ignores
                async with consumer(b.socket_path) as m3:
                    stopping = asyncio.create_task(a.shut_down())
                    revoked = [await m1.event("revoked") for _ in range(4)]
                    assert {e["reason"] for e in revoked} <= {"rebalance", "shutdown"}
                    await join(m3, "m3")
                    taken = await assigned(m3, 8)
                    assert await stopping == 0
            assert taken == {shard: cursor(700 + shard) for shard in range(8)}
            assert all(history(emu, s) == [cursor(700 + s)] for s in range(8))


async def test_shards_never_overlap_with_a_consumer_of_the_official_sdk(sock_dir: Path) -> None:
    """The SDK consumer heartbeats what it holds and drops at once what the answer leaves out;
    cpmgr's member holds a shard from `assigned` until its release is answered."""
    async with emulator() as emu:
        data = member_config(sock_dir / "a.sock", emu.url)
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            client = LogClient(emu.endpoint, KEY_ID, SECRET)
            client._isRowIp = True
            sdk_periods: list[tuple[int, float, float]] = []
            stop = asyncio.Event()
            sdk = asyncio.create_task(_sdk_consumer(client, sdk_periods, stop))
            try:
                await join(peer, "cpmgr-member")
                periods = await _hold_and_release(peer, seconds=3.0)
            finally:
                stop.set()
                await sdk
                client._session.close()
            assert periods and sdk_periods  # both held shards at some point
            for shard, start, end in periods:
                for other, sdk_start, sdk_end in sdk_periods:
                    if other == shard:
                        assert end <= sdk_start or sdk_end <= start, (shard, start, end)


async def _sdk_consumer(
    client: LogClient, periods: list[tuple[int, float, float]], stop: asyncio.Event
) -> None:
    held: dict[int, float] = {}
    while not stop.is_set():
        sent = time.monotonic()
        answer = await asyncio.to_thread(
            client.heart_beat, PROJECT, LOGSTORE, CONSUMER_GROUP, "sdk-consumer", sorted(held)
        )
        now = time.monotonic()
        shards = set(answer.get_shards())
        for shard in list(held):
            if shard not in shards:
                periods.append((shard, held.pop(shard), sent))
        for shard in shards - held.keys():
            held[shard] = now
        await asyncio.sleep(0.2)  # the SDK consumer's own heartbeat interval
    for shard, start in held.items():
        periods.append((shard, start, float("inf")))


async def _hold_and_release(peer: Consumer, *, seconds: float) -> list[tuple[int, float, float]]:
    """A consumer that releases every revoked shard at once; its held periods."""
    held: dict[int, float] = {}
    periods = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        try:
            event = await peer.event(timeout=left)
        except TimeoutError:
            break
        if event["event"] == "assigned":
            held[event["shard"]] = event["_at"]
        elif event["event"] == "revoked":
            answer = await peer.ask({"op": "release", "group": "orders", "shard": event["shard"]})
            assert answer["ok"], answer
            periods.append((event["shard"], held.pop(event["shard"]), time.monotonic()))
    periods += [(shard, start, float("inf")) for shard, start in held.items()]
    return periods


async def test_a_10000_shard_commit_cycle_does_not_delay_a_heartbeat(sock_dir: Path) -> None:
    """The emulator runs in its own process here, as SLS does: the daemon's loop is the one
    whose work could delay a heartbeat."""
    async with emulator_process(
        f"--logstore={PROJECT}/{LOGSTORE}:8",
        f"--logstore={PROJECT}/wide:10000",
        f"--consumer-group={PROJECT}/{LOGSTORE}/{CONSUMER_GROUP}",
        f"--consumer-group={PROJECT}/wide/wide-group",
    ) as url:
        # A 2 s interval: the 10% allowance (200 ms) is then well above what the scheduling of
        # a busy machine alone adds to a timer (up to ~150 ms measured at load 9 on 2 cores),
        # so what is measured is cpmgr's own.
        settings = {"heartbeat_interval": "2s", "timeout": "10s"}
        data = member_config(sock_dir / "a.sock", url, membership=settings)
        wide = group("wide", "wide-group", consumer="c", force_success=True)
        wide["logstore"] = "wide"
        data["groups"].append(wide)
        data["commit"]["max_in_flight"] = 32
        data["commit"]["request_timeout"] = "2s"  # a loaded machine must not make this flaky
        async with running_daemon(data) as daemon, consumer(daemon.socket_path) as peer:
            client = daemon.daemon.member_clients[0]  # the heartbeats' own
            sent: list[float] = []
            heartbeat = client.heartbeat

            async def recording(*args: Any, **kwargs: Any) -> list[int]:
                sent.append(time.monotonic())
                return await heartbeat(*args, **kwargs)

            client.heartbeat = recording  # type: ignore[method-assign]
            await join(peer, "pod-a")
            await assigned(peer, 8)
            started = time.monotonic()
            cycles = 0
            # 10,000-shard cycles back to back, for at least five heartbeat intervals.
            while time.monotonic() - started < 5 * 2.0:
                cycles += 1
                items = [
                    {"shard": s, "checkpoint": cursor(cycles * 100_000 + s)} for s in range(10_000)
                ]
                batch = {"op": "commit", "group": "wide", "checkpoints": items}
                assert (await peer.ask(batch))["ok"]
                flush = {"op": "flush", "group": "wide", "timeout": 120}
                flushed = await peer.ask(flush, timeout=120)
                assert flushed["ok"], flushed
            finished = time.monotonic()
        during = [t for t in sent if started <= t <= finished]
        gaps = [b - a for a, b in itertools.pairwise(during)]
        print(
            f"{cycles} cycles of 10,000 shards in {finished - started:.2f}s; {len(gaps)} "
            "heartbeat gaps, "
            f"largest {max(gaps) * 1000:.0f} ms (interval 2000 ms)"
        )
        assert len(gaps) >= 3
        assert max(gaps) <= 1.1 * 2.0


async def test_an_ownership_refusal_from_sls_becomes_lost_for_that_shard(sock_dir: Path) -> None:
    async with one_member(sock_dir) as (emu, _daemon, peer):
        # Another member took shard 6 at SLS behind cpmgr's back.
        group = emu.state.group(PROJECT, LOGSTORE, CONSUMER_GROUP)
        group.consumers["someone-else"] = emu.state.monotonic()
        group.owners[6] = "someone-else"
        commit = {"op": "commit", "group": "orders", "shard": 6, "checkpoint": cursor(60)}
        answer = await peer.ask({**commit, "wait": True})
        assert answer["error"]["code"] == "ConsumerNotMatch"
        assert answer["error"]["dropped"] is True
        lost = await peer.event("lost")
        assert (lost["shards"], lost["reason"]) == ([6], "not_owner")
        again = await peer.ask(commit)
        assert again["error"]["code"] == "NotOwner"


async def test_an_expired_member_loses_everything_then_joins_again(sock_dir: Path) -> None:
    async with one_member(sock_dir) as (emu, _daemon, peer):
        group = emu.state.group(PROJECT, LOGSTORE, CONSUMER_GROUP)
        del group.consumers["pod-a"]  # SLS expired it (as after a long pause)
        group.owners.clear()
        commit = {"op": "commit", "group": "orders", "shard": 3, "checkpoint": cursor(30)}
        answer = await peer.ask({**commit, "wait": True})
        assert answer["error"]["dropped"] is True
        lost = await peer.event("lost")
        assert lost["reason"] == "expired"
        assert lost["shards"] == list(range(8))
        back = await assigned(peer, 8)  # an empty heartbeat joined it again
        assert sorted(back) == list(range(8))


async def test_a_member_that_stops_reading_its_events_is_disconnected(sock_dir: Path) -> None:
    """Events are never dropped: a peer that lets more than 1,000 pile up is cut off, and its
    member ends as on any disconnect (its shards go back to SLS)."""
    async with emulator(shards=4000) as emu:
        data = member_config(sock_dir / "a.sock", emu.url)
        async with running_daemon(data) as daemon:
            reader, writer = await asyncio.open_unix_connection(daemon.socket_path)
            name = "deaf-" + "x" * 123  # the longest name: the largest events
            writer.write(b'{"op":"join","group":"orders","consumer":"%s"}\n' % name.encode())
            membership = daemon.daemon.membership
            assert membership is not None
            assert b'"ok":true' in await reader.readline()
            (member,) = membership.members()
            # It reads nothing more while 4,000 `assigned` events (~900 KB) come its way.
            await asyncio.wait_for(member.ended.wait(), 60)
            assert emu.state.assignments(PROJECT, LOGSTORE, CONSUMER_GROUP) == {}
            rest = await reader.read()  # what reached the socket before the cut, then EOF
            assert 0 < rest.count(b'"event":"assigned"') < 4000
            writer.close()
