"""ShardEnds on its own, over a scripted SLS: one listing per group at a time, end cursors read
once and kept, and what it says while it does not know."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Literal

import pytest

from cpmgr.config import parse_config
from cpmgr.errors import SLSError
from cpmgr.shard_ends import EndUnknown, ShardEnds
from cpmgr.sls.client import ShardInfo

GROUP = parse_config(
    {
        "socket": {"path": "/tmp/unused.sock"},
        "sls": {"endpoint": "http://127.0.0.1:1", "access_key_id": "k", "access_key_secret": "s"},
        "groups": [
            {"name": "orders", "project": "p", "logstore": "l", "consumer_group": "cg"},
        ],
    },
    {},
).groups[0]


def info(shard: int, status: str = "readwrite") -> ShardInfo:
    return ShardInfo(shard, status, "0" * 32, "f" * 32, 0)


class ScriptedSLS:
    """ListShards answers `listing`; GetCursor(end) answers `ends` (or fails for `failing`)."""

    def __init__(self) -> None:
        self.listing: list[ShardInfo] = []
        self.ends: dict[int, str] = {}
        self.failing: set[int] = set()
        self.calls: list[str] = []
        self.gate: asyncio.Event | None = None

    async def list_shards(
        self, project: str, logstore: str, *, endpoint: str | None = None, region: str | None = None
    ) -> list[ShardInfo]:
        self.calls.append("ListShards")
        if self.gate is not None:
            await self.gate.wait()
        return list(self.listing)

    async def get_cursor(
        self,
        project: str,
        logstore: str,
        shard: int,
        start: Literal["begin", "end"] | int,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> str:
        assert start == "end"
        self.calls.append(f"GetCursor {shard}")
        if shard in self.failing:
            raise SLSError("ServerBusy", 503, "busy")
        return self.ends[shard]


def make(sls: ScriptedSLS) -> tuple[ShardEnds, list[tuple[str, dict[int, str]]]]:
    found: list[tuple[str, dict[int, str]]] = []

    def on_read_only(group: str, ends: Mapping[int, str]) -> None:
        found.append((group, dict(ends)))

    ends = ShardEnds(api=sls, cursor_calls=asyncio.Semaphore(2), on_read_only=on_read_only)
    return ends, found


async def test_unknown_until_listed_then_read_only_shards_have_their_end() -> None:
    sls = ScriptedSLS()
    ends, found = make(sls)
    with pytest.raises(EndUnknown):
        ends.end_of("orders", 0)
    sls.listing = [info(0, "readonly"), info(1), info(2)]
    sls.ends = {0: "MTAw"}
    await ends.refresh(GROUP)
    assert (ends.end_of("orders", 0), ends.end_of("orders", 1)) == ("MTAw", None)
    assert found == [("orders", {0: "MTAw"})]
    await ends.refresh(GROUP)  # the end is frozen: never read again, never reported again
    assert sls.calls == ["ListShards", "GetCursor 0", "ListShards"]
    assert found == [("orders", {0: "MTAw"})]


async def test_callers_share_one_listing() -> None:
    sls = ScriptedSLS()
    sls.listing = [info(0)]
    sls.gate = asyncio.Event()
    ends, _ = make(sls)
    waiting = [asyncio.create_task(ends.refresh(GROUP)) for _ in range(5)]
    await asyncio.sleep(0)
    sls.gate.set()
    await asyncio.gather(*waiting)
    assert sls.calls == ["ListShards"]


async def test_an_end_that_could_not_be_read_is_asked_for_at_the_next_listing() -> None:
    sls = ScriptedSLS()
    sls.listing = [info(0, "readonly"), info(1, "readonly")]
    sls.ends = {0: "MTAw", 1: "MjAw"}
    sls.failing = {1}
    ends, found = make(sls)
    await ends.refresh(GROUP)  # the listing itself succeeded
    assert ends.end_of("orders", 0) == "MTAw"
    with pytest.raises(EndUnknown):
        ends.end_of("orders", 1)  # read-only, but where it ends is not known: not "read-write"
    sls.failing = set()
    await ends.refresh(GROUP)
    assert ends.end_of("orders", 1) == "MjAw"
    assert found == [("orders", {0: "MTAw"}), ("orders", {1: "MjAw"})]


async def test_a_failed_listing_fails_its_callers_and_the_next_one_tries_again() -> None:
    sls = ScriptedSLS()
    ends, _ = make(sls)

    async def refused(*args: object, **kwargs: object) -> list[ShardInfo]:
        raise SLSError("Unauthorized", 401, "no")

    sls.list_shards = refused  # type: ignore[method-assign]
    with pytest.raises(SLSError):
        await ends.refresh(GROUP)
    assert not ends.listed_since("orders", 0.0)
    del sls.list_shards
    sls.listing = [info(0)]
    await ends.refresh(GROUP)
    assert ends.listed_since("orders", 0.0) and ends.end_of("orders", 0) is None
