"""What `wait` and `flush` callers learn: shared by the committer that produces it and the
socket side that answers with it (no I/O)."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TIMED_OUT", "CommitOutcome", "FlushResult", "ShardFailure"]


@dataclass(frozen=True)
class CommitOutcome:
    """What a `wait` caller learns about its value."""

    ok: bool
    code: str = ""
    message: str = ""
    dropped: bool = False


TIMED_OUT = CommitOutcome(ok=False, code="Timeout", message="value still pending", dropped=False)


@dataclass(frozen=True)
class ShardFailure:
    """One shard a flush could not commit."""

    group: str
    shard: int
    code: str
    message: str
    dropped: bool


@dataclass(frozen=True)
class FlushResult:
    """What a flush achieved."""

    committed: int
    failed: tuple[ShardFailure, ...] = ()
    timed_out: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.timed_out
