"""Consumer-group membership (docs/protocol.md "Membership"): cpmgr is the SLS consumer-group
member of every consumer that joins over the socket. One heartbeat loop per member; each
heartbeat answer is diffed into `assigned` / `revoked` events; a shard leaves the heartbeat body
only once its last checkpoint is committed (or its deadline passed).

Decisions where the contract is silent:
- A shard SLS assigns is in the heartbeat body from the first answer that names it ("acquiring");
  commits to it are refused `NotOwner` until its `assigned` event is written.
- A `release` of a shard that was never revoked counts as a `rebalance` handoff.
- Past a revoke's deadline cpmgr gives the newest value one `request_timeout` to be committed;
  what is still unsaved then is dropped with code `NotOwner` (its member no longer holds it),
  except at shutdown: then it stays pending for the final flush and the journal.
- A shard SLS drops from a member's answer while its acquisition is still running is dropped
  silently: its member was never told it held it.
- The consumer group's settings are read (and, with `create`, the group created) before a
  member's first heartbeat, and again before each later one until that succeeded once.
- Values pending under a member's name when it joins (a journal replay, or a previous connection
  of the same name) are committed, or refused by SLS, before its first heartbeat.
- Read-only shards (docs/design.md "Shards that end"): which shards are read-only is read with
  ListShards once per heartbeat interval per group whose members here hold shards, at every
  acquisition of a shard not listed yet, and when SLS leaves a held shard out of an answer
  before it is revoked (it may have ended rather than moved). A held shard whose newest
  position (pending, committed, else where it started) is its end is committed there by cpmgr
  itself, as its member; any success of the end cursor for a held shard sends `ended`.
- A read-only shard revoked before its end was committed is released as any other: `ended` is
  only for shards still held. New `assigned` events of a member wait for its shards that are
  ending, so `ended` comes before the children of the shard are assigned.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from cpmgr.config import Config, GroupConfig, MembershipConfig
from cpmgr.errors import ProtocolError, SLSError
from cpmgr.outcomes import CommitOutcome
from cpmgr.requests import RequestError, decode_cursor
from cpmgr.shard_ends import EndUnknown, ShardEnds
from cpmgr.sls.client import (
    CheckpointReads,
    ConsumerGroup,
    ShardReads,
)
from cpmgr.store import CheckpointStore

__all__ = ["EventSink", "Member", "Membership", "MembershipAPI"]

log = logging.getLogger(__name__)

ShardState = Literal["acquiring", "held", "releasing", "closing"]
HandoffReason = Literal["rebalance", "shutdown", "deadline", "disconnect", "ended", "lost"]
# The empty heartbeats at shutdown share this bound ("bounded by 1 s", docs/protocol.md).
FINAL_HEARTBEAT_SECONDS: Final = 1.0
READ_CONCURRENCY: Final = 8


class EventSink(Protocol):
    """Where a member's events go: its connection (events are written as they happen)."""

    def send_event(self, fields: Mapping[str, object]) -> None: ...


