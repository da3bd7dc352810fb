"""The typed socket requests (docs/protocol.md) that protocol.parse_request() returns, the
refusal that carries a request's id, and the number a checkpoint's cursor encodes. No I/O."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import ClassVar, Final, Literal, overload

from cpmgr.errors import ProtocolError

__all__ = [
    "MAX_SHARD",
    "NO_ID",
    "AssignmentRequest",
    "CommitItem",
    "CommitRequest",
    "FlushRequest",
    "GetRequest",
    "ItemColumns",
    "JoinRequest",
    "JsonScalar",
    "LeaveRequest",
    "MembersRequest",
    "MembershipRequest",
    "Op",
    "PingRequest",
    "ReleaseRequest",
    "Request",
    "RequestError",
    "RequestId",
    "StatusRequest",
    "cursor_number",
    "decode_cursor",
    "item_consumers",
    "item_shards",
    "with_consumer",
]

JsonScalar = str | int | float | bool | None
Op = Literal[
    "commit", "flush", "get", "status", "ping", "join", "release", "leave", "assignment", "members"
]

MAX_SHARD: Final = 2**31 - 1  # SLS shard ids are 32-bit

# Longest decimal cursor turned into an int; beyond it Python's int parsing gets slow (and
# refuses past 4300 digits), and no real cursor comes close.
_MAX_CURSOR_DIGITS: Final = 256


@dataclass(frozen=True, slots=True)
class RequestId:
    """The `id` of a request, if it had one (`present` tells `"id": null` from no `id`)."""

    value: JsonScalar = None
    present: bool = False

    @classmethod
    def of(cls, value: JsonScalar) -> RequestId:
        return cls(value, True)


NO_ID: Final = RequestId()


class RequestError(ProtocolError):
    """A refused request, with the `id` to echo and any extra answer fields.

    `error_fields` go inside the answer's `error` object (e.g. `dropped`), `fields` at its top
    level (e.g. `committed` and `failed` for `flush`).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: RequestId = NO_ID,
        error_fields: Mapping[str, object] | None = None,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.request_id = request_id
        self.error_fields: Mapping[str, object] = dict(error_fields or {})
        self.fields: Mapping[str, object] = dict(fields or {})


# CommitItem and CommitRequest are built for every commit line: plain slots dataclasses, since
# a frozen one costs three times as much to build (object.__setattr__ per field). Treat them
# as immutable all the same.
@dataclass(slots=True)
class CommitItem:
    """One checkpoint of a commit; `consumer` None means the group's default consumer."""

    shard: int
    checkpoint: str
    consumer: str | None = None
    # Position in a batch's `checkpoints` as sent, for error messages (not part of the value).
    index: int = field(default=0, compare=False)
    # decode_cursor(checkpoint), worked out once here so the store and ingest need not decode
    # it again; filled in when not given.
    number: int | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.number is None:
            self.number = decode_cursor(self.checkpoint)


class ItemColumns(Sequence[CommitItem]):
    """The items of a batch as parallel lists (item i is `shards[i]`, `checkpoints[i]`, ...).

    A batch of 100 checkpoints in the common shape is read and accepted column by column,
    without an object per item: building a CommitItem per item cost about as much as parsing
    the line. Read as a sequence, it builds its CommitItems once, on first use, and compares
    equal to any sequence of equal items. Treat it as immutable.
    """

    __slots__ = (
        "_distinct",
        "_items",
        "checkpoints",
        "consumers",
        "numbers",
        "positions",
        "shards",
    )

    def __init__(
        self,
        shards: list[int],
        checkpoints: list[str],
        numbers: list[int | None],
        consumers: list[str | None],
        positions: Sequence[int] | None = None,
        *,
        distinct: bool | None = None,
    ) -> None:
        self.shards = shards
        self.checkpoints = checkpoints
        self.numbers = numbers  # decode_cursor() of each checkpoint
        self.consumers = consumers
        # Each item's index in `checkpoints` as sent, for error messages.
        self.positions: Sequence[int] = range(len(shards)) if positions is None else positions
        self._items: tuple[CommitItem, ...] | None = None
        self._distinct = distinct  # whether no shard is there twice; None: not known yet

    def distinct(self) -> bool:
        """Whether every item is of another shard."""
        if self._distinct is None:
            self._distinct = len(set(self.shards)) == len(self.shards)
        return self._distinct

    def as_tuple(self) -> tuple[CommitItem, ...]:
        if self._items is None:
            self._items = tuple(
                map(
                    CommitItem,
                    self.shards,
                    self.checkpoints,
                    self.consumers,
                    self.positions,
                    self.numbers,
                )
            )
        return self._items

    def __len__(self) -> int:
        return len(self.shards)

    @overload
    def __getitem__(self, index: int) -> CommitItem: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[CommitItem, ...]: ...
    def __getitem__(self, index: int | slice) -> CommitItem | tuple[CommitItem, ...]:
        return self.as_tuple()[index]

    def __iter__(self) -> Iterator[CommitItem]:
        return iter(self.as_tuple())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ItemColumns | tuple | list):
            return self.as_tuple() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]  # like a list: equal to tuples, not hashable

    def __repr__(self) -> str:
        return f"ItemColumns({self.as_tuple()!r})"


