"""Membership events as typed objects.

The daemon writes an event line (an `event` field, no `ok` field) on a joined connection as
soon as something happens to the member's shards (docs/protocol.md, "Membership"). Kinds this
client does not know yet arrive as `OtherEvent`: they are passed on, never dropped.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, TypedDict

__all__ = [
    "Assigned",
    "Ended",
    "Lost",
    "MemberEvent",
    "OtherEvent",
    "Revoked",
    "parse_event",
]

# Not a reason the daemon sends: the client's own for "the joined connection dropped".
DISCONNECTED: Final = "disconnected"


@dataclass(frozen=True, slots=True, kw_only=True)
class _OwnEvent:
    """An event about the member's own shards."""

    group: str
    consumer: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class Assigned(_OwnEvent):
    """Start reading `shard` at `checkpoint` (SLS's checkpoint, or the configured start)."""

    kind: ClassVar[Literal["assigned"]] = "assigned"
    shard: int
    checkpoint: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Revoked(_OwnEvent):
    """Stop reading `shard`, commit its last checkpoint, then `release` it within `deadline` s."""

    kind: ClassVar[Literal["revoked"]] = "revoked"
    shard: int
    reason: str
    deadline: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Ended(_OwnEvent):
    """A read-only shard was read to its end and finished at SLS; it is released."""

    kind: ClassVar[Literal["ended"]] = "ended"
    shard: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Lost(_OwnEvent):
    """The shards are already gone: stop reading them at once.

    `reason` is the daemon's (`heartbeat_lost`, `not_owner`, `expired`), or `disconnected`
    when the client saw the joined connection drop (every shard it held, and the membership
    is over: join again).
    """

    kind: ClassVar[Literal["lost"]] = "lost"
    shards: tuple[int, ...]
    reason: str


@dataclass(frozen=True, slots=True)
class OtherEvent:
    """An event kind this client does not know: passed on as the daemon sent it."""

    kind: str
    raw: Mapping[str, Any] = field(repr=False, compare=False)


MemberEvent = Assigned | Revoked | Ended | Lost | OtherEvent


def parse_event(obj: Mapping[str, Any]) -> MemberEvent:
    """The typed event for one event line; ValueError if a known kind lacks its fields."""
    kind = obj.get("event")
    try:
        if kind == "assigned":
            return Assigned(
                **_own(obj), shard=_shard(obj["shard"]), checkpoint=_text(obj["checkpoint"])
            )
        if kind == "revoked":
            return Revoked(
                **_own(obj),
                shard=_shard(obj["shard"]),
                reason=_text(obj["reason"]),
                deadline=_number(obj["deadline"]),
            )
        if kind == "ended":
            return Ended(**_own(obj), shard=_shard(obj["shard"]))
        if kind == "lost":
            shards = tuple(_shard(s) for s in obj["shards"])
            return Lost(**_own(obj), shards=shards, reason=_text(obj["reason"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the daemon sent a malformed {kind} event: {dict(obj)!r}") from exc
    return OtherEvent(str(kind), obj)


class _Own(TypedDict):
    group: str
    consumer: str
    raw: Mapping[str, Any]


def _own(obj: Mapping[str, Any]) -> _Own:
    return {"group": _text(obj["group"]), "consumer": _text(obj["consumer"]), "raw": obj}


def _text(value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(value)
    return value


def _shard(value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(value)
    return value


def _number(value: object) -> float:
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise TypeError(value)
    return float(value)
