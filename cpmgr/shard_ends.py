"""Which shards of a membership group are read-only, and where each ends (CONTRACT section 7,
`ended`).

A shard turns read-only when it is split or merged, and its end cursor is then frozen: it is
read once (GetCursor `from=end`) and kept. Which shards are read-only comes from ListShards,
read by whoever needs it (one listing per group at a time, shared by every caller); GetCursor
calls share the bound membership puts on them.

Decisions where the contract is silent:
- A shard that is read-only stays so, with the same end: a listing never unlearns one.
- A listing that could not read some end cursor still succeeds; those shards are asked for
  again at the next listing, and until then `end_of` says it does not know.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from cpmgr.config import GroupConfig
from cpmgr.errors import SLSError
from cpmgr.sls.client import ShardReads

__all__ = ["EndUnknown", "ShardEnds"]

log = logging.getLogger(__name__)


class EndUnknown(LookupError):
    """The shard was not listed yet, or it is read-only and its end was not read yet."""


@dataclass(eq=False)
class _Group:
    seen: set[int] = field(default_factory=set)  # every shard a listing showed
    ends: dict[int, str] = field(default_factory=dict)  # read-only shards: their end cursor
    unread: set[int] = field(default_factory=set)  # read-only shards whose end is not known yet
    listed_at: float | None = None  # monotonic time the last good listing was asked for
    running: asyncio.Future[None] | None = None


class ShardEnds:
    """Per membership group: the read-only shards and their end cursors."""

    def __init__(
        self,
        *,
        api: ShardReads,
        cursor_calls: asyncio.Semaphore,
        on_read_only: Callable[[str, Mapping[int, str]], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._cursor_calls = cursor_calls
        self._on_read_only = on_read_only  # (group, {shard: end}) of shards newly known
        self._clock = clock
        self._groups: dict[str, _Group] = {}

    def end_of(self, group: str, shard: int) -> str | None:
        """The end cursor of a read-only shard, None for a read-write one; EndUnknown if the
        shard was never listed or its end could not be read yet."""
        known = self._groups.get(group)
        if known is None or shard not in known.seen or shard in known.unread:
            raise EndUnknown(f"group {group}: shard {shard} is not known yet")
        return known.ends.get(shard)

    def listed_since(self, group: str, when: float) -> bool:
        """Whether a listing asked for at or after `when` (monotonic) succeeded."""
        known = self._groups.get(group)
        return known is not None and known.listed_at is not None and known.listed_at >= when

    async def refresh(self, group: GroupConfig) -> None:
        """List the group's shards now (joining a listing in progress); SLSError if it failed."""
        known = self._groups.setdefault(group.name, _Group())
        if known.running is None or known.running.done():
            known.running = asyncio.ensure_future(self._list(group, known))
            known.running.add_done_callback(_retrieve)
        await asyncio.shield(known.running)

    async def close(self) -> None:
        for known in self._groups.values():
            if known.running is not None and not known.running.done():
                known.running.cancel()
                with contextlib.suppress(asyncio.CancelledError, SLSError):
                    await known.running

    async def _list(self, group: GroupConfig, known: _Group) -> None:
        asked = self._clock()
        shards = await self._api.list_shards(
            group.project, group.logstore, endpoint=group.endpoint, region=group.region
        )
        known.seen.update(shard.shard for shard in shards)
        known.unread.update(s.shard for s in shards if s.read_only and s.shard not in known.ends)
        learned = await self._read_ends(group, sorted(known.unread))
        known.unread.difference_update(learned)
        known.ends.update(learned)
        known.listed_at = asked
        if learned:
            log.info("group %s: read-only shard(s) %s", group.name, sorted(learned))
            self._on_read_only(group.name, learned)

    async def _read_ends(self, group: GroupConfig, shards: list[int]) -> dict[int, str]:
        found = await asyncio.gather(
            *(self._end_cursor(group, shard) for shard in shards), return_exceptions=True
        )
        learned: dict[int, str] = {}
        for shard, end in zip(shards, found, strict=True):
            if isinstance(end, str):
                learned[shard] = end
            elif isinstance(end, SLSError):
                log.warning("group %s: cannot read the end of shard %d: %s", group.name, shard, end)
            elif isinstance(end, BaseException):
                raise end
        return learned

    async def _end_cursor(self, group: GroupConfig, shard: int) -> str:
        async with self._cursor_calls:
            return await self._api.get_cursor(
                group.project,
                group.logstore,
                shard,
                "end",
                endpoint=group.endpoint,
                region=group.region,
            )


def _retrieve(listing: asyncio.Future[None]) -> None:
    # Its callers see a failure; when they all went away, nobody else needs to.
    if not listing.cancelled():
        listing.exception()
