"""The common batch commit read at once: every item `{"shard": int, "checkpoint": str}`, valid,
shards distinct. No I/O.

A batch of 100 checkpoints read item by item in Python cost four times what parsing its line
cost. In the common shape every check and the decoding of every cursor run over a whole column
in C (`map`, `set`, `min`/`max`, list comparison), and nothing is built per item but what the
store keeps. Anything else (another field, a bad value, a shard twice) is left to the general
reader, which answers it exactly as it always has; tests/test_batch.py checks both readers
agree on any batch.
"""

from __future__ import annotations

import binascii
import operator
from typing import Any, Final

from cpmgr.requests import MAX_SHARD, ItemColumns, cursor_number

__all__ = ["read_plain_batch"]

_shard_of: Final = operator.itemgetter("shard")
_checkpoint_of: Final = operator.itemgetter("checkpoint")
_decode: Final = binascii.a2b_base64
_encode: Final = binascii.b2a_base64
_INTS: Final = frozenset({int})
_STRS: Final = frozenset({str})
# Longest cursor that is a number (requests.cursor_number).
_MAX_DIGITS: Final = 256


def read_plain_batch(entries: list[Any], consumer: str | None) -> ItemColumns | None:
    """The items of a non-empty batch in the common shape, each with `consumer`; None if any
    entry is not in it (the general reader then reads the batch)."""
    try:
        # Only a dict takes a string key, and a KeyError means a field is missing.
        shards = list(map(_shard_of, entries))
        checkpoints = list(map(_checkpoint_of, entries))
    except (KeyError, TypeError):
        return None
    if (
        max(map(len, entries)) != 2  # a field besides shard and checkpoint
        or set(map(type, shards)) != _INTS  # type(): a bool is not a shard
        or min(shards) < 0
        or max(shards) > MAX_SHARD
        or len(set(shards)) != len(shards)
        or set(map(type, checkpoints)) != _STRS
    ):
        return None
    raws = _decoded(checkpoints)
    if raws is None:
        return None
    joined = b"".join(raws)
    if joined.isdigit() and max(map(len, raws)) <= _MAX_DIGITS:
        # Every cursor is ASCII digits: int() reads each as cursor_number() would.
        numbers: list[int | None] = list(map(int, raws))
    else:
        numbers = list(map(cursor_number, raws))
    return ItemColumns(shards, checkpoints, numbers, [consumer] * len(shards), distinct=True)


def _decoded(checkpoints: list[str]) -> list[bytes] | None:
    """The bytes of every checkpoint if each is non-empty canonical base64 (what
    protocol.is_valid_checkpoint() accepts), else None."""
    try:
        raws = list(map(_decode, checkpoints))
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        return None
    if not all(raws):
        return None
    # Re-encoding catches what a2b_base64 lets through: characters outside the alphabet,
    # missing or misplaced padding, non-zero padding bits. Compared as one string: each
    # encoding ends in a newline and holds no other, so the two strings are equal only if
    # every checkpoint is its own encoding (one holding a newline would add one).
    encoded = b"".join(map(_encode, raws))
    if encoded != ("\n".join(checkpoints) + "\n").encode("ascii"):
        return None
    return raws
