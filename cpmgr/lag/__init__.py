"""Consumer lag (docs/operations.md "Consumer lag"): how far each group is
behind at SLS, in log groups and seconds, and which shards are lagging or stalled."""

from __future__ import annotations

from cpmgr.lag.model import GroupLag, LagState, ShardLag, Thresholds, classify
from cpmgr.lag.reader import LAG_CONCURRENCY, LagAPI, LagObserver, LagReader

__all__ = [
    "LAG_CONCURRENCY",
    "GroupLag",
    "LagAPI",
    "LagObserver",
    "LagReader",
    "LagState",
    "ShardLag",
    "Thresholds",
    "classify",
]
