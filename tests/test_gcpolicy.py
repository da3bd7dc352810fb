"""Nothing kept per shard is scanned by Python's cyclic garbage collector, whose full collections
hold the event loop for as long as they walk: at 100,000 shards an object per shard cost a
stall of about 100 ms. Counted, not timed: the objects the collector tracks must not grow with
the number of shards, whatever state the shards are in."""

from __future__ import annotations

import base64
import gc
import subprocess
import sys
import textwrap
from pathlib import Path

from cpmgr.journal import Journal
from cpmgr.store import CheckpointStore, ErrorInfo

SHARDS = 20_000
# Far below one tracked object per shard; room for what the test run itself allocates.
ALLOWED = 1_000


def cp(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


def tracked() -> int:
    """Objects the collector tracks, after a collection (which stops tracking plain tuples)."""
    gc.collect()
    return len(gc.get_objects())


def largest_walk() -> int:
    """The most objects one tracked object makes a collection visit (a dict: keys and values):
    a table with an entry per shard is walked by every full collection too."""
    gc.collect()
    return max(len(gc.get_referents(obj)) for obj in gc.get_objects())


def test_the_store_tracks_nothing_per_shard_in_any_state() -> None:
    before = tracked()
    store = CheckpointStore(["orders"])
    for shard in range(SHARDS):
        store.accept("orders", shard, cp(1_000 + shard), consumer="c-1")
    attempts = store.snapshot(group="orders")  # every shard in flight
    for attempt in attempts[: SHARDS // 2]:
        store.on_success(attempt, at=1.0)
    error = ErrorInfo("ServerBusy", "slow down", 2.0)
    for attempt in attempts[SHARDS // 2 :]:
        store.on_retryable_failure(attempt, error)
    for shard in range(SHARDS // 2):  # committed, and a newer value pending again
        store.accept("orders", shard, cp(5_000 + shard))
    del attempts  # what the committer holds while it sends them, one per request in flight
    assert store.tracked_count("orders") == SHARDS
    assert tracked() - before < ALLOWED
    assert largest_walk() < SHARDS


async def test_the_journal_tracks_nothing_per_shard(tmp_path: Path) -> None:
    journal = Journal(tmp_path / "state", fsync="never")
    journal.open()
    await journal.start()
    try:
        before = tracked()
        for start in range(0, SHARDS, 1_000):
            entries = [("orders", s, cp(1_000 + s), None) for s in range(start, start + 1_000)]
            await journal.record_accepted(entries)
        for shard in range(0, SHARDS, 2):
            journal.record_committed("orders", shard, cp(1_000 + shard))
        await journal.compact()
        assert tracked() - before < ALLOWED
        assert largest_walk() < SHARDS
    finally:
        await journal.close()
    reopened = Journal(tmp_path / "state")
    records = reopened.open()
    await reopened.close()
    assert len(records) == SHARDS
    assert sum(1 for r in records if r.committed == r.latest) == SHARDS // 2


def test_freeze_startup_leaves_later_garbage_to_the_collector() -> None:
    """What start-up built is no longer scanned; a cycle that becomes garbage later still is
    collected."""
    script = textwrap.dedent(
        """
        import gc, weakref
        from cpmgr.gcpolicy import freeze_startup

        class Node:
            pass

        built_at_startup = [Node() for _ in range(1000)]
        freeze_startup()
        assert gc.get_freeze_count() >= 1000, gc.get_freeze_count()
        assert len(gc.get_objects()) < 1000, len(gc.get_objects())
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b
        gc.collect()
        assert gone() is None
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