class MembershipAPI(CheckpointReads, ShardReads, Protocol):
    """The SLS calls membership makes, on a client of its own (never behind commits)."""

    async def heartbeat(
        self,
        project: str,
        logstore: str,
        group: str,
        consumer: str,
        shards: Sequence[int],
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[int]: ...

    async def list_consumer_groups(
        self, project: str, logstore: str, *, endpoint: str | None = None, region: str | None = None
    ) -> list[ConsumerGroup]: ...

    async def create_consumer_group(
        self,
        project: str,
        logstore: str,
        group: str,
        *,
        heartbeat_timeout: int,
        order: bool = False,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> None: ...


class CommitSide(Protocol):
    """What handoffs need from the committer."""

    async def wait_for(self, group: str, shard: int, seq: int, timeout: float) -> CommitOutcome: ...
    def discard(self, group: str, shard: int, *, code: str, message: str) -> None: ...


class MembershipObserver(Protocol):
    """Receives what membership does (metrics.Metrics fits)."""

    def heartbeat_finished(self, group: str, code: str, wall_time: float) -> None: ...
    def handoff_finished(self, group: str, reason: str, seconds: float | None) -> None: ...


class _NullObserver:
    def heartbeat_finished(self, group: str, code: str, wall_time: float) -> None:
        pass

    def handoff_finished(self, group: str, reason: str, seconds: float | None) -> None:
        pass


@dataclass(eq=False)
class _Shard:
    state: ShardState
    since: float
    reason: HandoffReason = "rebalance"
    revoked_at: float | None = None
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task[None] | None = None
    start: str | None = None  # where its member was told to start reading
    end: str | None = None  # the end cursor, once the shard is known to be read-only
    finishing: bool = False  # acquired with nothing left: cpmgr commits its end

    def stop(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.task is not None and self.task is not asyncio.current_task():
            self.task.cancel()


@dataclass(eq=False)
class Member:
    """One joined consumer: its connection, shards and heartbeat loop."""

    group: GroupConfig
    name: str
    sink: EventSink | None
    joined_at: float
    last_good: float  # send time of the last successful heartbeat (join time before one)
    shards: dict[int, _Shard] = field(default_factory=dict)
    last_heartbeat_wall: float | None = None
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    ending: bool = False
    leaving: bool = False  # `leave` is releasing its shards: it takes nothing new
    disconnected: bool = False  # its connection closed: being torn down
    ended: asyncio.Event = field(default_factory=asyncio.Event)
    # The last heartbeat sent `[]` and SLS answered `[]`: the member holds nothing there.
    released_at_sls: bool = False
    # Checks of shards SLS left out (they may have ended) and commits of end cursors: new
    # `assigned` events wait for them.
    endings: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def settings(self) -> MembershipConfig:
        assert self.group.membership is not None
        return self.group.membership

    def body(self) -> list[int]:
        return sorted(self.shards)

    def owned(self) -> list[int]:
        """Shards the consumer knows it holds: held and releasing (closing included)."""
        return sorted(s for s, st in self.shards.items() if st.state != "acquiring")

    def holds(self, shard: int) -> bool:
        st = self.shards.get(shard)
        return st is not None and st.state in ("held", "releasing")

    def view(self) -> list[dict[str, object]]:
        return [
            {"shard": s, "state": "held" if st.state == "held" else "releasing"}
            for s, st in sorted(self.shards.items())
            if st.state != "acquiring"
        ]


class Membership:
    """Every member on this daemon: `join`, `release`, `leave` and the membership rules
    (docs/protocol.md, "Membership")."""

    def __init__(
        self,
        *,
        config: Config,
        store: CheckpointStore,
        committer: CommitSide,
        api: MembershipAPI,
        reads: MembershipAPI | None = None,
        observer: MembershipObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._committer = committer
        self._api = api  # heartbeats only: nothing else may queue in front of them
        self._reads = reads or api  # GetCheckPoint, GetCursor, ListConsumerGroup, create
        # GetCursor calls in flight: a first join of thousands of new shards must not queue
        # thousands of requests at once.
        self._cursor_calls = asyncio.Semaphore(READ_CONCURRENCY)
        self._observer: MembershipObserver = observer or _NullObserver()
        self._clock = clock
        self._wall_clock = wall_clock
        self._members: dict[tuple[str, str], Member] = {}
        self._prepared: set[str] = set()  # groups whose settings SLS confirmed
        self._timeouts: dict[str, int] = {}  # the group timeout SLS uses, once known
        self._changed = asyncio.Event()  # a shard left some heartbeat body
        self._ends = ShardEnds(
            api=self._reads,
            cursor_calls=self._cursor_calls,
            on_read_only=self._read_only_found,
            clock=clock,
        )
        # (group, shard) -> the member holding that read-only shard: a commit of its end ends it
        self._ending: dict[tuple[str, int], Member] = {}
        self._listings: dict[str, asyncio.Task[None]] = {}  # background ListShards per group
        self.accepting = True
        self._closed = False
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        self._groups = {g.name: g for g in config.groups if g.membership is not None}
        self._request_timeout = config.commit.request_timeout
        self._wait_timeout = config.commit.wait_timeout
        for member in self._members.values():
            member.group = self._groups.get(member.group.name, member.group)

    @property
    def groups(self) -> frozenset[str]:
        return frozenset(self._groups)

    def members(self) -> list[Member]:
        return list(self._members.values())

    # ------------------------------------------------------------------ join

    async def join(self, group: str, consumer: str, sink: EventSink) -> Member:
        """A new member on `sink`'s connection; its shards follow as events."""
        config = self._membership_group(group)
        if not self.accepting:
            raise ProtocolError("ShuttingDown", "the daemon is shutting down")
        previous = self._members.get((group, consumer))
        if previous is not None and not (previous.ending or previous.disconnected):
            raise ProtocolError(
                "ConsumerInUse", f"consumer {consumer!r} is already a member of group {group!r}"
            )
        if previous is not None:
            await previous.ended.wait()  # a rejoin waits for the old connection's teardown
            if (group, consumer) in self._members or not self.accepting:
                raise ProtocolError("ConsumerInUse", f"consumer {consumer!r} joined meanwhile")
        now = self._clock()
        member = Member(config, consumer, sink, joined_at=now, last_good=now)
        self._members[(group, consumer)] = member
        member.task = asyncio.create_task(self._run(member), name=f"heartbeat-{group}-{consumer}")
        log.info("group %s: %s joined", group, consumer)
        return member

    def _membership_group(self, group: str) -> GroupConfig:
        config = self._groups.get(group)
        if config is not None:
            return config
        raise ProtocolError("NotMembershipGroup", f"group {group!r} has no membership block")

    def member(self, group: str, consumer: str) -> Member | None:
        member = self._members.get((group, consumer))
        return None if member is None or member.ending else member

    # ------------------------------------------------------------------ commits

    def check_commit(self, member: Member, shards: Collection[int]) -> None:
        """Refuse with NotOwner unless the member holds every shard."""
        for shard in shards:
            if not member.holds(shard):
                raise ProtocolError(
                    "NotOwner",
                    f"consumer {member.name!r} does not hold shard {shard} of group "
                    f"{member.group.name!r}",
                )

    def on_refused(self, group: str, shard: int, consumer: str | None, error: SLSError) -> None:
        """SLS refused a member's checkpoint for good: it lost the shard, or everything."""
        member = self._members.get((group, consumer or ""))
        if member is None:
            return
        if error.member_expired:
            # SLS no longer knows the member: every shard is gone; heartbeat `[]` to rejoin.
            self._lose(member, member.owned(), "expired")
            member.wake.set()
        elif error.ownership and member.holds(shard):
            self._lose(member, [shard], "not_owner")

    # ------------------------------------------------------------------ heartbeats

    async def _run(self, member: Member) -> None:
        try:
            await self._commit_leftovers(member)
            while not member.ending:
                sent = self._clock()
                await self._heartbeat(member, sent)
                self._check_heartbeat_lost(member)
                self._list_shards_when_due(member)
                await self._sleep_until(member, sent + member.settings.heartbeat_interval)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("group %s: heartbeat loop of %s failed", member.group.name, member.name)

    async def _sleep_until(self, member: Member, when: float) -> None:
        if member.ending:
            return
        member.wake.clear()
        delay = when - self._clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(member.wake.wait(), delay)

    async def _commit_leftovers(self, member: Member) -> None:
        """Values pending under the member's name from before it joined go first, as it."""
        group = member.group.name
        leftovers = self._store.pending_of_consumer(group, member.name)
        if leftovers:
            timeout = member.settings.release_timeout
            await asyncio.gather(
                *(self._committer.wait_for(group, s, seq, timeout) for s, seq in leftovers)
            )

    async def _heartbeat(self, member: Member, sent: float) -> None:
        group = member.group
        if group.name not in self._prepared:
            await self._prepare_group(group)
        body = member.body()
        member.released_at_sls = False
        try:
            assigned = await self._api.heartbeat(
                group.project,
                group.logstore,
                group.consumer_group,
                member.name,
                body,
                endpoint=group.endpoint,
                region=group.region,
            )
        except SLSError as exc:
            self._observer.heartbeat_finished(group.name, exc.code, self._wall_clock())
            log.warning("group %s: heartbeat of %s failed: %s", group.name, member.name, exc)
            if exc.member_expired and not member.ending:
                self._lose(member, member.owned(), "expired")
                member.wake.set()
            return
        member.last_good = sent
        member.released_at_sls = not body and not assigned
        member.last_heartbeat_wall = self._wall_clock()
        self._observer.heartbeat_finished(group.name, "OK", member.last_heartbeat_wall)
        # A member leaving or being torn down, or any member once shutdown revoked everything,
        # takes nothing new: SLS goes on assigning a released shard to a consumer that
        # heartbeats.
        if self.accepting and not (member.ending or member.leaving or member.disconnected):
            self._apply_assignment(member, set(assigned))

    async def _prepare_group(self, group: GroupConfig) -> None:
        settings = group.membership
        assert settings is not None
        try:
            found = await self._reads.list_consumer_groups(
                group.project, group.logstore, endpoint=group.endpoint, region=group.region
            )
            existing = next((g for g in found if g.name == group.consumer_group), None)
            if existing is None and settings.create:
                await self._reads.create_consumer_group(
                    group.project,
                    group.logstore,
                    group.consumer_group,
                    heartbeat_timeout=settings.timeout,
                    order=settings.order,
                    endpoint=group.endpoint,
                    region=group.region,
                )
                log.info("group %s: created consumer group %s", group.name, group.consumer_group)
        except SLSError as exc:
            log.warning("group %s: cannot read the consumer group: %s", group.name, exc)
            return
        self._prepared.add(group.name)
        if existing is not None and existing.timeout != settings.timeout:
            log.warning(
                "group %s: consumer group %s has timeout %ds at SLS (config: %ds); using SLS's",
                group.name,
                group.consumer_group,
                existing.timeout,
                settings.timeout,
            )
            self._timeouts[group.name] = existing.timeout

    def timeout_of(self, member: Member) -> float:
        return self._timeouts.get(member.group.name, member.settings.timeout)

    def _check_heartbeat_lost(self, member: Member) -> None:
        settings = member.settings
        limit = member.last_good + self.timeout_of(member) - settings.heartbeat_interval
        if self._clock() >= limit and member.shards:
            self._lose(member, member.owned(), "heartbeat_lost")
            for shard in list(member.shards):
                self._forget(member, shard)

    def _apply_assignment(self, member: Member, assigned: set[int]) -> None:
        for shard, st in list(member.shards.items()):
            if shard in assigned:
                continue
            if st.state == "acquiring" and not st.finishing:
                self._forget(member, shard)  # (one committing its end finishes that first)
            elif st.state == "held" and st.task is None:
                # Ended, or moved? Only its end cursor tells: the revoke waits for that.
                self._start_ending(member, st, self._absent(member, shard, st))
        new = sorted(assigned - member.shards.keys())
        # Many new shards at once (a first join): one GetCheckPoint for the whole group.
        bulk = (
            asyncio.ensure_future(self._checkpoints(member.group, None)) if len(new) > 1 else None
        )
        for shard in new:
            st = _Shard("acquiring", self._clock())
            member.shards[shard] = st
            st.task = asyncio.create_task(self._acquire(member, shard, st, bulk))

    # ------------------------------------------------------------------ acquiring

    async def _acquire(
        self,
        member: Member,
        shard: int,
        st: _Shard,
        bulk: asyncio.Future[dict[int, str]] | None,
    ) -> None:
        while member.shards.get(shard) is st and not member.ending:
            try:
                checkpoint, start = await self._start_position(member.group, shard, bulk)
                end = await self._end_position(member.group, shard)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # SLSError, or a bug: the shard must not stay stuck
                if self._overdue(member, shard, st, f"cannot read where it starts ({exc})"):
                    return
                bulk = None  # retry with calls of this shard's own
                await self._pause(member)
                continue
            if not await self._take_start(member, shard, st, checkpoint, start):
                return
            end = self._known_end(member.group.name, shard, end)  # a listing may have run since
            if end is not None:
                self._watch(member, shard, st, end)
            if end is None or not _same_cursor(start, end):
                st.state, st.since, st.task = "held", self._clock(), None
                self._event(member, "assigned", shard=shard, checkpoint=start)
                log.info("group %s: shard %d assigned to %s", member.group.name, shard, member.name)
                return
            # Nothing to read: cpmgr commits the end itself; its success sends `ended` and
            # cancels this task. Still here: it did not succeed yet.
            st.finishing = True
            await self._commit_end(member, shard, st)
            if self._overdue(member, shard, st, "cannot commit its end"):
                return
            await self._pause(member)

    async def _take_start(
        self, member: Member, shard: int, st: _Shard, checkpoint: str | None, start: str
    ) -> bool:
        """SLS's checkpoint becomes the committed value; wait for the member's shards that are
        ending (`ended` comes before any new `assigned`). False if the shard is gone meanwhile."""
        if member.shards.get(shard) is not st or member.ending:
            return False
        self._store.seed(member.group.name, shard, checkpoint)
        st.start = start
        if member.endings:
            await asyncio.wait(set(member.endings))
        return member.shards.get(shard) is st and not member.ending

    def _overdue(self, member: Member, shard: int, st: _Shard, why: str) -> bool:
        """Past `release_timeout` since SLS named the shard: give it back (True)."""
        if self._clock() - st.since < member.settings.release_timeout:
            return False
        log.warning(
            "group %s: %s gives shard %d back: %s", member.group.name, member.name, shard, why
        )
        self._forget(member, shard)
        return True

    async def _pause(self, member: Member) -> None:
        settings = member.settings
        await asyncio.sleep(min(settings.heartbeat_interval, settings.release_timeout))

    async def _start_position(
        self, group: GroupConfig, shard: int, bulk: asyncio.Future[dict[int, str]] | None
    ) -> tuple[str | None, str]:
        """(SLS's checkpoint or None, where to start reading)."""
        if bulk is not None:
            checkpoints = await asyncio.shield(bulk)
        else:
            checkpoints = await self._checkpoints(group, shard)
        checkpoint = checkpoints.get(shard)
        if checkpoint:
            return checkpoint, checkpoint
        assert group.membership is not None
        async with self._cursor_calls:
            cursor = await self._reads.get_cursor(
                group.project,
                group.logstore,
                shard,
                group.membership.start_from,
                endpoint=group.endpoint,
                region=group.region,
            )
        return None, cursor

    async def _end_position(self, group: GroupConfig, shard: int) -> str | None:
        """The shard's end cursor if it is read-only, else None (listing it if not known)."""
        try:
            return self._ends.end_of(group.name, shard)
        except EndUnknown:
            await self._ends.refresh(group)
        return self._ends.end_of(group.name, shard)  # EndUnknown again: tried again later

    async def _checkpoints(self, group: GroupConfig, shard: int | None) -> dict[int, str]:
        """GetCheckPoint of one shard, or of all: {shard: checkpoint} ("" if none)."""
        entries = await self._reads.get_checkpoint(
            group.project,
            group.logstore,
            group.consumer_group,
            shard,
            endpoint=group.endpoint,
            region=group.region,
        )
        return {e.shard: e.checkpoint for e in entries}

    # ------------------------------------------------------------------ shards that end

    def on_committed(self, group: str, shard: int, checkpoint: str) -> None:
        """SLS accepted `checkpoint` for the shard: at a held read-only shard's end, it ended."""
        member = self._ending.get((group, shard))
        if member is None:
            return
        st = member.shards.get(shard)
        if st is not None and st.end is not None and _same_cursor(checkpoint, st.end):
            self._end_shard(member, shard, st)

    def _end_shard(self, member: Member, shard: int, st: _Shard) -> None:
        if st.state not in ("acquiring", "held"):
            return  # revoked meanwhile: its release hands it over
        self._event(member, "ended", shard=shard)
        self._hand_over(member, shard, "ended")

    def _known_end(self, group: str, shard: int, fallback: str | None) -> str | None:
        try:
            return self._ends.end_of(group, shard)
        except EndUnknown:
            return fallback

    def _watch(self, member: Member, shard: int, st: _Shard, end: str) -> None:
        st.end = end
        self._ending[(member.group.name, shard)] = member

    def _at_end(self, member: Member, shard: int, st: _Shard) -> bool:
        """Whether the shard's newest position (pending, committed, else its start) is its end."""
        assert st.end is not None
        view = self._store.shard_view(member.group.name, shard)
        newest = st.start
        if view is not None:
            newest = view.pending or view.committed or newest
        return newest is not None and _same_cursor(newest, st.end)

    async def _commit_end(self, member: Member, shard: int, st: _Shard) -> CommitOutcome:
        """Commit the end cursor now as the member, even if SLS has that value already (only a
        commit to a read-only shard finishes it); its success sends `ended` (on_committed)."""
        assert st.end is not None
        group = member.group.name
        view = self._store.shard_view(group, shard)
        if view is not None and view.pending is not None and _same_cursor(view.pending, st.end):
            seq = self._store.newest_seq(group, shard)
        else:
            seq = self._store.resend(group, shard, st.end, consumer=member.name)
        return await self._committer.wait_for(group, shard, seq, member.settings.release_timeout)

    def _start_ending(
        self, member: Member, st: _Shard, work: Coroutine[object, object, None]
    ) -> None:
        task = asyncio.create_task(work)
        st.task = task
        member.endings.add(task)
        task.add_done_callback(member.endings.discard)

    async def _absent(self, member: Member, shard: int, st: _Shard) -> None:
        """SLS left a held shard out of its answer: at its end, end it; otherwise revoke it."""
        try:
            if st.end is None:
                try:
                    await self._ends.refresh(member.group)
                except SLSError as exc:
                    log.warning("group %s: cannot list the shards: %s", member.group.name, exc)
            if member.shards.get(shard) is not st or st.state != "held":
                return
            end = self._known_end(member.group.name, shard, st.end)
            if end is not None and st.end is None:
                self._watch(member, shard, st, end)
            if st.end is not None and self._at_end(member, shard, st):
                await self._commit_end(member, shard, st)
            if member.shards.get(shard) is st and st.state == "held":
                self._revoke(member, shard, "rebalance", member.settings.release_timeout)
        finally:
            if st.task is asyncio.current_task():
                st.task = None

    async def _finish_at_end(self, member: Member, shard: int, st: _Shard) -> None:
        try:
            await self._commit_end(member, shard, st)
        finally:
            if st.task is asyncio.current_task():
                st.task = None

    def _read_only_found(self, group: str, ends: Mapping[int, str]) -> None:
        """A listing found shards newly read-only: watch those held here; finish those whose
        member has nothing left to read (a commit of the same value would be a no-op)."""
        for member in self._members.values():
            if member.group.name != group or member.ending:
                continue
            for shard in ends.keys() & member.shards.keys():
                st = member.shards[shard]
                if st.state != "held" or st.end is not None:
                    continue  # acquiring shards read the listing themselves
                self._watch(member, shard, st, ends[shard])
                if st.task is None and self._at_end(member, shard, st):
                    self._start_ending(member, st, self._finish_at_end(member, shard, st))

    def _list_shards_when_due(self, member: Member) -> None:
        """One ListShards per heartbeat interval per group whose members here hold shards."""
        group = member.group
        if not member.shards or group.name in self._listings:
            return
        if self._ends.listed_since(group.name, self._clock() - member.settings.heartbeat_interval):
            return
        task = asyncio.create_task(self._list_shards(group), name=f"list-shards-{group.name}")
        self._listings[group.name] = task
        task.add_done_callback(lambda _: self._listings.pop(group.name, None))

    async def _list_shards(self, group: GroupConfig) -> None:
        try:
            await self._ends.refresh(group)
        except SLSError as exc:
            log.warning("group %s: cannot list the shards: %s", group.name, exc)

    # ------------------------------------------------------------------ handing over

    def _revoke(self, member: Member, shard: int, reason: HandoffReason, deadline: float) -> None:
        st = member.shards[shard]
        st.state, st.reason, st.revoked_at = "releasing", reason, self._clock()
        self._event(member, "revoked", shard=shard, reason=reason, deadline=deadline)
        loop = asyncio.get_running_loop()
        st.timer = loop.call_later(deadline, self._deadline_passed, member, shard, st)
        log.info(
            "group %s: shard %d revoked from %s (%s)", member.group.name, shard, member.name, reason
        )

    def _deadline_passed(self, member: Member, shard: int, st: _Shard) -> None:
        st.timer = None
        if member.shards.get(shard) is st:
            st.state = "closing"
            st.task = asyncio.create_task(self._hand_over_by_deadline(member, shard, st))

    async def _hand_over_by_deadline(self, member: Member, shard: int, st: _Shard) -> None:
        outcome = await self._settle(member, shard, self._request_timeout)
        if member.shards.get(shard) is not st:
            return
        if not outcome.ok and st.reason != "shutdown":
            # At shutdown the value stays pending: the final flush tries again, and a journal
            # keeps it for the next start (sent then as this member, refused if it moved on).
            self._committer.discard(
                member.group.name,
                shard,
                code="NotOwner",
                message=f"shard {shard} was handed over at its release deadline",
            )
        self._hand_over(member, shard, "deadline")

    async def _settle(self, member: Member, shard: int, timeout: float) -> CommitOutcome:
        """Wait until the shard's newest accepted value is settled at SLS."""
        seq = self._store.newest_seq(member.group.name, shard)
        if not seq:
            return CommitOutcome(ok=True)
        return await self._committer.wait_for(member.group.name, shard, seq, timeout)

    def _hand_over(self, member: Member, shard: int, reason: HandoffReason) -> None:
        """The shard leaves the heartbeat body: SLS may give it to another member."""
        st = member.shards.pop(shard)
        st.stop()
        self._unwatch(member, shard)
        seconds = None if st.revoked_at is None else self._clock() - st.revoked_at
        self._observer.handoff_finished(member.group.name, reason, seconds)
        self._changed.set()
        log.info(
            "group %s: %s handed shard %d over (%s)", member.group.name, member.name, shard, reason
        )

    def _forget(self, member: Member, shard: int) -> None:
        st = member.shards.pop(shard, None)
        if st is not None:
            st.stop()
            self._unwatch(member, shard)
            self._changed.set()

    def _unwatch(self, member: Member, shard: int) -> None:
        key = (member.group.name, shard)
        if self._ending.get(key) is member:
            del self._ending[key]

    def _lose(self, member: Member, shards: list[int], reason: str) -> None:
        """The shards are gone already (SLS says so, or heartbeats failed too long)."""
        lost = [s for s in shards if s in member.shards]
        if not lost:
            return
        for shard in lost:
            self._committer.discard(
                member.group.name,
                shard,
                code="NotOwner",
                message=f"consumer {member.name!r} lost shard {shard} ({reason})",
            )
            self._forget(member, shard)
            self._observer.handoff_finished(member.group.name, "lost", None)
        self._event(member, "lost", shards=lost, reason=reason)
        log.warning(
            "group %s: %s lost shard(s) %s (%s)", member.group.name, member.name, lost, reason
        )

    async def release(self, member: Member, shard: int) -> str | None:
        """Hand `shard` back once its newest value is committed; the committed checkpoint."""
        st = member.shards.get(shard)
        if st is None or st.state == "acquiring":
            raise ProtocolError("NotOwner", f"consumer {member.name!r} does not hold shard {shard}")
        reason = st.reason if st.revoked_at is not None else "rebalance"
        st.state = "closing"  # commits from here on are refused NotOwner
        outcome = await self._settle(member, shard, self._wait_timeout)
        if member.shards.get(shard) is not st:
            return self._committed(member, shard)  # handed over meanwhile (its deadline)
        if not outcome.ok:
            st.state = "releasing"
            raise RequestError(
                outcome.code, outcome.message, error_fields={"dropped": outcome.dropped}
            )
        self._hand_over(member, shard, reason)
        return self._committed(member, shard)

    def _committed(self, member: Member, shard: int) -> str | None:
        view = self._store.shard_view(member.group.name, shard)
        return view.committed if view is not None else None

    async def leave(self, member: Member) -> int:
        """Release every shard, then end the membership; how many shards were released."""
        member.leaving = True
        owned = member.owned()
        results = await asyncio.gather(
            *(self.release(member, s) for s in owned), return_exceptions=True
        )
        failed = [
            (shard, r)
            for shard, r in zip(owned, results, strict=True)
            if isinstance(r, BaseException)
        ]
        if failed:
            member.leaving = False  # still a member: it may take shards again, or leave again
            raise RequestError(
                "CommitFailed",
                f"{len(failed)} shard(s) could not be released",
                fields={"failed": [_failure(member, s, e) for s, e in failed]},
            )
        await self._end(member)
        return len(owned)

    async def disconnected(self, member: Member) -> None:
        """The member's connection closed: commit what it has, then release everything at once
        with an empty heartbeat, so others take its shards within one heartbeat interval."""
        if member.ending or self._closed:
            return
        member.sink = None
        member.disconnected = True
        owned = member.owned()
        for shard in owned:
            member.shards[shard].state = "closing"
        timeout = member.settings.release_timeout
        outcomes = await asyncio.gather(*(self._settle(member, s, timeout) for s in owned))
        for shard, outcome in zip(owned, outcomes, strict=True):
            if not outcome.ok:
                self._committer.discard(
                    member.group.name,
                    shard,
                    code="NotOwner",
                    message=f"consumer {member.name!r} disconnected before shard {shard} was saved",
                )
            if shard in member.shards:
                self._hand_over(member, shard, "disconnect")
        await self._end(member)

    async def _end(self, member: Member, timeout: float | None = None) -> None:
        """Stop heartbeating, send the empty heartbeat that frees the member's shards (within
        `timeout`, default min(request_timeout, heartbeat_interval)), forget it."""
        member.ending = True
        for shard in list(member.shards):
            self._forget(member, shard)
        timeout = timeout or self._final_timeout(member)
        # Both within `timeout`: a heartbeat in flight gets at most half of it.
        started = self._clock()
        await self._stop_loop(member, timeout / 2)
        if not member.released_at_sls:
            # Not when the loop's last heartbeat already sent `[]` and got `[]`: the member
            # holds nothing at SLS (to the emulator that `[]` was its leave), and another `[]`
            # would register it again, with every free shard, until its timeout.
            remaining = max(timeout / 2, timeout - (self._clock() - started))
            await self._final_heartbeat(member, remaining)
        key = (member.group.name, member.name)
        if self._members.get(key) is member:
            del self._members[key]
        member.ended.set()
        log.info("group %s: %s left", member.group.name, member.name)

    async def _stop_loop(self, member: Member, timeout: float) -> None:
        """End the member's heartbeat loop, letting a heartbeat in flight get its answer first
        (within `timeout`): cancelled, it could still reach SLS after the final empty one and
        register the member again, holding shards until its timeout."""
        task = member.task
        if task is None or task is asyncio.current_task():
            return
        member.wake.set()
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(task), timeout)
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    def _final_timeout(self, member: Member) -> float:
        return min(self._request_timeout, member.settings.heartbeat_interval)

    async def _final_heartbeat(self, member: Member, timeout: float) -> None:
        group = member.group
        call = self._api.heartbeat(
            group.project,
            group.logstore,
            group.consumer_group,
            member.name,
            [],
            endpoint=group.endpoint,
            region=group.region,
        )
        try:
            await asyncio.wait_for(call, timeout)
        except (SLSError, TimeoutError) as exc:
            log.warning("group %s: last heartbeat of %s failed: %s", group.name, member.name, exc)

    # ------------------------------------------------------------------ shutdown

    def revoke_all(self, shutdown_timeout: float) -> float:
        """Shutdown: refuse joins, revoke every shard; the longest deadline given."""
        self.accepting = False
        longest = 0.0
        for member in self._members.values():
            deadline = min(member.settings.release_timeout, shutdown_timeout / 2)
            for shard, st in list(member.shards.items()):
                if st.state == "acquiring":
                    self._forget(member, shard)
                elif st.state == "held":
                    self._revoke(member, shard, "shutdown", deadline)
                    longest = max(longest, deadline)
        return longest

    async def wait_released(self, deadline: float) -> bool:
        """Until every member's heartbeat body is empty, or `deadline` (monotonic)."""
        while any(m.shards for m in self._members.values()):
            self._changed.clear()
            left = deadline - self._clock()
            if left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), left)
        return True

    async def close(self) -> None:
        """Stop every heartbeat loop; one empty heartbeat per member, all within 1 s."""
        self.accepting = False
        self._closed = True
        members = list(self._members.values())
        await asyncio.gather(*(self._end(m, FINAL_HEARTBEAT_SECONDS) for m in members))
        for task in list(self._listings.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._ends.close()

    # ------------------------------------------------------------------ views

    def healthy(self) -> bool:
        """False while some member has had no successful heartbeat for timeout / 2."""
        now = self._clock()
        return all(
            now - m.last_good < self.timeout_of(m) / 2
            for m in self._members.values()
            if not m.ending
        )

    def members_view(self, visible: Collection[str] | None, group: str | None) -> list[object]:
        return [
            {
                "group": m.group.name,
                "consumer": m.name,
                "shards": m.view(),
                "last_heartbeat": m.last_heartbeat_wall,
            }
            for m in self._members.values()
            if not m.ending
            and (visible is None or m.group.name in visible)
            and (group is None or m.group.name == group)
        ]

    def figures(self) -> dict[str, tuple[int, int, float | None]]:
        """Per membership group: (members, held shards, newest heartbeat wall time)."""
        figures: dict[str, tuple[int, int, float | None]] = {g: (0, 0, None) for g in self._groups}
        for m in self._members.values():
            count, held, last = figures.get(m.group.name, (0, 0, None))
            newest = m.last_heartbeat_wall
            if last is not None and (newest is None or last > newest):
                newest = last
            figures[m.group.name] = (count + 1, held + len(m.owned()), newest)
        return figures

    # ------------------------------------------------------------------ events

    def _event(self, member: Member, kind: str, **fields: object) -> None:
        if member.sink is not None:
            member.sink.send_event(
                {"event": kind, "group": member.group.name, "consumer": member.name, **fields}
            )


def _same_cursor(one: str, other: str) -> bool:
    """Whether two cursors are one position (as the numbers they encode, when they do)."""
    if one == other:
        return True
    number = decode_cursor(one)
    return number is not None and number == decode_cursor(other)


def _failure(member: Member, shard: int, error: BaseException) -> dict[str, object]:
    code = getattr(error, "code", "InternalError")
    dropped = bool(getattr(error, "error_fields", {}).get("dropped", False))
    return {
        "group": member.group.name,
        "shard": shard,
        "code": code,
        "message": str(getattr(error, "message", error)),
        "dropped": dropped,
    }
