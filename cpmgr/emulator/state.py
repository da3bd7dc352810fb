"""The emulator's data: logstores, consumer groups, heartbeats, checkpoints and their history.

Pure bookkeeping with injected clocks (no I/O but the optional state file); every refusal is
an `ApiError` carrying the SLS status and errorCode the HTTP layer answers with.

Shard lifecycle (CURSORS-AND-CREDENTIALS A4 as SLS documents it): a read-only shard is finished
(`over`) for a group by an UpdateCheckPoint that lands exactly on its end cursor, and is never
assigned again; with the group's `order`, a shard is assigned only once every shard it descends
from is finished. Decisions where SLS is silent:
- Finishing takes a new UpdateCheckPoint while the shard is read-only: a checkpoint that already
  equalled the end when the shard was split stays unfinished until it is committed again.
- Checkpoints compare as the numbers they encode; one past the end does not finish a shard.
- A finished shard is left out of its holder's heartbeat answers at once; the holder may still
  commit to it (its last flush) while it keeps reporting it, as during a transfer.
- `shard_events` in the state endpoint is the ordered record of splits, merges, finished shards
  and assignments (the newest 10,000), so a test can prove what happened before what.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from cpmgr.emulator.lineage import LineageError, ancestors, merge_shards, split_shard
from cpmgr.emulator.shards import Shard, decode_cursor, encode_cursor, initial_shards
from cpmgr.errors import ConfigError, CpmgrError
from cpmgr.protocol import is_valid_checkpoint

Clock = Callable[[], float]

DEFAULT_GROUP_TIMEOUT = 60
# Log groups one POST /_emulator/write may append to a shard: cursors stay far below 2**63.
MAX_WRITE_COUNT = 1_000_000_000
# SLS naming rule for consumer groups: 2-128 chars of [a-z0-9_-], alphanumeric at both ends.
_GROUP_NAME = re.compile(r"^[a-z0-9][a-z0-9_-]{0,126}[a-z0-9]$")
STATE_FILE_VERSION = 1
SHARD_EVENTS_KEPT = 10_000


class ApiError(CpmgrError):
    """An SLS error answer: HTTP status, errorCode and errorMessage."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{code} (HTTP {status}): {message}")
        self.status = status
        self.code = code
        self.message = message


def parameter_invalid(message: str) -> ApiError:
    return ApiError(400, "ParameterInvalid", message)


@dataclass(frozen=True)
class OwnershipErrors:
    """How UpdateCheckPoint refuses a consumer that does not hold the shard.

    The live spelling and status are unverified, so they are settable.
    """

    consumer_not_exist: tuple[int, str] = (404, "ConsumerNotExist")
    consumer_not_match: tuple[int, str] = (400, "ConsumerNotMatch")


class StoredCheckpoint(NamedTuple):
    """One is built per UpdateCheckPoint: a NamedTuple, cheaper to build than a dataclass."""

    checkpoint: str
    update_time_us: int
    consumer: str


@dataclass
class ConsumerGroup:
    """One consumer group: its settings, live consumers, shard owners and checkpoints."""

    name: str
    timeout: int
    order: bool = False
    # consumer name -> monotonic time of its last heartbeat
    consumers: dict[str, float] = field(default_factory=dict)
    # shard -> the consumer holding it (also while the shard is being transferred away)
    owners: dict[int, str] = field(default_factory=dict)
    # consumer name -> the shards its last heartbeat answer confirmed
    confirmed: dict[str, frozenset[int]] = field(default_factory=dict)
    checkpoints: dict[int, StoredCheckpoint] = field(default_factory=dict)
    # read-only shards committed to their end cursor (`over`): never assigned again
    finished: set[int] = field(default_factory=set)
    # shard -> the consumer that held it when it stopped being assignable, while it reports it
    finishing: dict[int, str] = field(default_factory=dict)

    def held_by(self, consumer: str) -> list[int]:
        return sorted(shard for shard, owner in self.owners.items() if owner == consumer)


