"""What a member holds, kept from its events and answers; what both member shells show of it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from cpmgr.client.core import Received, Reply
from cpmgr.client.events import DISCONNECTED, Assigned, Ended, Lost, MemberEvent, Revoked

__all__ = ["MemberState", "MemberView"]

ShardState = Literal["held", "releasing"]


class MemberState:
    """The shards one member holds, kept from its events and its answers, in arrival order.

    Both shells apply every event and reply here as it is read, before any caller sees it, so
    a shard assigned again right after its release is never dropped by the late release answer.
    """

    def __init__(self, group: str, consumer: str) -> None:
        self.group = group
        self.consumer = consumer
        self.shards: dict[int, ShardState] = {}
        self.ended = False

    def observe(self, item: Received) -> MemberEvent | None:
        """Apply a reply or an event read on the joined connection; the event to pass on."""
        if isinstance(item, Reply):
            self.on_answer(item.payload, item.answer)
            return None
        self.on_event(item)
        return item

    def on_event(self, event: MemberEvent) -> None:
        """Apply one event the daemon sent."""
        if isinstance(event, Assigned):
            self.shards[event.shard] = "held"
        elif isinstance(event, Revoked) and event.shard in self.shards:
            self.shards[event.shard] = "releasing"
        elif isinstance(event, Ended):
            self.shards.pop(event.shard, None)
        elif isinstance(event, Lost):
            for shard in event.shards:
                self.shards.pop(shard, None)

    def on_answer(self, payload: Mapping[str, object], answer: Mapping[str, Any]) -> None:
        """Apply a successful `release` or `leave` answered on the joined connection."""
        if answer.get("ok") is not True:
            return
        shard = payload.get("shard")
        if payload.get("op") == "release" and isinstance(shard, int):
            self.shards.pop(shard, None)
        elif payload.get("op") == "leave":
            self.shards.clear()
            self.ended = True

    def disconnected(self) -> Lost:
        """The joined connection dropped: every shard is lost and the membership is over."""
        shards = tuple(sorted(self.shards))
        self.shards.clear()
        self.ended = True
        raw = {
            "event": "lost",
            "group": self.group,
            "consumer": self.consumer,
            "shards": list(shards),
            "reason": DISCONNECTED,
        }
        return Lost(
            group=self.group, consumer=self.consumer, shards=shards, reason=DISCONNECTED, raw=raw
        )


class MemberView:
    """What both member shells show of their state."""

    _state: MemberState

    @property
    def group(self) -> str:
        return self._state.group

    @property
    def consumer(self) -> str:
        return self._state.consumer

    @property
    def shards(self) -> dict[int, str]:
        """The shards held ("held" or "releasing"), as the events so far say."""
        return dict(self._state.shards)

    @property
    def ended(self) -> bool:
        """Whether the membership is over (left, closed, or its connection dropped)."""
        return self._state.ended
