"""The ops of the socket protocol over the store, the committer and the journal (no socket I/O).

Decisions where the contract is silent:
- A batch's `accepted` counts distinct shards (a shard given twice counts once).
- With a journal, a commit is checked, written, made durable, then applied. Values between
  check and apply are reserved, so an older value racing a newer one is refused before it is
  written and can never become the newest in the journal. Reserved new shards count toward
  `max_shards` too, so concurrent journaled commits cannot overshoot it together.
- A batch commit with `wait` that fails answers with the first failed shard's code (and its
  `dropped`), plus a top-level `failed` list like `flush`.
- `flush` without a group, from a peer that may not see every group, flushes the groups it may
  see, one flush per group, and answers their sum; `status` lists only those groups.
- `UnknownGroup` comes before `Forbidden`: a group that is not configured is unknown to all.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol

from cpmgr import __version__
from cpmgr.config import Config
from cpmgr.errors import CpmgrError, ProtocolError, SLSError
from cpmgr.outcomes import CommitOutcome, FlushResult
from cpmgr.protocol import (
    CommitRequest,
    FlushRequest,
    GetRequest,
    ItemColumns,
    PingRequest,
    Request,
    RequestError,
    StatusRequest,
)
from cpmgr.sls.client import RemoteCheckpoint
from cpmgr.store import CheckpointStore, ShardView

__all__ = [
    "CommitterLike",
    "Dispatcher",
    "Fields",
    "Handlers",
    "IngestObserver",
    "JournalLike",
    "NullObserver",
    "dispatch",
]

Fields = dict[str, object]
# (group, shard) -> the `lag` object of a `get` entry, None before the first reading.
LagLookup = Callable[[str, int], Fields | None]
JournalEntry = tuple[str, int, str, str | None]
"""What the journal persists of an accepted checkpoint: group, shard, checkpoint, consumer."""


# --- the seams: what the ops need from their collaborators ----------------------------------


class CommitterLike(Protocol):
    """What `wait`, `flush` and `get` with `remote` need from the committer."""

    async def wait_for(self, group: str, shard: int, seq: int, timeout: float) -> CommitOutcome: ...
    async def flush(self, *, group: str | None = None, timeout: float) -> FlushResult: ...
    async def remote(
        self, group: str, shard: int | None = None
    ) -> Mapping[int, RemoteCheckpoint]: ...


class JournalLike(Protocol):
    """Persists accepted (group, shard, checkpoint, consumer) entries before they are
    acknowledged; raising means they are not accepted."""

    async def record_accepted(self, entries: Sequence[JournalEntry]) -> None: ...

    def accept_run(
        self,
        group: str,
        shards: Sequence[int],
        checkpoints: Sequence[str],
        consumers: Sequence[str | None],
    ) -> asyncio.Future[CpmgrError | None]:
        """What `record_accepted` does for entries of one group given as columns, without a
        coroutine: the future resolves to None once they are persisted, or to the error
        refusing them (raising refuses them at once). Callers must not cancel it."""
        ...


class IngestObserver(Protocol):
    """Receives what the socket side does (metrics.Metrics fits); every method must be cheap."""

    def checkpoints_received(self, group: str, count: int = 1) -> None: ...
    def connection_opened(self) -> None: ...
    def connection_closed(self) -> None: ...
    def connection_refused(self, reason: str) -> None: ...
    def request_error(self, code: str) -> None: ...


class NullObserver:
    def checkpoints_received(self, group: str, count: int = 1) -> None:
        pass

    def connection_opened(self) -> None:
        pass

    def connection_closed(self) -> None:
        pass

    def connection_refused(self, reason: str) -> None:
        pass

    def request_error(self, code: str) -> None:
        pass


class Handlers(Protocol):
    """One method per op: the success answer's fields, or a ProtocolError. `visible` is the
    set of groups the asking peer may see (None: all)."""

    async def commit(self, request: CommitRequest) -> Fields: ...
    async def flush(
        self, request: FlushRequest, *, visible: Collection[str] | None = None
    ) -> Fields: ...
    async def get(self, request: GetRequest) -> Fields: ...
    async def status(
        self, request: StatusRequest, *, visible: Collection[str] | None = None
    ) -> Fields: ...
    async def ping(self, request: PingRequest) -> Fields: ...


async def dispatch(
    handlers: Handlers, request: Request, *, visible: Collection[str] | None = None
) -> Fields:
    """Route a request to the handler of its op."""
    if isinstance(request, CommitRequest):
        return await handlers.commit(request)
    if isinstance(request, FlushRequest):
        return await handlers.flush(request, visible=visible)
    if isinstance(request, GetRequest):
        return await handlers.get(request)
    if isinstance(request, StatusRequest):
        return await handlers.status(request, visible=visible)
    if isinstance(request, PingRequest):
        return await handlers.ping(request)
    # Membership ops need the connection that sent them: the socket server answers them.
    raise ProtocolError("BadRequest", f"{request.op} is not available here")


# Shards of a whole-group `get` built, or encoded, per loop turn.
LISTING_CHUNK: Final = 2000


@dataclass(eq=False)
class _Admission:
    """What the journaled commits of one chunk reserved and hand to the journal."""

    keys: list[tuple[str, int]] = field(default_factory=list)
    entries: list[JournalEntry] = field(default_factory=list)


# A reservation: (newest reserved cursor, how many commits hold it, whether its shard was new).
_Reservation = tuple[int | None, int, bool]
_UNSEEN: Final = -1  # not a cursor (they are >= 0): a shard not yet met in a chunk


@dataclass(eq=False, slots=True)
class _PlainChunk:
    """Single commits to one group without force, all admitted, and the keys they reserved.
    Of their items only the last value of each shard, as columns: the values before it are
    replaced within the same chunk, before anyone is answered, so neither the journal nor
    the store needs them (and a chunk waits for the journal: an object per commit kept alive
    that long made the garbage collector run every few hundred commits)."""

    group: str
    latest: ItemColumns
    count: int  # commits in the chunk
    keys: list[tuple[str, int]]


# What a plain chunk's commits get: None once all are accepted, or the error refusing all.
PlainAnswer = Callable[[ProtocolError | None], None]


class Dispatcher:
    """The socket ops (docs/protocol.md) over the store, the committer and the journal.

    Without a committer, `wait`, `flush` and `get` with `remote` answer BadRequest
    ("... not available"), before anything is accepted. The `*_now` methods answer the ops that
    wait for nothing (see `immediate`) without a coroutine.
    """

    def __init__(
        self,
        store: CheckpointStore,
        *,
        config: Config,
        committer: CommitterLike | None = None,
        journal: JournalLike | None = None,
        observer: IngestObserver | None = None,
        status: Callable[[], Mapping[str, Any]] | None = None,
        lag: LagLookup | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._store = store
        self._lag: LagLookup = lag or _no_lag
        self._committer = committer
        self._journal = journal
        self._observer: IngestObserver = observer or NullObserver()
        self._status = status
        self._clock = clock
        self._started = clock()
        # With a journal, a value is checked, written, made durable, then applied. Values
        # between check and apply are reserved, so a concurrent older value is refused before
        # it is written: otherwise it could follow a newer one in the journal and become the
        # baseline after a restart. (A lock per group would do it too, but would defeat the
        # group commit of fsync: always.)
        self._reserved: dict[tuple[str, int], _Reservation] = {}
        self._reserved_new: collections.Counter[str] = collections.Counter()
        # Checkpoints received by the synchronous path, published once per chunk of input.
        self._received: dict[str, int] = {}
        self.apply_config(config)

    def apply_config(self, config: Config) -> None:
        """Take the groups, their limits and the default wait timeout of a (reloaded) config."""
        self._groups: frozenset[str] = frozenset(g.name for g in config.groups)
        self._max_shards = {g.name: g.max_shards for g in config.groups}
        self._restricted = {
            g.name: frozenset(g.allowed_uids) for g in config.groups if g.allowed_uids
        }
        self.restricted = bool(self._restricted)  # whether any group limits its peers
        self._wait_timeout = config.commit.wait_timeout

    # --- who may use which group -------------------------------------------------------

    def may_use(self, group: str, uid: int | None) -> bool:
        """Whether a peer with `uid` may name `group` (unknown groups are left to the op)."""
        allowed = self._restricted.get(group)
        return allowed is None or (uid is not None and uid in allowed)

    def visible_groups(self, uid: int | None) -> frozenset[str] | None:
        """The groups a peer may see, or None if it may see all of them."""
        if not self._restricted:
            return None
        visible = frozenset(g for g in self._groups if self.may_use(g, uid))
        return None if visible == self._groups else visible

    def require_group(self, group: str) -> None:
        """Raise UnknownGroup unless the group is configured."""
        self._require_group(group)

    def _require_group(self, group: str) -> None:
        if group not in self._groups:
            raise ProtocolError("UnknownGroup", f"unknown group {group!r}")

    def _require_committer(self, what: str) -> CommitterLike:
        if self._committer is None:
            raise ProtocolError("BadRequest", f"{what} is not available")
        return self._committer

    # --- answered at once ----------------------------------------------------------------

    def immediate(self, request: Request) -> bool:
        """Whether the request waits for nothing (no journal, committer or SLS)."""
        if isinstance(request, CommitRequest):
            return self._journal is None and not request.wait
        if isinstance(request, GetRequest):
            return not request.remote and not self.large_listing(request)
        return isinstance(request, StatusRequest | PingRequest)

    def large_listing(self, request: GetRequest) -> bool:
        """A whole-group `get` too large to build in one loop turn (see `listing`)."""
        return request.shard is None and self._store.listed_count(request.group) > LISTING_CHUNK

    async def listing(self, request: GetRequest) -> list[Fields]:
        """The entries of a whole-group `get`, built LISTING_CHUNK shards per loop turn: at
        100,000 shards the answer is about 11 MB, and building it at once held the loop for
        about a second."""
        self._require_group(request.group)
        group = request.group
        shards = self._store.listed_shards(group)
        entries: list[Fields] = []
        for start in range(0, len(shards), LISTING_CHUNK):
            for shard in shards[start : start + LISTING_CHUNK]:
                view = self._store.shard_view(group, shard)
                entries.append(_shard_entry(group, shard, view, self._lag(group, shard)))
            await asyncio.sleep(0)
        return entries

    def answer_now(self, request: Request, *, visible: Collection[str] | None = None) -> Fields:
        """The answer fields of an `immediate` request."""
        if isinstance(request, CommitRequest):
            return self.commit_now(request)
        if isinstance(request, GetRequest):
            return self.get_now(request)
        if isinstance(request, StatusRequest):
            return self.status_now(visible)
        return {}

    def commit_now(self, request: CommitRequest) -> Fields:
        """A commit without journal and without `wait`."""
        # The hot path of the socket: a single commit costs a few dict lookups here.
        group = request.group
        if group not in self._groups:
            raise ProtocolError("UnknownGroup", f"unknown group {group!r}")
        count = len(request.items)
        if self._store.tracked_count(group) + count > self._max_shards[group]:
            self._check_shard_limit(request)  # without a journal nothing is reserved
        received = self._received
        if request.batch:
            self._store.accept_all(group, request.items, force=request.force)
            received[group] = received.get(group, 0) + count
            return {"accepted": count}
        item = request.items[0]
        self._store.accept(
            group,
            item.shard,
            item.checkpoint,
            consumer=item.consumer,
            force=request.force,
            number=item.number,
        )
        received[group] = received.get(group, 0) + 1
        return {}

    def publish_counts(self) -> None:
        """Hand the checkpoints counted by `commit_now` to the observer (one call per group)."""
        if self._received:
            for group, count in self._received.items():
                self._observer.checkpoints_received(group, count)
            self._received.clear()

    def get_now(self, request: GetRequest) -> Fields:
        """A `get` without `remote`."""
        self._require_group(request.group)
        group, lag = request.group, self._lag
        if request.shard is not None:
            view = self._store.shard_view(group, request.shard)
            return {"shards": [_shard_entry(group, request.shard, view, lag(group, request.shard))]}
        views = self._store.shard_views(group)
        return {"shards": [_shard_entry(group, v.shard, v, lag(group, v.shard)) for v in views]}

    def status_now(self, visible: Collection[str] | None = None) -> Fields:
        if self._status is not None:
            fields = {k: v for k, v in self._status().items() if k != "ok"}
            groups = fields.get("groups")
            if visible is not None and isinstance(groups, dict):
                fields["groups"] = {k: v for k, v in groups.items() if k in visible}
            return fields
        return {
            "version": __version__,
            "uptime_seconds": round(self._clock() - self._started, 3),
            "groups": {
                name: self._store.group_status(name)
                for name in self._store.groups()
                if name in self._groups and (visible is None or name in visible)
            },
        }

    # --- commit -----------------------------------------------------------------------

    async def commit(self, request: CommitRequest) -> Fields:
        if self._journal is None and not request.wait:
            fields = self.commit_now(request)
            self.publish_counts()
            return fields
        self._require_group(request.group)
        committer = self._require_committer("wait") if request.wait else None
        seqs = await self._accept(request)
        self._observer.checkpoints_received(request.group, len(request.items))
        if committer is not None:
            await self._wait(committer, request, seqs)
        return {"accepted": len(request.items)} if request.batch else {}

    async def commit_journaled(
        self, requests: Sequence[CommitRequest]
    ) -> list[Fields | ProtocolError]:
        """Journaled commits without `wait`, in order, with one journal write for all: each
        gets its answer fields or the error refusing it (a journal failure refuses all). The
        general path: the common chunk takes `commit_plain`."""
        assert self._journal is not None
        admission = _Admission()
        refusals = [self._admit(request, admission) for request in requests]
        pairs = list(zip(requests, refusals, strict=True))
        try:
            await self._record([r for r, refused in pairs if refused is None], admission.entries)
        except ProtocolError as exc:
            return [exc if refused is None else refused for refused in refusals]
        finally:
            self._unreserve(admission.keys)
        return [
            self._apply_recorded(request) if refused is None else refused
            for request, refused in pairs
        ]

    def commit_plain(self, requests: Sequence[CommitRequest], answer: PlainAnswer) -> bool:
        """Journaled commits without `wait` that are single commits to one group without
        `force`, all admitted (the common chunk): reserved, handed to the journal in one run
        and applied once it wrote them, with no coroutine and no object per commit. `answer`
        is called then. False, with nothing done, if the chunk is not that (or one of them
        would be refused): `commit_journaled` answers it."""
        chunk = self._admit_plain(requests)
        if chunk is None:
            return False
        assert self._journal is not None
        try:
            latest = chunk.latest
            written = self._journal.accept_run(
                chunk.group, latest.shards, latest.checkpoints, latest.consumers
            )
        except CpmgrError as exc:
            self._unreserve(chunk.keys)
            answer(_not_journaled(exc))
            return True
        except BaseException:
            self._unreserve(chunk.keys)  # held for nothing, they would refuse later commits
            raise
        written.add_done_callback(functools.partial(self._plain_written, chunk, answer))
        return True

    def _plain_written(
        self,
        chunk: _PlainChunk,
        answer: PlainAnswer,
        written: asyncio.Future[CpmgrError | None],
    ) -> None:
        # Applied even if the connection's answers were cut off (at shutdown): the journal
        # holds the values, so the store must too.
        self._unreserve(chunk.keys)
        error = CpmgrError("the write was cancelled") if written.cancelled() else written.result()
        group = chunk.group
        if error is not None:
            answer(_not_journaled(error))
        elif group not in self._groups:  # a reload removed it while the journal was writing
            answer(ProtocolError("UnknownGroup", f"unknown group {group!r}"))
        else:
            # Checked before they were written, and reserved since (see _admit_single).
            self._store.accept_checked(group, chunk.latest)
            self._received[group] = self._received.get(group, 0) + chunk.count
            answer(None)

    def _admit_plain(self, requests: Sequence[CommitRequest]) -> _PlainChunk | None:
        """Check a chunk of single commits to one group without force against the store, the
        reservations and each other, and reserve their shards; None (nothing reserved) if the
        chunk is not that or any of them would be refused. A shard's first value is checked in
        full, its later ones only against the one before (which passed every check)."""
        group = requests[0].group if requests else ""
        if group not in self._groups:
            return None
        check = self._store.check
        reserved = self._reserved
        floors: dict[int, int | None] = {}  # per shard: the newest cursor so far (None: none)
        fresh: set[int] = set()  # shards neither tracked nor reserved: new ones
        shards: list[int] = []
        checkpoints: list[str] = []
        numbers: list[int | None] = []
        consumers: list[str | None] = []
        for request in requests:
            if request.batch or request.force or request.group != group:
                return None
            item = request.items[0]
            shard, number, checkpoint = item.shard, item.number, item.checkpoint
            shards.append(shard)
            checkpoints.append(checkpoint)
            numbers.append(number)
            consumers.append(item.consumer)
            floor = floors.get(shard, _UNSEEN)
            if floor is not None and floor != _UNSEEN:
                if number is not None:
                    if number < floor:
                        return None  # a regression: refused, by the general path
                    floors[shard] = number
                continue
            try:
                tracked = check(group, shard, checkpoint, number=number)
            except ProtocolError:
                return None
            held = reserved.get((group, shard))
            if held is not None:
                if held[0] is not None and number is not None and number < held[0]:
                    return None
            elif not tracked:
                fresh.add(shard)
            floors[shard] = number
        if fresh and not self._room_for(group, len(fresh)):
            return None
        latest = _last_of_each_shard(ItemColumns(shards, checkpoints, numbers, consumers))
        return _PlainChunk(group, latest, len(requests), self._reserve_floors(group, floors, fresh))

    def _room_for(self, group: str, new: int) -> bool:
        limit = self._max_shards.get(group)
        if limit is None:
            return True
        tracked = self._store.tracked_count(group) + self._reserved_new.get(group, 0)
        return tracked + new <= limit

    def _reserve_floors(
        self, group: str, floors: Mapping[int, int | None], fresh: Collection[int]
    ) -> list[tuple[str, int]]:
        """Reserve each shard of a plain chunk once, for its newest cursor; the keys."""
        reserved = self._reserved
        keys = []
        for shard, floor in floors.items():
            key = (group, shard)
            held = reserved.get(key)
            if held is None:
                reserved[key] = (floor, 1, shard in fresh)
            else:
                newest, count, new = held
                if newest is None or (floor is not None and floor > newest):
                    newest = floor
                reserved[key] = (newest, count + 1, new)
            keys.append(key)
        if fresh:
            self._reserved_new[group] += len(fresh)
        return keys

    def _admit(self, request: CommitRequest, admission: _Admission) -> ProtocolError | None:
        """Check a journaled commit and reserve its shards (noted in `admission`); the error
        refusing it, if any."""
        try:
            if request.batch or request.force:
                self._admit_any(request, admission)
            else:
                self._admit_single(request, admission)
        except ProtocolError as exc:
            return exc
        return None

    def _admit_any(self, request: CommitRequest, admission: _Admission) -> None:
        self._require_group(request.group)
        self._check(request)
        self._check_reserved(request)
        self._check_shard_limit(request)
        admission.keys += self._reserve(request)
        admission.entries += [
            (request.group, i.shard, i.checkpoint, i.consumer) for i in request.items
        ]

    def _admit_single(self, request: CommitRequest, admission: _Admission) -> None:
        """The common request, one checkpoint without force, in one pass: the store's check,
        then the reservation (an existing one is the only regression left to check; a shard
        without one may be new, the only case the shard limit can refuse)."""
        group = request.group
        if group not in self._groups:
            raise ProtocolError("UnknownGroup", f"unknown group {group!r}")
        item = request.items[0]
        shard, number, checkpoint = item.shard, item.number, item.checkpoint
        tracked = self._store.check(group, shard, checkpoint, number=number)
        key = (group, shard)
        reserved = self._reserved.get(key)
        if reserved is None:
            if not tracked:
                self._check_shard_limit(request)
                self._reserved_new[group] += 1
            self._reserved[key] = (number, 1, not tracked)
        else:
            newest, count, new = reserved
            if newest is None or (number is not None and number > newest):
                newest = number
            elif number is not None and number < newest:
                self._check_reserved(request)  # raises CheckpointRegression
            self._reserved[key] = (newest, count + 1, new)
        admission.keys.append(key)
        admission.entries.append((group, shard, checkpoint, item.consumer))

    async def _record(
        self, requests: Sequence[CommitRequest], entries: Sequence[JournalEntry]
    ) -> None:
        assert self._journal is not None
        try:
            await self._journal.record_accepted(entries)
        except CpmgrError as exc:
            raise _not_journaled(exc) from exc
        except asyncio.CancelledError:
            # The records are written (the journal writes before it waits for the fsync): the
            # values must reach the store too, or after a restart the journal would hold values
            # the store never had. No answer goes out, so applying them is harmless.
            for request in requests:
                with contextlib.suppress(ProtocolError):
                    self._apply(request)
            raise

    def _apply_recorded(self, request: CommitRequest) -> Fields | ProtocolError:
        group = request.group
        # A reload may have removed the group while the journal was writing.
        if group not in self._groups:
            return ProtocolError("UnknownGroup", f"unknown group {group!r}")
        if request.batch:
            try:
                self._apply(request)
            except ProtocolError as exc:
                return exc
        else:
            # Checked before it was written, and reserved since: no value it goes back from
            # can have been applied in between (reserved values are applied in the order they
            # were written), so the store need not check it again.
            item = request.items[0]
            self._store.accept(
                group,
                item.shard,
                item.checkpoint,
                consumer=item.consumer,
                force=True,
                number=item.number,
            )
        count = len(request.items)
        self._received[group] = self._received.get(group, 0) + count
        return {"accepted": count} if request.batch else {}

    async def _accept(self, request: CommitRequest) -> dict[int, int]:
        if self._journal is None:
            self._check_shard_limit(request)
            return self._apply(request)
        self._check(request)
        self._check_reserved(request)
        self._check_shard_limit(request)
        keys = self._reserve(request)
        entries = [(request.group, i.shard, i.checkpoint, i.consumer) for i in request.items]
        try:
            await self._record([request], entries)
        finally:
            self._unreserve(keys)
        # A reload may have removed the group while the journal was writing.
        self._require_group(request.group)
        return self._apply(request)

    def _check_shard_limit(self, request: CommitRequest) -> None:
        group = request.group
        limit = self._max_shards.get(group)
        if limit is None:
            return
        tracked = self._store.tracked_count(group) + self._reserved_new.get(group, 0)
        if tracked + len(request.items) <= limit:
            return  # the common case: even if every shard were new, it fits
        new = sum(1 for item in request.items if self._is_new(group, item.shard))
        if new and tracked + new > limit:
            raise ProtocolError(
                "TooManyShards",
                f"group {group!r} tracks {tracked} shard(s) of at most {limit}: "
                f"{new} new shard(s) refused",
            )

    def _is_new(self, group: str, shard: int) -> bool:
        return not self._store.is_tracked(group, shard) and (group, shard) not in self._reserved

    def _check(self, request: CommitRequest) -> None:
        if request.batch:
            self._store.check_batch(request.group, request.items, force=request.force)
        else:
            item = request.items[0]
            self._store.check(
                request.group,
                item.shard,
                item.checkpoint,
                force=request.force,
                number=item.number,
            )

    def _check_reserved(self, request: CommitRequest) -> None:
        if request.force:
            return
        for item in request.items:
            reserved = self._reserved.get((request.group, item.shard))
            if reserved is None or reserved[0] is None:
                continue  # the common case: nothing in between check and apply for this shard
            number = item.number
            if number is None or number >= reserved[0]:
                continue
            where = f"checkpoints[{item.index}]: " if request.batch else ""
            raise ProtocolError(
                "CheckpointRegression",
                f"{where}shard {item.shard}: checkpoint {item.checkpoint} is older than a "
                "value being accepted (set force to move it back)",
            )

    def _reserve(self, request: CommitRequest) -> list[tuple[str, int]]:
        keys = []
        for item in request.items:
            key = (request.group, item.shard)
            number = item.number
            reserved = self._reserved.get(key)
            if reserved is None:
                new = not self._store.is_tracked(request.group, item.shard)
                self._reserved_new[request.group] += new
                reserved = (number, 0, new)
            newest, count, new = reserved
            if request.force or newest is None or (number is not None and number > newest):
                newest = number
            self._reserved[key] = (newest, count + 1, new)
            keys.append(key)
        return keys

    def _unreserve(self, keys: list[tuple[str, int]]) -> None:
        reserved = self._reserved
        for key in keys:
            newest, count, new = reserved.pop(key)
            if count > 1:
                reserved[key] = (newest, count - 1, new)
            elif new:
                self._reserved_new[key[0]] -= 1

    def _apply(self, request: CommitRequest) -> dict[int, int]:
        if request.batch:
            return self._store.accept_batch(request.group, request.items, force=request.force)
        item = request.items[0]
        seq = self._store.accept(
            request.group,
            item.shard,
            item.checkpoint,
            consumer=item.consumer,
            force=request.force,
            number=item.number,
        )
        return {item.shard: seq}

    async def _wait(
        self, committer: CommitterLike, request: CommitRequest, seqs: Mapping[int, int]
    ) -> None:
        timeout = request.timeout or self._wait_timeout
        shards = list(seqs)
        outcomes = await asyncio.gather(
            *(committer.wait_for(request.group, s, seqs[s], timeout) for s in shards)
        )
        failed = [(s, o) for s, o in zip(shards, outcomes, strict=True) if not o.ok]
        if not failed:
            return
        errors = [(s, o) for s, o in failed if o.code != "Timeout"] or failed
        shard, first = errors[0]
        fields: Fields = {}
        if request.batch:
            fields["failed"] = [
                _failure(request.group, s, o.code, o.message, o.dropped) for s, o in errors
            ]
        message = f"shard {shard}: {first.message}" if request.batch else first.message
        raise RequestError(
            first.code, message, error_fields={"dropped": first.dropped}, fields=fields
        )

    # --- flush, get, status, ping -----------------------------------------------------

    async def flush(
        self, request: FlushRequest, *, visible: Collection[str] | None = None
    ) -> Fields:
        if request.group is not None:
            self._require_group(request.group)
        committer = self._require_committer("flush")
        timeout = request.timeout or self._wait_timeout
        if request.group is not None or visible is None:
            result = await committer.flush(group=request.group, timeout=timeout)
        else:
            result = await _flush_each(committer, sorted(self._groups & set(visible)), timeout)
        if result.failed:
            failed = [
                _failure(f.group, f.shard, f.code, f.message, f.dropped) for f in result.failed
            ]
            more = " (and some timed out)" if result.timed_out else ""
            raise RequestError(
                "CommitFailed",
                f"{len(failed)} shard(s) could not be committed{more}",
                fields={"committed": result.committed, "failed": failed},
            )
        if result.timed_out:
            raise RequestError(
                "Timeout",
                "some shards are still pending",
                fields={"committed": result.committed},
            )
        return {"committed": result.committed}

    async def get(self, request: GetRequest) -> Fields:
        if not request.remote:
            return self.get_now(request)
        self._require_group(request.group)
        group = request.group
        if request.shard is not None:
            views: dict[int, ShardView | None] = {
                request.shard: self._store.shard_view(group, request.shard)
            }
        else:
            views = {view.shard: view for view in self._store.shard_views(group)}
        remote = await self._remote(group, request.shard)
        if request.shard is None:
            views.update({s: None for s in remote if s not in views})
        entries = []
        for shard in sorted(views):
            entry = _shard_entry(group, shard, views[shard], self._lag(group, shard))
            entry["remote"] = _remote_entry(remote.get(shard))
            entries.append(entry)
        return {"shards": entries}

    async def _remote(self, group: str, shard: int | None) -> Mapping[int, RemoteCheckpoint]:
        committer = self._require_committer("remote")
        try:
            return await committer.remote(group, shard)
        except SLSError as exc:
            raise ProtocolError(exc.code, exc.message) from exc

    async def status(
        self, request: StatusRequest, *, visible: Collection[str] | None = None
    ) -> Fields:
        return self.status_now(visible)

    async def ping(self, request: PingRequest) -> Fields:
        return {}


async def _flush_each(committer: CommitterLike, groups: list[str], timeout: float) -> FlushResult:
    results = await asyncio.gather(*(committer.flush(group=g, timeout=timeout) for g in groups))
    return FlushResult(
        committed=sum(r.committed for r in results),
        failed=tuple(f for r in results for f in r.failed),
        timed_out=any(r.timed_out for r in results),
    )


def _failure(group: str, shard: int, code: str, message: str, dropped: bool) -> Fields:
    return {"group": group, "shard": shard, "code": code, "message": message, "dropped": dropped}


def _last_of_each_shard(items: ItemColumns) -> ItemColumns:
    """The last value of each shard among `items` (all newer than the ones before them): what
    applying every value in turn leaves, as the journal applies a run. The values before it,
    replaced within the same call, were never seen by anyone."""
    last = dict(zip(items.shards, range(len(items)), strict=True))
    if len(last) == len(items):
        return items
    kept = list(last.values())
    return ItemColumns(
        list(last),
        [items.checkpoints[i] for i in kept],
        [items.numbers[i] for i in kept],
        [items.consumers[i] for i in kept],
        distinct=True,
    )


def _not_journaled(error: CpmgrError) -> ProtocolError:
    return ProtocolError("JournalError", f"not accepted: {error}")


def _no_lag(group: str, shard: int) -> Fields | None:
    return None


def _shard_entry(group: str, shard: int, view: ShardView | None, lag: Fields | None) -> Fields:
    error = view.last_error if view is not None else None
    return {
        "group": group,
        "shard": shard,
        "pending": view.pending if view is not None else None,
        "committed": view.committed if view is not None else None,
        "committed_at": view.committed_at if view is not None else None,
        "last_error": (
            {"code": error.code, "message": error.message, "at": error.at} if error else None
        ),
        "lag": lag,
    }


def _remote_entry(entry: RemoteCheckpoint | None) -> Fields | None:
    if entry is None:
        return None
    return {
        "checkpoint": entry.checkpoint,
        "update_time": entry.update_time,
        "consumer": entry.consumer,
    }