def item_shards(items: Sequence[CommitItem]) -> list[int]:
    """The shard of each item (read off the column, for a batch read as columns)."""
    return items.shards if isinstance(items, ItemColumns) else [item.shard for item in items]


def item_consumers(items: Sequence[CommitItem]) -> list[str | None]:
    """The consumer of each item (read off the column, for a batch read as columns)."""
    if isinstance(items, ItemColumns):
        return items.consumers
    return [item.consumer for item in items]


def with_consumer(items: Sequence[CommitItem], consumer: str) -> Sequence[CommitItem]:
    """The same items, each of `consumer`; a batch read as columns stays columns."""
    if isinstance(items, ItemColumns):
        return ItemColumns(
            items.shards,
            items.checkpoints,
            items.numbers,
            [consumer] * len(items),
            items.positions,
            distinct=items.distinct(),
        )
    return tuple(CommitItem(i.shard, i.checkpoint, consumer, i.index, i.number) for i in items)


@dataclass(slots=True)
class CommitRequest:
    """`commit`, single (`batch` False, one item) or batch (`checkpoints`, shards distinct)."""

    op: ClassVar[Op] = "commit"
    group: str
    items: Sequence[CommitItem]
    batch: bool = False
    force: bool = False
    wait: bool = False
    timeout: float | None = None
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """`flush` of one group, or of all groups when `group` is None."""

    op: ClassVar[Op] = "flush"
    group: str | None = None
    timeout: float | None = None
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class GetRequest:
    """`get` of one shard, or of every shard of the group when `shard` is None."""

    op: ClassVar[Op] = "get"
    group: str
    shard: int | None = None
    remote: bool = False
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """`status`."""

    op: ClassVar[Op] = "status"
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class PingRequest:
    """`ping`."""

    op: ClassVar[Op] = "ping"
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class JoinRequest:
    """`join`: the connection becomes `consumer`, a member of a membership group."""

    op: ClassVar[Op] = "join"
    group: str
    consumer: str
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """`release`: hand a shard back once its newest value is committed."""

    op: ClassVar[Op] = "release"
    group: str
    shard: int
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class LeaveRequest:
    """`leave`: release every shard, then end the membership."""

    op: ClassVar[Op] = "leave"
    group: str
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class AssignmentRequest:
    """`assignment`: the shards this connection's member holds in a group."""

    op: ClassVar[Op] = "assignment"
    group: str
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class MembersRequest:
    """`members`: every member on this daemon, of one group or all."""

    op: ClassVar[Op] = "members"
    group: str | None = None
    request_id: RequestId = NO_ID


MembershipRequest = JoinRequest | ReleaseRequest | LeaveRequest | AssignmentRequest | MembersRequest
Request = (
    CommitRequest | FlushRequest | GetRequest | StatusRequest | PingRequest | MembershipRequest
)


def decode_cursor(checkpoint: str) -> int | None:
    """The decimal number a checkpoint encodes, or None if it does not encode one."""
    try:
        raw = base64.b64decode(checkpoint, validate=True)
    except (binascii.Error, ValueError):
        return None
    return cursor_number(raw)


def cursor_number(raw: bytes) -> int | None:
    """The number of a cursor's decoded bytes: ASCII decimal digits only, at most 256 of them."""
    # isdigit() on bytes means ASCII digits only; int() would also take "_", spaces and signs.
    if not raw or len(raw) > _MAX_CURSOR_DIGITS or not raw.isdigit():
        return None
    return int(raw)
