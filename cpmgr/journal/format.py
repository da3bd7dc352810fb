"""The journal's on-disk format: checksummed JSON lines, their encoding and a damage-tolerant
scan (no I/O but reading a file).

One record per line: `<crc32 of the JSON, 8 lower-case hex digits> <JSON>\\n`. JSON escapes
control characters and (ASCII only) everything non-ASCII, so no value can put a newline inside
a record: after a torn write or a flipped bit, the next newline is a resynchronisation point
and only the damaged line is lost.

    log:      {"t":"a","n":SEQ,"g":GROUP,"s":SHARD,"c":CHECKPOINT,"u":CONSUMER|null}  accepted
              {"t":"c","n":SEQ,"g":GROUP,"s":SHARD,"c":CHECKPOINT,"l"|"o":SEQ}  committed to SLS
              {"t":"d","n":SEQ,"g":GROUP,"s":SHARD,"c":CHECKPOINT}  refused for good by SLS
    snapshot: {"t":"snap","v":1,"seq":SEQ,"shards":N}  first line
              {"t":"s","g":GROUP,"s":SHARD,"l":LATEST,"u":CONSUMER|null,"k":COMMITTED|null}

Every log record has a sequence number and a snapshot holds every record up to its `seq`, so
replay skips those: a crash between a snapshot's rename and the log's truncation re-applies
nothing, and records refused after a failed fsync stay out even if the kernel kept them.
A committed record names the record that set the shard's latest value when it was written:
`l` if the committed value is that latest value, `o` if it is older (neither in journals
written before they existed). Replay that does not hold the named record knows it was damaged,
and never keeps a value older than the committed one pending: that would rewind SLS.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import chain
from json.encoder import encode_basestring_ascii as _quote
from pathlib import Path
from typing import Any

from cpmgr.errors import CpmgrError
from cpmgr.journal.state import (
    Accepted,
    Committed,
    Dropped,
    LogRecord,
    Shard,
    ShardRecord,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
_LINE = re.compile(rb"([0-9a-f]{8}) (\{[^\n]*\})\n")


class JournalError(CpmgrError):
    """The journal could not persist (write or fsync failed, disk full) or could not be read."""


class _Malformed(Exception):
    """A line passed its checksum but does not hold a record this version understands."""


@dataclass(frozen=True)
class SnapshotHeader:
    seq: int
    shards: int


Record = SnapshotHeader | LogRecord | ShardRecord


@dataclass
class Scan:
    """The valid records of one file and where it is damaged."""

    records: list[Record] = field(default_factory=list)
    good_end: int = 0
    """Offset just past the last valid record."""
    corrupt: list[int] = field(default_factory=list)
    """Offsets of damaged lines followed by valid ones (skipped)."""
    torn_at: int | None = None
    """Offset of the damaged tail after the last valid record, if any."""

    @property
    def damaged(self) -> bool:
        return bool(self.corrupt) or self.torn_at is not None


# --- encoding: by hand, byte for byte what json.dumps(separators=(",", ":")) writes, at a
# third of its cost (whichever thread encodes holds the GIL meanwhile) -------------------------


def _frame(body: str) -> bytes:
    raw = body.encode("ascii")
    return b"%08x %s\n" % (zlib.crc32(raw), raw)


def _optional(value: str | None) -> str:
    return "null" if value is None else _quote(value)


def encode_accepted(
    seq: int, group: str, shard: int, checkpoint: str, consumer: str | None
) -> bytes:
    return _frame(
        f'{{"t":"a","n":{seq},"g":{_quote(group)},"s":{shard},"c":{_quote(checkpoint)}'
        f',"u":{_optional(consumer)}}}'
    )


def encode_accepted_block(
    first_seq: int,
    group: str,
    shards: Sequence[int],
    checkpoints: Sequence[str],
    consumers: Sequence[str | None],
) -> bytes:
    """`encode_accepted` of entries of one group given as columns, numbered from
    `first_seq`, in one piece. Built with a few C calls for the whole block (one `%` for
    every body, one CRC-32 call per line, one `%` for every frame) rather than a few per
    record: the event loop encodes the records of every journaled commit."""
    count = len(shards)
    if not count:
        return b""
    if _plain("".join(checkpoints)):
        value = '"%s"'  # base64, as the socket takes them: nothing to escape
    else:
        value, checkpoints = "%s", list(map(_quote, checkpoints))
    group_json = _quote(group).replace("%", "%%")
    template = '{"t":"a","n":%d,"g":' + group_json + ',"s":%d,"c":' + value + ',"u":'
    fields: Iterable[tuple[object, ...]]
    numbers = range(first_seq, first_seq + count)
    if consumers.count(None) != count:
        template += "%s}\n"
        fields = zip(numbers, shards, checkpoints, map(_optional, consumers), strict=True)
    else:
        template += "null}\n"
        fields = zip(numbers, shards, checkpoints, strict=True)
    text = (template * count) % tuple(chain.from_iterable(fields))
    bodies = text.encode("ascii").split(b"\n")
    bodies.pop()  # after the last newline
    frames = zip(map(zlib.crc32, bodies), bodies, strict=True)
    return (b"%08x %s\n" * count) % tuple(chain.from_iterable(frames))


def _plain(text: str) -> bool:
    """Whether JSON writes `text` as it is (printable ASCII without quote or backslash)."""
    return text.isascii() and text.isprintable() and '"' not in text and "\\" not in text


def encode(rec: LogRecord) -> bytes:
    if isinstance(rec, Accepted):
        return encode_accepted(rec.seq, rec.group, rec.shard, rec.checkpoint, rec.consumer)
    head = f'{{"t":"{_kind(rec)}","n":{rec.seq},"g":{_quote(rec.group)},"s":{rec.shard}'
    head += f',"c":{_quote(rec.checkpoint)}'
    if isinstance(rec, Committed) and rec.latest_seq is not None:
        return _frame(f'{head},"l":{rec.latest_seq}}}')
    if isinstance(rec, Committed) and rec.older_than is not None:
        return _frame(f'{head},"o":{rec.older_than}}}')
    return _frame(head + "}")


def _kind(rec: LogRecord) -> str:
    return "a" if isinstance(rec, Accepted) else "c" if isinstance(rec, Committed) else "d"


def snapshot_header(shards: int, seq: int) -> bytes:
    return _frame(f'{{"t":"snap","v":{FORMAT_VERSION},"seq":{seq},"shards":{shards}}}')


def snapshot_lines(shards: Iterable[Shard]) -> bytes:
    return b"".join(
        _frame(
            f'{{"t":"s","g":{_quote(group)},"s":{shard},"l":{_quote(latest)}'
            f',"u":{_optional(consumer)},"k":{_optional(committed)}}}'
        )
        for group, shard, latest, consumer, committed, _seq in shards
    )


# --- decoding ------------------------------------------------------------------------------


def _str(obj: dict[str, Any], key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise _Malformed(key)
    return value


def _opt_str(obj: dict[str, Any], key: str) -> str | None:
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise _Malformed(key)
    return value


def _count(obj: dict[str, Any], key: str) -> int:
    value = obj.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise _Malformed(key)
    return value


def _opt_count(obj: dict[str, Any], key: str) -> int | None:
    return None if obj.get(key) is None else _count(obj, key)


def _decode(obj: dict[str, Any], path: Path) -> Record:
    kind = obj.get("t")
    if kind == "a":
        return Accepted(
            _count(obj, "n"), _str(obj, "g"), _count(obj, "s"), _str(obj, "c"), _opt_str(obj, "u")
        )
    if kind == "c":
        return Committed(
            _count(obj, "n"),
            _str(obj, "g"),
            _count(obj, "s"),
            _str(obj, "c"),
            _opt_count(obj, "l"),
            _opt_count(obj, "o"),
        )
    if kind == "d":
        return Dropped(_count(obj, "n"), _str(obj, "g"), _count(obj, "s"), _str(obj, "c"))
    if kind == "s":
        return ShardRecord(
            _str(obj, "g"), _count(obj, "s"), _str(obj, "l"), _opt_str(obj, "u"), _opt_str(obj, "k")
        )
    if kind == "snap":
        if obj.get("v") != FORMAT_VERSION:
            raise JournalError(f"{path}: format version {obj.get('v')!r} is not supported")
        return SnapshotHeader(_count(obj, "seq"), _count(obj, "shards"))
    raise _Malformed("t")


def _parse_line(line: bytes, path: Path) -> Record | None:
    """One framed line to a record, or None if it is torn, corrupt or not understood."""
    match = _LINE.fullmatch(line)
    if match is None or zlib.crc32(match[2]) != int(match[1], 16):
        return None
    try:
        obj = json.loads(match[2])
        return _decode(obj, path) if isinstance(obj, dict) else None
    except (ValueError, _Malformed):
        return None


def scan(path: Path) -> Scan:
    """Read every line of a journal file, keeping the valid records and noting the damage."""
    result = Scan()
    offset = 0
    bad: list[int] = []  # damaged lines since the last valid record
    with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
        for line in f:
            start, offset = offset, offset + len(line)
            if line == b"\n":
                continue  # the resynchronisation newline written after an uncut partial write
            record = _parse_line(line, path)
            if record is None:
                bad.append(start)
                continue
            result.corrupt.extend(bad)
            bad.clear()
            result.records.append(record)
            result.good_end = offset
    result.torn_at = bad[0] if bad else None
    return result


def warn_damage(path: Path, found: Scan) -> None:
    for offset in found.corrupt:
        log.warning("journal %s: corrupt record at offset %d skipped", path, offset)
    if found.torn_at is not None:
        log.warning(
            "journal %s: torn or corrupt tail from offset %d dropped (valid records end at %d)",
            path,
            found.torn_at,
            found.good_end,
        )