@dataclass
class Logstore:
    project: str
    name: str
    shard_count: int
    create_time: int
    shards: dict[int, Shard] = field(default_factory=dict)
    groups: dict[str, ConsumerGroup] = field(default_factory=dict)

    def assignable_shards(self, group: ConsumerGroup) -> list[int]:
        """The shards heartbeats of `group` hand out, in id order: not finished, and with the
        group's `order` only those whose ancestors are all finished."""
        return [
            number
            for number, shard in sorted(self.shards.items())
            if number not in group.finished
            and not (group.order and shard.parents and not self._ancestors_done(shard, group))
        ]

    def _ancestors_done(self, shard: Shard, group: ConsumerGroup) -> bool:
        return ancestors(self.shards, shard) <= group.finished


def checkpoint_key(project: str, logstore: str, group: str, shard: int) -> str:
    """The "PROJECT/LOGSTORE/GROUP/SHARD" key used by the state endpoint and the history."""
    return f"{project}/{logstore}/{group}/{shard}"


def _group_of(store: Logstore, name: str) -> ConsumerGroup:
    found = store.groups.get(name)
    if found is None:
        raise ApiError(404, "ConsumerGroupNotExist", f"consumer group {name} does not exist")
    return found


def validate_group_name(name: str) -> None:
    if not _GROUP_NAME.match(name):
        raise parameter_invalid(
            f"invalid consumer group name {name!r}: 2-128 characters of a-z, 0-9, '_' and '-', "
            "starting and ending with a letter or digit"
        )


def shard_quotas(consumers: list[str], owners: dict[int, str], shard_count: int) -> dict[str, int]:
    """How many shards each consumer should hold: counts differ by at most one.

    The larger shares go to the consumers holding most now (then by name), so a balanced
    group never moves a shard.
    """
    if not consumers:
        return {}
    base, extra = divmod(shard_count, len(consumers))
    load = Counter(owners.values())
    ranked = sorted(consumers, key=lambda name: (-load[name], name))
    return {name: base + (1 if index < extra else 0) for index, name in enumerate(ranked)}


def transferring_shards(group: ConsumerGroup, assignable: Sequence[int]) -> set[int]:
    """Shards whose holder has more than its quota: it must give them up before they move."""
    consumers = sorted(group.consumers)
    quotas = shard_quotas(consumers, group.owners, len(assignable))
    moving: set[int] = set()
    for name in consumers:
        # Keep the lowest shard ids, release the rest: deterministic and easy to reason about.
        moving.update(group.held_by(name)[quotas[name] :])
    return moving


def assign_free_shards(group: ConsumerGroup, assignable: Sequence[int]) -> list[tuple[int, str]]:
    """Give every unowned shard to the consumers furthest below their quota; (shard, consumer)
    of each given."""
    consumers = sorted(group.consumers)
    given: list[tuple[int, str]] = []
    if not consumers:
        return given
    quotas = shard_quotas(consumers, group.owners, len(assignable))
    moving = transferring_shards(group, assignable)
    kept = Counter(owner for shard, owner in group.owners.items() if shard not in moving)
    for shard in assignable:
        if shard in group.owners:
            continue
        needy = [name for name in consumers if kept[name] < quotas[name]]
        if not needy:
            break
        taker = min(needy, key=lambda name: (kept[name] - quotas[name], name))
        group.owners[shard] = taker
        kept[taker] += 1
        given.append((shard, taker))
    return given


def _drop_unassignable(group: ConsumerGroup, assignable: Sequence[int]) -> None:
    """Finished shards (and children a change of `order` holds back) are no longer assigned;
    their holders keep them, for their last commits, while they still report them."""
    keep = set(assignable)
    for shard in [s for s in group.owners if s not in keep]:
        group.finishing[shard] = group.owners.pop(shard)


def _at(checkpoint: str, end: int) -> bool:
    """Whether `checkpoint` is the cursor `end` (as numbers: no other way to spell it)."""
    try:
        return decode_cursor(checkpoint) == end
    except ValueError:
        return False


