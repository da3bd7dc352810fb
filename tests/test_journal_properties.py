"""Whatever the names and values, and wherever a log is cut or a byte flipped, replay restores
exactly the records that are intact, and a second restart restores the same."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cpmgr.journal import LOG_NAME, Journal, ShardRecord

Key = tuple[str, int]
Op = tuple[str, str, int, str, str | None]  # kind ("a" accepted, "c" committed), group, ...

names = st.sampled_from(["g", "a\nb", 'q"\\', "\u2028"]) | st.text(max_size=4)
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a", "a", "c"]),
        names,
        st.integers(0, 3),
        st.text(min_size=1, max_size=6),
        st.none() | names,
    ),
    max_size=12,
)


def model(ops: list[Op]) -> dict[Key, ShardRecord]:
    shards: dict[Key, ShardRecord] = {}
    for kind, group, shard, checkpoint, consumer in ops:
        prev = shards.get((group, shard))
        if kind == "a":
            committed = prev.committed if prev else None
            shards[(group, shard)] = ShardRecord(group, shard, checkpoint, consumer, committed)
        elif prev is None:
            shards[(group, shard)] = ShardRecord(group, shard, checkpoint, None, checkpoint)
        else:
            shards[(group, shard)] = ShardRecord(
                group, shard, prev.latest, prev.consumer, checkpoint
            )
    return shards


async def write(directory: Path, ops: list[Op]) -> None:
    journal = Journal(directory, fsync="never", compact_bytes=1 << 30)
    journal.open()
    for kind, group, shard, checkpoint, consumer in ops:
        if kind == "a":
            await journal.record_accepted([(group, shard, checkpoint, consumer)])
        else:
            journal.record_committed(group, shard, checkpoint)
    await journal.close()


async def restart(directory: Path) -> dict[Key, ShardRecord]:
    journal = Journal(directory, fsync="never")
    try:
        return {(r.group, r.shard): r for r in journal.open()}
    finally:
        await journal.close()


def line_spans(raw: bytes) -> list[tuple[int, int]]:
    spans, start = [], 0
    for line in raw.splitlines(keepends=True):
        spans.append((start, start + len(line)))
        start += len(line)
    return spans


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy, data=st.data())
def test_a_log_cut_anywhere_keeps_the_records_before_the_cut(
    ops: list[Op], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        asyncio.run(write(directory, ops))
        log = directory / LOG_NAME
        raw = log.read_bytes()
        spans = line_spans(raw)
        assert len(spans) == len(ops)  # one line per record, whatever the strings held
        cut = data.draw(st.integers(0, len(raw)), label="cut")
        log.write_bytes(raw[:cut])
        whole = sum(1 for _, end in spans if end <= cut)
        assert asyncio.run(restart(directory)) == model(ops[:whole])
        assert asyncio.run(restart(directory)) == model(ops[:whole])


@settings(max_examples=60, deadline=None)
@given(ops=ops_strategy.filter(bool), data=st.data())
def test_a_flipped_byte_loses_only_the_records_it_touches(
    ops: list[Op], data: st.DataObject
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        asyncio.run(write(directory, ops))
        log = directory / LOG_NAME
        raw = log.read_bytes()
        spans = line_spans(raw)
        pos = data.draw(st.integers(0, len(raw) - 1), label="position")
        flipped = raw[pos] ^ data.draw(st.integers(1, 255), label="xor")
        log.write_bytes(raw[:pos] + bytes([flipped]) + raw[pos + 1 :])
        hit = next(i for i, (start, end) in enumerate(spans) if start <= pos < end)
        # A lost newline glues the next line to the damaged one.
        lost = {hit, hit + 1} if raw[pos] == ord("\n") else {hit}
        expected = model([op for i, op in enumerate(ops) if i not in lost])
        assert asyncio.run(restart(directory)) == expected
        assert asyncio.run(restart(directory)) == expected
