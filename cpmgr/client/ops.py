"""Every operation once: the request it sends and how its answer becomes the method's result.

The blocking and asyncio shells each expose these as methods whose bodies only run a `Call`,
so an operation's fields and result are written in one place for both.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypedDict, TypeVar, Unpack

from cpmgr.client.core import Answer, strip_id

__all__ = [
    "Call",
    "Checkpoints",
    "CommitOptions",
    "MemberCommitOptions",
    "build_request",
]

T_co = TypeVar("T_co", covariant=True)  # a Call[int] is a Call[object]
Checkpoints = Mapping[int, str] | Iterable[tuple[int, str] | tuple[int, str, str | None]]


class MemberCommitOptions(TypedDict, total=False):
    """`commit` options on a joined connection (the member names itself)."""

    force: bool  # allow a backwards move
    wait: bool  # answer once committed to SLS
    timeout: float | None  # for `wait`; the daemon's commit.wait_timeout if None


class CommitOptions(MemberCommitOptions, total=False):
    """`commit` options: the member's, and the consumer name sent to SLS."""

    consumer: str | None


@dataclass(frozen=True, slots=True)
class Call(Generic[T_co]):
    """One request, and how its successful answer becomes the result."""

    payload: Mapping[str, object]
    result: Callable[[Answer], T_co]


def build_request(op: str, **fields: object) -> dict[str, object]:
    """A request object; None and False options are left out (they are the defaults)."""
    payload: dict[str, object] = {"op": op}
    payload.update({k: v for k, v in fields.items() if v is not None and v is not False})
    return payload


def _nothing(answer: Answer) -> None:
    return None


def _count(key: str) -> Callable[[Answer], int]:
    return lambda answer: int(answer[key])


def _entries(key: str) -> Callable[[Answer], list[Answer]]:
    return lambda answer: list(answer[key])


def commit(group: str, shard: int, checkpoint: str, **options: Unpack[CommitOptions]) -> Call[None]:
    """One checkpoint."""
    payload = build_request("commit", group=group, shard=shard, checkpoint=checkpoint, **options)
    return Call(payload, _nothing)


def commit_many(
    group: str, checkpoints: Checkpoints, **options: Unpack[CommitOptions]
) -> Call[int]:
    """An all-or-nothing batch; the result is how many shards were accepted."""
    payload = build_request("commit", group=group, checkpoints=batch_items(checkpoints), **options)
    return Call(payload, _count("accepted"))


def batch_items(checkpoints: Checkpoints) -> list[dict[str, object]]:
    """{shard: checkpoint}, or (shard, checkpoint[, consumer]) tuples, as batch items."""
    pairs: Iterable[tuple[Any, ...]]
    pairs = checkpoints.items() if isinstance(checkpoints, Mapping) else checkpoints
    items: list[dict[str, object]] = []
    for entry in pairs:
        item: dict[str, object] = {"shard": entry[0], "checkpoint": entry[1]}
        if len(entry) > 2 and entry[2] is not None:
            item["consumer"] = entry[2]
        items.append(item)
    return items


def flush(group: str | None = None, *, timeout: float | None = None) -> Call[int]:
    """Commit everything pending now; the result is how many shards were committed."""
    return Call(build_request("flush", group=group, timeout=timeout), _count("committed"))


def get(group: str, shard: int | None = None, *, remote: bool = False) -> Call[list[Answer]]:
    """The shards of a group (or one shard) as the daemon sees them."""
    return Call(build_request("get", group=group, shard=shard, remote=remote), _entries("shards"))


def status() -> Call[Answer]:
    """The daemon's status (version, uptime, per-group counts)."""
    return Call(build_request("status"), strip_id)


def ping() -> Call[None]:
    """Check the daemon answers."""
    return Call(build_request("ping"), _nothing)


def any_op(op: str, **fields: object) -> Call[Answer]:
    """Any request; the result is its answer without `id`."""
    return Call(build_request(op, **fields), strip_id)


def members(group: str | None = None) -> Call[list[Answer]]:
    """Every member on the daemon (of one group) that this peer may see."""
    return Call(build_request("members", group=group), _entries("members"))


def join(group: str, consumer: str) -> Call[Answer]:
    """Make the connection a member of a membership group."""
    return Call(build_request("join", group=group, consumer=consumer), strip_id)


def release(group: str, shard: int) -> Call[str | None]:
    """Hand a held shard back; the result is its final checkpoint, settled at SLS."""
    return Call(build_request("release", group=group, shard=shard), _final_checkpoint)


def _final_checkpoint(answer: Answer) -> str | None:
    value = answer.get("checkpoint")
    return value if isinstance(value, str) else None


def leave(group: str) -> Call[int]:
    """Release every shard, then end the membership; the result is how many were released."""
    return Call(build_request("leave", group=group), _count("released"))


def assignment(group: str) -> Call[dict[int, str]]:
    """The member's shards as the daemon sees them: {shard: "held" | "releasing"}."""
    return Call(build_request("assignment", group=group), _shard_states)


def _shard_states(answer: Answer) -> dict[int, str]:
    return {int(entry["shard"]): str(entry["state"]) for entry in answer["shards"]}