class EmulatorState:
    """Everything the emulated SLS knows, plus request counts for introspection."""

    def __init__(
        self,
        *,
        wall_clock: Clock = time.time,
        monotonic: Clock = time.monotonic,
        ownership_errors: OwnershipErrors | None = None,
    ) -> None:
        self.wall_clock = wall_clock
        self.monotonic = monotonic
        self.ownership_errors = ownership_errors or OwnershipErrors()
        self.logstores: dict[tuple[str, str], Logstore] = {}
        self.history: dict[str, list[str]] = defaultdict(list)
        self.shard_events: deque[dict[str, object]] = deque(maxlen=SHARD_EVENTS_KEPT)
        self._shard_event_count = 0
        self.requests: dict[str, Counter[str]] = defaultdict(Counter)
        # Requests held by the late-landing fault and not applied yet (see faults.py).
        self.late_pending = 0

    # --- declarations -------------------------------------------------------------------

    def add_logstore(self, project: str, logstore: str, shard_count: int) -> Logstore:
        """Declare a logstore; declaring it again with the same shard count is a no-op."""
        if shard_count < 1:
            raise parameter_invalid("a logstore needs at least one shard")
        existing = self.logstores.get((project, logstore))
        if existing is not None:
            if existing.shard_count != shard_count:
                raise ApiError(
                    400,
                    "LogStoreAlreadyExist",
                    f"logstore {project}/{logstore} already has {existing.shard_count} shards",
                )
            return existing
        create_time = int(self.wall_clock())
        created = Logstore(
            project,
            logstore,
            shard_count,
            create_time,
            shards=initial_shards(shard_count, create_time),
        )
        self.logstores[(project, logstore)] = created
        return created

    def logstore(self, project: str, logstore: str) -> Logstore:
        found = self.logstores.get((project, logstore))
        if found is not None:
            return found
        if not any(known == project for known, _ in self.logstores):
            raise ApiError(404, "ProjectNotExist", f"The Project does not exist : {project}")
        raise ApiError(404, "LogStoreNotExist", f"logstore {logstore} does not exist")

    def group(self, project: str, logstore: str, group: str) -> ConsumerGroup:
        return _group_of(self.logstore(project, logstore), group)

    # --- consumer groups ----------------------------------------------------------------

    def create_group(
        self, project: str, logstore: str, name: str, *, timeout: int, order: bool = False
    ) -> ConsumerGroup:
        store = self.logstore(project, logstore)
        validate_group_name(name)
        if timeout < 1:
            raise parameter_invalid("timeout must be a positive number of seconds")
        if name in store.groups:
            raise ApiError(400, "ConsumerGroupAlreadyExist", "consumer group already exist")
        created = ConsumerGroup(name, timeout, order)
        store.groups[name] = created
        return created

    def update_group(
        self, project: str, logstore: str, name: str, *, timeout: int | None, order: bool | None
    ) -> None:
        group = self.group(project, logstore, name)
        if timeout is not None:
            if timeout < 1:
                raise parameter_invalid("timeout must be a positive number of seconds")
            group.timeout = timeout
        if order is not None:
            group.order = order

    def delete_group(self, project: str, logstore: str, name: str) -> None:
        """Remove the group with its consumers and checkpoints (the history is kept)."""
        self.group(project, logstore, name)
        del self.logstore(project, logstore).groups[name]

    def list_groups(self, project: str, logstore: str) -> list[dict[str, object]]:
        groups = self.logstore(project, logstore).groups.values()
        return [
            {"name": group.name, "timeout": group.timeout, "order": group.order}
            for group in sorted(groups, key=lambda group: group.name)
        ]

    # --- heartbeats -----------------------------------------------------------------------

    def _expire(self, group: ConsumerGroup) -> None:
        """Drop consumers silent for longer than the group timeout; their shards become free."""
        now = self.monotonic()
        expired = [name for name, seen in group.consumers.items() if now - seen > group.timeout]
        for name in expired:
            self._remove_consumer(group, name)

    @staticmethod
    def _remove_consumer(group: ConsumerGroup, name: str) -> None:
        del group.consumers[name]
        group.confirmed.pop(name, None)
        for shard in group.held_by(name):
            del group.owners[shard]
        for shard in [s for s, holder in group.finishing.items() if holder == name]:
            del group.finishing[shard]

    def heartbeat(
        self, project: str, logstore: str, group_name: str, consumer: str, shards: Iterable[int]
    ) -> list[int]:
        """Record a heartbeat; answer the shards this consumer should hold now.

        Shards being moved away from the consumer are left out of the answer; they become
        free once the consumer stops reporting them (or expires), then go to the consumers
        below their quota. A shard the consumer still reports is never given to another.
        An empty body from a consumer whose last answer confirmed shards it still holds, and
        was not asked to give up, is a leave: the consumer is removed at once and its shards go
        to the others.
        """
        store = self.logstore(project, logstore)
        group = self.group(project, logstore, group_name)
        assignable = store.assignable_shards(group)
        reported = set(shards)
        self._expire(group)
        _drop_unassignable(group, assignable)
        for shard in [s for s, c in group.finishing.items() if c == consumer and s not in reported]:
            del group.finishing[shard]
        known = consumer in group.consumers
        if not known and reported:
            raise ApiError(
                400,
                "NotExistConsumerWithBody",
                "non-exist consumer with non-empty body of heartbeat message",
            )
        if known and not reported and self._leaving(group, consumer, assignable):
            self._remove_consumer(group, consumer)
            return []
        group.consumers[consumer] = self.monotonic()
        for shard in transferring_shards(group, assignable):
            if group.owners[shard] == consumer and shard not in reported:
                del group.owners[shard]
        for shard, taker in assign_free_shards(group, assignable):
            self._shard_event("assigned", store, shard, group=group.name, consumer=taker)
        moving = transferring_shards(group, assignable)
        answer = [shard for shard in group.held_by(consumer) if shard not in moving]
        group.confirmed[consumer] = frozenset(answer)
        return answer

    @staticmethod
    def _leaving(group: ConsumerGroup, consumer: str, assignable: Sequence[int]) -> bool:
        """Whether `consumer` drops a shard it was told to keep (so its `[]` means leave)."""
        moving = transferring_shards(group, assignable)
        return any(
            group.owners.get(shard) == consumer and shard not in moving
            for shard in group.confirmed.get(consumer, ())
        )

    def assignments(self, project: str, logstore: str, group_name: str) -> dict[str, list[int]]:
        """Every live consumer of the group and the shards it holds (transfers included)."""
        group = self.group(project, logstore, group_name)
        self._expire(group)
        _drop_unassignable(group, self.logstore(project, logstore).assignable_shards(group))
        return {
            name: sorted(
                [*group.held_by(name), *(s for s, c in group.finishing.items() if c == name)]
            )
            for name in sorted(group.consumers)
        }

    # --- checkpoints ----------------------------------------------------------------------

    def update_checkpoint(
        self,
        project: str,
        logstore: str,
        group_name: str,
        *,
        shard: int,
        checkpoint: str,
        consumer: str,
        force_success: bool,
    ) -> None:
        """Store a checkpoint as UpdateCheckPoint does; every success is appended to the history."""
        store = self.logstores.get((project, logstore)) or self.logstore(project, logstore)
        group = store.groups.get(group_name) or _group_of(store, group_name)
        if not consumer and not force_success:
            raise parameter_invalid("forceSuccess must be true when no consumer is given")
        if not is_valid_checkpoint(checkpoint):
            raise ApiError(400, "InvalidShardCheckPoint", "shard checkpoint not encoded by base64")
        found = store.shards.get(shard)
        if found is None:
            raise ApiError(404, "ShardNotExist", f"shard {shard} not exist")
        if consumer and not force_success:
            self._check_owner(group, shard, consumer)
        update_time = int(self.wall_clock() * 1_000_000)
        group.checkpoints[shard] = StoredCheckpoint(checkpoint, update_time, consumer)
        key = f"{project}/{logstore}/{group_name}/{shard}"  # checkpoint_key(), inline
        self.history[key].append(checkpoint)
        if found.read_only and shard not in group.finished and _at(checkpoint, found.end):
            group.finished.add(shard)
            self._shard_event(
                "finished", store, shard, group=group_name, consumer=consumer, checkpoint=checkpoint
            )

    def _check_owner(self, group: ConsumerGroup, shard: int, consumer: str) -> None:
        self._expire(group)
        if consumer not in group.consumers:
            status, code = self.ownership_errors.consumer_not_exist
            raise ApiError(status, code, f"consumer {consumer} does not exist")
        if consumer not in (group.owners.get(shard), group.finishing.get(shard)):
            status, code = self.ownership_errors.consumer_not_match
            raise ApiError(status, code, f"consumer {consumer} does not hold shard {shard}")

    def get_checkpoints(
        self, project: str, logstore: str, group_name: str, shard: int | None
    ) -> list[dict[str, object]]:
        """GetCheckPoint: one entry per shard ("" when never committed); [] for an unknown shard."""
        store = self.logstore(project, logstore)
        group = self.group(project, logstore, group_name)
        if shard is None:
            shards: Iterable[int] = sorted(store.shards)
        elif shard in store.shards:
            shards = [shard]
        else:
            shards = []
        return [_checkpoint_entry(number, group.checkpoints.get(number)) for number in shards]

    def list_shards(self, project: str, logstore: str) -> list[dict[str, object]]:
        store = self.logstore(project, logstore)
        return [shard.listing() for _, shard in sorted(store.shards.items())]

    def shard(self, project: str, logstore: str, shard: int) -> Shard:
        found = self.logstore(project, logstore).shards.get(shard)
        if found is None:
            # 400, not 404: GetCursor's documented answer for an unknown shard.
            raise ApiError(400, "ShardNotExist", f"Shard {shard} does not exist")
        return found

    def get_cursor(self, project: str, logstore: str, shard: int, start: str) -> str:
        """GetCursor: `start` is "begin", "end" or a unix time in seconds."""
        found = self.shard(project, logstore, shard)
        if start == "begin":
            return found.begin_cursor
        if start == "end":
            return found.end_cursor
        if not (start.isascii() and start.isdigit() and len(start) <= 18):
            raise parameter_invalid("Parameter From is not valid")
        return encode_cursor(found.cursor_at(int(start)))

    def get_cursor_time(self, project: str, logstore: str, shard: int, cursor: str) -> int:
        """GetCursorTime: the receive time (unix seconds) of the log group at `cursor`."""
        found = self.shard(project, logstore, shard)
        try:
            # PY's get_previous_cursor_time sends the clamped cursor with base64's trailing
            # newline, so surrounding whitespace is tolerated here.
            return found.cursor_time(decode_cursor(cursor.strip()))
        except ValueError as exc:
            raise ApiError(400, "InvalidCursor", f"cursor {cursor!r} is invalid: {exc}") from exc

    # --- shard data -----------------------------------------------------------------------

    def write(
        self,
        project: str,
        logstore: str,
        *,
        count: int,
        shard: int | None = None,
        receive_time: int | None = None,
    ) -> list[Shard]:
        """Append `count` log groups to one shard, or to every read-write shard; the shards
        written. A named read-only shard is refused (its end cursor is frozen)."""
        if not 0 <= count <= MAX_WRITE_COUNT:
            raise parameter_invalid(f"count must be between 0 and {MAX_WRITE_COUNT}")
        when = int(self.wall_clock()) if receive_time is None else receive_time
        if shard is None:
            shards = self.logstore(project, logstore).shards.values()
            targets = [found for found in shards if not found.read_only]
        else:
            targets = [self.shard(project, logstore, shard)]
            if targets[0].read_only:
                raise parameter_invalid(f"shard {shard} is read-only: its end cursor is frozen")
        for target in targets:
            target.append(count, when)
        return targets

    def write_everywhere(self, count: int, receive_time: int) -> None:
        """Append `count` log groups to every read-write shard of every logstore."""
        for store in self.logstores.values():
            for shard in store.shards.values():
                if not shard.read_only:
                    shard.append(count, receive_time)

    # --- split and merge ------------------------------------------------------------------

    def split_shard(
        self, project: str, logstore: str, shard: int, *, key: str | None, count: int | None
    ) -> list[dict[str, object]]:
        """SplitShard: the ListShards entries of the parent (now read-only) and its children."""
        store = self.logstore(project, logstore)
        try:
            changed = split_shard(
                store.shards, shard, key=key, count=count, create_time=int(self.wall_clock())
            )
        except LineageError as exc:
            raise parameter_invalid(str(exc)) from exc
        children = [child.shard_id for child in changed[1:]]
        self._shard_event("split", store, shard, children=children)
        return [entry.listing() for entry in changed]

    def merge_shards(self, project: str, logstore: str, shard: int) -> list[dict[str, object]]:
        """MergeShards: the ListShards entries of the child, then of the two (read-only) parents."""
        store = self.logstore(project, logstore)
        try:
            changed = merge_shards(store.shards, shard, create_time=int(self.wall_clock()))
        except LineageError as exc:
            raise parameter_invalid(str(exc)) from exc
        child, *parents = changed
        self._shard_event(
            "merge", store, shard, parents=[p.shard_id for p in parents], children=[child.shard_id]
        )
        return [entry.listing() for entry in changed]

    def _shard_event(self, kind: str, store: Logstore, shard: int, **fields: object) -> None:
        self._shard_event_count += 1
        self.shard_events.append(
            {
                "seq": self._shard_event_count,
                "event": kind,
                "logstore": f"{store.project}/{store.name}",
                "shard": shard,
                **fields,
            }
        )

    # --- introspection --------------------------------------------------------------------

    def count_request(self, api: str, code: str) -> None:
        self.requests[api][code] += 1

    def snapshot(self) -> dict[str, Any]:
        """The body of GET /_emulator/state."""
        checkpoints: dict[str, str] = {}
        consumers: dict[str, dict[str, list[int]]] = {}
        for (project, logstore), store in sorted(self.logstores.items()):
            for name, group in sorted(store.groups.items()):
                for shard, stored in sorted(group.checkpoints.items()):
                    checkpoints[checkpoint_key(project, logstore, name, shard)] = stored.checkpoint
                consumers[f"{project}/{logstore}/{name}"] = self.assignments(
                    project, logstore, name
                )
        return {
            "checkpoints": checkpoints,
            "history": {key: list(values) for key, values in sorted(self.history.items())},
            "requests": {api: dict(codes) for api, codes in sorted(self.requests.items())},
            "consumers": consumers,
            "late_pending": self.late_pending,
            "shards": self._shards_snapshot(),
            "shard_events": list(self.shard_events),
        }

    def _shards_snapshot(self) -> dict[str, dict[str, object]]:
        """ "PROJECT/LOGSTORE/SHARD" -> status and cursors, for /_emulator/state."""
        return {
            f"{project}/{logstore}/{number}": {
                "status": shard.status,
                "begin": shard.begin_cursor,
                "end": shard.end_cursor,
            }
            for (project, logstore), store in sorted(self.logstores.items())
            for number, shard in sorted(store.shards.items())
        }

    # --- persistence ----------------------------------------------------------------------

    def to_json(self) -> dict[str, object]:
        """Logstores, groups, checkpoints and history (not consumers: they must heartbeat again)."""
        stores: list[dict[str, object]] = []
        for store in self.logstores.values():
            groups = [_group_json(group) for group in store.groups.values()]
            stores.append(
                {
                    "project": store.project,
                    "logstore": store.name,
                    "shards": store.shard_count,
                    "createTime": store.create_time,
                    "groups": groups,
                    "lineage": [_lineage_json(shard) for shard in store.shards.values()],
                }
            )
        return {"version": STATE_FILE_VERSION, "logstores": stores, "history": dict(self.history)}

    def load_json(self, data: object) -> None:
        """Restore what `to_json` wrote; a logstore already declared keeps its declared shards."""
        try:
            _load_state(self, data)
        except (KeyError, TypeError, ValueError, AttributeError, ApiError) as exc:
            raise ConfigError([f"state file: unreadable content ({exc})"]) from exc

    def save_file(self, path: Path) -> None:
        """Write the state atomically (temporary file, fsync, rename)."""
        temporary = path.with_name(path.name + ".tmp")
        with temporary.open("w", encoding="utf-8") as handle:
            json.dump(self.to_json(), handle, indent=1, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)

    def load_file(self, path: Path) -> None:
        """Load a state file written by `save_file`; a missing file means a first start."""
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        except OSError as exc:
            raise ConfigError([f"state file {path}: {exc.strerror}"]) from exc
        try:
            data = json.loads(text)
        except ValueError as exc:
            raise ConfigError([f"state file {path}: not JSON ({exc})"]) from exc
        self.load_json(data)


