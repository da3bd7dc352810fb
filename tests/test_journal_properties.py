"""Whatever the names and values, and wherever a log is cut or a byte flipped, replay restores
exactly the records that are intact, and a second restart restores the same."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import tempfile
from collections.abc import Collection
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from cpmgr.journal import LOG_NAME, Journal, ShardRecord
from cpmgr.journal.format import encode_accepted, encode_accepted_block
from cpmgr.journal.state import Committed, Shard, apply, public
from cpmgr.protocol import decode_cursor

Key = tuple[str, int]
Op = tuple[str, str, int, str, str | None]  # kind ("a" accepted, "c" committed), group, ...


def cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


names = st.sampled_from(["g", "a\nb", 'q"\\', "\u2028"]) | st.text(max_size=4)
ops_strategy = st.lists(
    st.tuples(
        st.sampled_from(["a", "a", "c"]),
        names,
        st.integers(0, 3),
        st.text(min_size=1, max_size=6) | st.integers(0, 9).map(cursor),
        st.none() | names,
    ),
    max_size=12,
)


def model(ops: list[Op], lost: Collection[int] = ()) -> dict[Key, ShardRecord]:
    """What replay restores from the records of `ops` not in `lost` (indices), by the rules:
    the last accepted value is the latest; a committed record sets the committed value, and
    also the latest if replay lacks the record that set the latest when it was written (when
    the committed value was older than that one: only if the value replay has is older)."""
    written: dict[int, tuple[int, bool]] = {}  # commit -> (index that set the latest, same)
    setter: dict[Key, tuple[int, str]] = {}
    for i, (kind, group, shard, checkpoint, _) in enumerate(ops):
        key = (group, shard)
        if kind == "a":
            setter[key] = (i, checkpoint)
        elif key in setter:
            written[i] = (setter[key][0], setter[key][1] == checkpoint)
        else:
            setter[key] = (i, checkpoint)
    shards: dict[Key, tuple[ShardRecord, int]] = {}
    for i, (kind, group, shard, checkpoint, consumer) in enumerate(ops):
        if i in lost:
            continue
        key = (group, shard)
        prev = shards.get(key)
        if kind == "a":
            committed = prev[0].committed if prev else None
            shards[key] = (ShardRecord(group, shard, checkpoint, consumer, committed), i)
        elif prev is None or replaced(prev, checkpoint, written.get(i)):
            shards[key] = (
                ShardRecord(group, shard, checkpoint, None, checkpoint),
                seq_of(i, written),
            )
        else:
            shards[key] = (dataclasses.replace(prev[0], committed=checkpoint), prev[1])
    return {key: record for key, (record, _) in shards.items()}


def seq_of(commit: int, written: dict[int, tuple[int, bool]]) -> int:
    """The seq of a latest value taken from committed record `commit`: the record it names when
    that set the same value; below it when that set a newer one, which replay lacks."""
    if commit not in written:
        return commit
    setter, same = written[commit]
    return setter if same else setter - 1


def replaced(prev: tuple[ShardRecord, int], checkpoint: str, at: tuple[int, bool] | None) -> bool:
    if at is None or prev[1] >= at[0]:
        return False
    if at[1]:
        return True
    ours, theirs = decode_cursor(prev[0].latest), decode_cursor(checkpoint)
    return ours is not None and theirs is not None and ours < theirs


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
        expected = model(ops, lost)
        assert asyncio.run(restart(directory)) == expected
        assert asyncio.run(restart(directory)) == expected


# A consumer's values only grow; the committer notes one of the values accepted so far.
increasing_ops = st.lists(
    st.tuples(st.sampled_from(["a", "c"]), st.just(0), st.integers(0, 2)), max_size=10
)


def as_ops(steps: list[tuple[str, int, int]]) -> list[Op]:
    """Accepts get ever larger values; a commit takes the `back`-th newest value of its shard."""
    ops: list[Op] = []
    accepted: dict[int, list[int]] = {}
    for i, (kind, shard, back) in enumerate(steps):
        if kind == "a":
            accepted.setdefault(shard, []).append(i + 1)
            ops.append(("a", "g", shard, cursor(i + 1), "c"))
        elif values := accepted.get(shard):
            ops.append(("c", "g", shard, cursor(values[max(0, len(values) - 1 - back)]), None))
    return ops


@settings(max_examples=150, deadline=None)
@given(
    steps=increasing_ops.filter(lambda steps: "a" in {kind for kind, _, _ in steps}), data=st.data()
)
def test_damaged_records_never_leave_a_value_older_than_a_committed_one_pending(
    steps: list[tuple[str, int, int]], data: st.DataObject
) -> None:
    ops = as_ops(steps)
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        asyncio.run(write(directory, ops))
        log = directory / LOG_NAME
        raw = bytearray(log.read_bytes())
        spans = line_spans(bytes(raw))
        damaged = data.draw(st.sets(st.sampled_from(range(len(spans))), max_size=2), "lines")
        for line in damaged:  # one byte of each, not its newline
            start, end = spans[line]
            raw[data.draw(st.integers(start, end - 2), "where")] ^= 0x20
        log.write_bytes(bytes(raw))
        restored = asyncio.run(restart(directory))
    for (_, shard), record in restored.items():
        if record.latest == record.committed:
            continue  # nothing pending: nothing is sent to SLS
        pending = decode_cursor(record.latest)
        assert pending is not None
        for i, (kind, _, s, checkpoint, _) in enumerate(ops):
            if kind == "c" and s == shard and i not in damaged:
                assert pending >= int(base64.b64decode(checkpoint)), (record, ops)


def test_a_commit_older_than_a_lost_value_does_not_stand_in_for_it() -> None:
    # accept(1) accept(2) commit(1) commit(2), both accepts damaged (found by the test above):
    # the first commit names the lost accept(2) as newer; the second commits that value.
    shards: dict[tuple[str, int], Shard] = {}
    apply(shards, Committed(3, "g", 0, cursor(1), older_than=2))
    apply(shards, Committed(4, "g", 0, cursor(2), latest_seq=2))
    assert public(shards[("g", 0)]) == ShardRecord("g", 0, cursor(2), None, cursor(2))


def test_the_model_and_replay_agree_when_both_accepts_before_two_commits_are_lost() -> None:
    ops: list[Op] = [("a", "g", 0, cursor(1), None), ("a", "g", 0, cursor(2), None)]
    ops += [("c", "g", 0, cursor(1), None), ("c", "g", 0, cursor(2), None)]
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        asyncio.run(write(directory, ops))
        log = directory / LOG_NAME
        raw = bytearray(log.read_bytes())
        raw[line_spans(bytes(raw))[0][1] - 1] ^= 0x01  # the first newline: lines 0 and 1 go
        log.write_bytes(bytes(raw))
        restored = asyncio.run(restart(directory))
    assert restored == model(ops, {0, 1})
    assert restored[("g", 0)] == ShardRecord("g", 0, cursor(2), None, cursor(2))


@given(
    group=names,
    first=st.integers(1, 2**40),
    entries=st.lists(
        st.tuples(
            st.integers(0, 2**31),
            st.text(max_size=6) | st.integers(0, 99).map(cursor),
            st.none() | names,
        ),
        min_size=1,
        max_size=8,
    ),
)
def test_a_block_of_accepted_records_is_byte_for_byte_each_record_alone(
    group: str, first: int, entries: list[tuple[int, str, str | None]]
) -> None:
    # The event loop encodes a chunk's records in one block: the lines must be exactly those
    # of the record-by-record encoder, which earlier cpmgr versions read and write.
    shards = [shard for shard, _checkpoint, _consumer in entries]
    checkpoints = [checkpoint for _shard, checkpoint, _consumer in entries]
    consumers = [consumer for _shard, _checkpoint, consumer in entries]
    block = encode_accepted_block(first, group, shards, checkpoints, consumers)
    alone = [encode_accepted(first + i, group, *entry) for i, entry in enumerate(entries)]
    assert block == b"".join(alone)