def _checkpoint_entry(shard: int, stored: StoredCheckpoint | None) -> dict[str, object]:
    if stored is None:
        return {"shard": shard, "checkpoint": "", "updateTime": 0, "consumer": ""}
    return {
        "shard": shard,
        "checkpoint": stored.checkpoint,
        "updateTime": stored.update_time_us,
        "consumer": stored.consumer,
    }


def _group_json(group: ConsumerGroup) -> dict[str, object]:
    return {
        "name": group.name,
        "timeout": group.timeout,
        "order": group.order,
        "finished": sorted(group.finished),
        "checkpoints": {
            str(shard): {
                "checkpoint": stored.checkpoint,
                "updateTime": stored.update_time_us,
                "consumer": stored.consumer,
            }
            for shard, stored in group.checkpoints.items()
        },
    }


def _lineage_json(shard: Shard) -> dict[str, object]:
    return {**shard.listing(), "parents": list(shard.parents), "end": shard.end}


def _load_lineage(store: Logstore, entries: list[dict[str, Any]] | None) -> None:
    """Shards split or merged before the state was saved, when the logstore still has the shard
    count it was saved with. Their data is not kept: each restarts empty at its saved end."""
    if not entries or len(store.shards) != store.shard_count:
        return
    for entry in entries:
        shard = Shard(
            int(entry["shardID"]),
            str(entry["inclusiveBeginKey"]),
            str(entry["exclusiveEndKey"]),
            int(entry["createTime"]),
            status="readonly" if entry["status"] == "readonly" else "readwrite",
            parents=tuple(int(parent) for parent in entry["parents"]),
            begin=int(entry["end"]),
            end=int(entry["end"]),
        )
        store.shards[shard.shard_id] = shard


def _load_state(state: EmulatorState, data: object) -> None:
    if not isinstance(data, dict) or data.get("version") != STATE_FILE_VERSION:
        raise ValueError(f"expected an object with version {STATE_FILE_VERSION}")
    for entry in data["logstores"]:
        project, name = str(entry["project"]), str(entry["logstore"])
        store = state.logstores.get((project, name))
        if store is None:
            store = state.add_logstore(project, name, int(entry["shards"]))
            store.create_time = int(entry["createTime"])
            store.shards = initial_shards(store.shard_count, store.create_time)
        _load_lineage(store, entry.get("lineage"))
        for group_data in entry["groups"]:
            group_name = str(group_data["name"])
            group = store.groups.get(group_name)
            if group is None:
                timeout = int(group_data["timeout"])
                group = state.create_group(project, name, group_name, timeout=timeout)
            group.order = bool(group_data["order"])
            group.finished = {int(s) for s in group_data.get("finished", ())} & store.shards.keys()
            for shard, stored in group_data["checkpoints"].items():
                if int(shard) in store.shards:
                    group.checkpoints[int(shard)] = StoredCheckpoint(
                        str(stored["checkpoint"]),
                        int(stored["updateTime"]),
                        str(stored["consumer"]),
                    )
    for key, values in data["history"].items():
        state.history[str(key)] = [str(value) for value in values]
