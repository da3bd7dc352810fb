"""The socket protocol (docs/protocol.md): one line of bytes -> a typed request or a
ProtocolError with its code, and the encoding of answers. No I/O.

Decisions where the contract is silent:
- An optional field sent as `null` is treated as absent; a required one sent as `null` is missing.
- `id` must be a JSON scalar; any other `id` is a `BadRequest` answered without an `id`.
- `timeout` is capped at `MAX_TIMEOUT` seconds (larger values are `BadRequest`), `shard` at
  `MAX_SHARD` (SLS shard ids are 32-bit).
- A missing or `null` `checkpoint` is `BadRequest`; any other invalid value is
  `InvalidShardCheckPoint`.
- A batch may carry a top-level `consumer`, used for items that name none; an empty `consumer`
  is the same as none (the group's default applies).
- A consumer name is 1-128 bytes of `[A-Za-z0-9._@:-]` in every group, not only membership
  groups, for single and batch commits alike (SLS takes it in a URL query: an unchecked name
  could be accepted here and then fail at every commit). Any other string is `BadRequest`
  naming the field, e.g. `checkpoints[2].consumer`.
- JSON nested deeper than `MAX_DEPTH` levels, `NaN`/`Infinity`, integers over Python's 4300-digit
  conversion limit and non-UTF-8 bytes are `BadRequest`. A line is parsed first and its depth
  checked on the parsed value, so parsing costs time linear in the line whatever it holds; a line
  that is both invalid JSON and too deep may be refused for either reason.
"""

from __future__ import annotations

import binascii
import json
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from itertools import chain
from typing import Any, Final, TypeGuard

from cpmgr.batch import read_plain_batch
from cpmgr.errors import ProtocolError
from cpmgr.requests import (
    MAX_SHARD,
    NO_ID,
    AssignmentRequest,
    CommitItem,
    CommitRequest,
    FlushRequest,
    GetRequest,
    ItemColumns,
    JoinRequest,
    JsonScalar,
    LeaveRequest,
    MembersRequest,
    PingRequest,
    ReleaseRequest,
    Request,
    RequestError,
    RequestId,
    StatusRequest,
    cursor_number,
    decode_cursor,
)

__all__ = [
    "MAX_DEPTH",
    "MAX_SHARD",
    "MAX_TIMEOUT",
    "NO_ID",
    "AssignmentRequest",
    "CommitItem",
    "CommitRequest",
    "FlushRequest",
    "GetRequest",
    "ItemColumns",
    "JoinRequest",
    "JsonScalar",
    "LeaveRequest",
    "MembersRequest",
    "PingRequest",
    "ReleaseRequest",
    "Request",
    "RequestError",
    "RequestId",
    "StatusRequest",
    "decode_cursor",
    "encode_error",
    "encode_event",
    "encode_failure",
    "encode_ok",
    "encode_ok_pieces",
    "encode_request",
    "is_blank",
    "is_valid_checkpoint",
    "parse_request",
]

MAX_DEPTH: Final = 32
MAX_TIMEOUT: Final = 3600.0

_BLANK: Final = b" \t\r\n"
_TOO_DEEP: Final = f"JSON nested deeper than {MAX_DEPTH} levels"
_CONSUMER_NAME: Final = re.compile(r"[A-Za-z0-9._@:-]{1,128}")
_CONSUMER_RULE: Final = "must be 1-128 characters of A-Z a-z 0-9 . _ @ : -"
_SCALARS: Final = frozenset({str, int, float, bool, type(None)})
_CONTAINERS: Final = frozenset({dict, list})
# The fields a batch commit's parser checks (the item list, everything else scalar).
_BATCH_FIELDS: Final = frozenset(
    {"op", "id", "group", "consumer", "force", "wait", "timeout", "checkpoints"}
)
_ITEM_FIELDS: Final = frozenset({"shard", "checkpoint", "consumer"})
_ABSENT: Final = object()
_CHECKPOINT_RULE: Final = "must be a non-empty string of standard base64 with padding"
_OK: Final = b'{"ok":true}\n'
# One encoder for every answer (json.dumps() with options builds one per call). ASCII output:
# an echoed id may hold a lone surrogate that UTF-8 cannot encode.
_ENCODER: Final = json.JSONEncoder(separators=(",", ":"), allow_nan=False)
_encode_string: Final = json.encoder.encode_basestring_ascii


def is_blank(line: bytes) -> bool:
    """Whether a line carries no request (only whitespace): it gets no answer."""
    return not line.strip(_BLANK)


def parse_request(line: bytes) -> Request:
    """Parse one request line (with or without its `\\n` / `\\r\\n`).

    Raises RequestError (a ProtocolError) carrying the request's `id` once the line parsed as a
    JSON object.
    """
    obj = _load_object(line)
    plain = _plain_commit(obj)
    if plain is not None:
        return plain
    # The depth check runs after building, where it can skip what the build found to be
    # scalars, but it still decides first: a line too deep is refused as such, without its id.
    try:
        request_id = _request_id(obj)
        request = _build(obj, request_id)
    except ProtocolError as exc:
        if _maybe_deep(line) and _too_deep([obj]):
            raise RequestError("BadRequest", _TOO_DEEP) from None
        if isinstance(exc, RequestError):
            raise  # a bad id: answered without one
        raise RequestError(exc.code, exc.message, request_id=request_id) from None
    if isinstance(request, CommitRequest) and isinstance(request.items, ItemColumns):
        # Items read in the common shape hold scalars only: counting the brackets of their
        # line would cost more than looking at the other fields.
        too_deep = _too_deep(_unknown_fields(obj), depth=2)
    else:
        too_deep = _maybe_deep(line) and _unchecked_too_deep(obj, request)
    if too_deep:
        raise RequestError("BadRequest", _TOO_DEEP)
    return request


def _plain_commit(obj: dict[str, Any]) -> CommitRequest | None:
    """The commonest request, read without the general builder: a single commit of `op`,
    `group`, `shard` and `checkpoint` (and maybe `id`), all valid. None for any other object,
    which the builder then reads with its errors. The result equals what the builder makes
    (a property test in tests/test_protocol.py holds the two to that)."""
    size = len(obj)
    if size == 4:
        request_id = NO_ID
    elif size == 5 and "id" in obj:
        value = obj["id"]
        if type(value) is int or type(value) is str:
            request_id = RequestId(value, True)
        else:
            return None  # the builder's rules for the rest (null, floats, bad types)
    else:
        return None
    # With these four present and typed, the object holds nothing else: no depth to check.
    if obj.get("op") != "commit":
        return None
    group = obj.get("group")
    shard = obj.get("shard")
    checkpoint = obj.get("checkpoint")
    if type(group) is not str or type(shard) is not int or type(checkpoint) is not str:
        return None
    if not 0 <= shard <= MAX_SHARD:
        return None
    raw = _canonical_base64(checkpoint)
    if raw is None:
        return None
    item = CommitItem(shard, checkpoint, None, 0, cursor_number(raw))
    return CommitRequest(group, (item,), False, False, False, None, request_id)


def _maybe_deep(line: bytes) -> bool:
    """Fewer brackets than MAX_DEPTH cannot nest deeper: most lines skip the depth check."""
    return line.count(b"[") + line.count(b"{") > MAX_DEPTH


def _load_object(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("BadRequest", "request is not valid UTF-8") from None
    try:
        # json.loads() refuses a BOM too, with this message.
        if text[:1] != "{" and text.startswith("\ufeff"):
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _decode_json(text)
    except RecursionError:
        # The scanner recursed as deep as the stack allows, far past MAX_DEPTH.
        raise RequestError("BadRequest", _TOO_DEEP) from None
    except ValueError as exc:
        raise RequestError("BadRequest", f"request is not valid JSON: {_short(exc)}") from None
    if type(obj) is not dict:
        if _too_deep([obj]):
            raise RequestError("BadRequest", _TOO_DEEP)
        raise RequestError("BadRequest", "request must be a JSON object")
    return obj


def _unchecked_too_deep(obj: dict[str, Any], request: Request) -> bool:
    """_too_deep([obj]) for a request that parsed, skipping what the parser found scalar."""
    if not (isinstance(request, CommitRequest) and request.batch):
        return _too_deep([obj])
    top = _unknown_fields(obj)
    inner = [
        value
        for entry in obj["checkpoints"]
        if len(entry) > 2 and not entry.keys() <= _ITEM_FIELDS
        for key, value in entry.items()
        if key not in _ITEM_FIELDS
    ]
    return _too_deep(top, depth=2) or _too_deep(inner, depth=4)


def _unknown_fields(batch: dict[str, Any]) -> list[Any]:
    """The values of a batch's fields that its parser does not check: they may nest (the
    known fields are scalars, or the list of item objects)."""
    return [value for key, value in batch.items() if key not in _BATCH_FIELDS]


def _too_deep(values: list[Any], *, depth: int = 1) -> bool:
    """Whether containers among `values`, at nesting level `depth`, nest past MAX_DEPTH.

    Level by level, so the cost is linear in the number of values and the walk stops at
    MAX_DEPTH levels, never recursing.
    """
    level = [value for value in values if type(value) in _CONTAINERS]
    while level:
        if depth > MAX_DEPTH:
            return True
        children = chain.from_iterable(
            [item.values() if type(item) is dict else item for item in level]
        )
        level = [child for child in children if type(child) in _CONTAINERS]
        depth += 1
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# One decoder for every line: json.loads() with an option builds a new one per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)
_JSON_SPACE: Final = " \t\n\r"


def _decode_json(text: str) -> object:
    """json.loads(text) with the shared decoder: same results and messages, less overhead."""
    # Nearly every line is an object with nothing around it: one test each side for those.
    start = 0 if text[:1] == "{" else len(text) - len(text.lstrip(_JSON_SPACE))
    value, end = _DECODER.raw_decode(text, start)
    if end != len(text):
        rest = text[end:].lstrip(_JSON_SPACE)
        if rest:
            raise json.JSONDecodeError("Extra data", text, len(text) - len(rest))
    return value


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _request_id(obj: Mapping[str, Any]) -> RequestId:
    value = obj.get("id", _ABSENT)
    if value is _ABSENT:
        return NO_ID
    if type(value) not in _SCALARS:  # the decoder makes exact types: no subclasses here
        raise RequestError("BadRequest", "id: must be a JSON scalar")
    if type(value) is float and not math.isfinite(value):
        # 1e400 parses as inf, which no answer could echo as JSON.
        raise RequestError("BadRequest", "id: must be a finite number")
    return RequestId(value, True)


def _build(obj: Mapping[str, Any], request_id: RequestId) -> Request:
    op = obj.get("op")
    if op is None:
        raise ProtocolError("BadRequest", "op: required")
    if type(op) is not str:
        raise ProtocolError("BadRequest", "op: must be a string")
    build = _BUILDERS.get(op)
    if build is None:
        raise ProtocolError("UnknownOp", f"unknown op {_quote(op)}")
    return build(obj, request_id)


def _flush(obj: Mapping[str, Any], request_id: RequestId) -> FlushRequest:
    return FlushRequest(_opt_str(obj, "group"), _opt_timeout(obj), request_id)


def _get(obj: Mapping[str, Any], request_id: RequestId) -> GetRequest:
    group = _req_str(obj, "group")
    shard = obj.get("shard")
    return GetRequest(
        group,
        None if shard is None else _shard(shard, "shard"),
        _opt_bool(obj, "remote"),
        request_id,
    )


def _status(obj: Mapping[str, Any], request_id: RequestId) -> StatusRequest:
    return StatusRequest(request_id)


def _ping(obj: Mapping[str, Any], request_id: RequestId) -> PingRequest:
    return PingRequest(request_id)


def _join(obj: Mapping[str, Any], request_id: RequestId) -> JoinRequest:
    group = _req_str(obj, "group")
    name = _consumer(obj.get("consumer"), "consumer")
    if name is None:
        # A member needs a name of its own: SLS tells members apart by it.
        raise ProtocolError("BadRequest", f"consumer: required, {_CONSUMER_RULE}")
    return JoinRequest(group, name, request_id)


def _release(obj: Mapping[str, Any], request_id: RequestId) -> ReleaseRequest:
    group = _req_str(obj, "group")
    shard = obj.get("shard")
    if shard is None:
        raise ProtocolError("BadRequest", "shard: required")
    return ReleaseRequest(group, _shard(shard, "shard"), request_id)


def _leave(obj: Mapping[str, Any], request_id: RequestId) -> LeaveRequest:
    return LeaveRequest(_req_str(obj, "group"), request_id)


def _assignment(obj: Mapping[str, Any], request_id: RequestId) -> AssignmentRequest:
    return AssignmentRequest(_req_str(obj, "group"), request_id)


def _members(obj: Mapping[str, Any], request_id: RequestId) -> MembersRequest:
    return MembersRequest(_opt_str(obj, "group"), request_id)


def _commit(obj: Mapping[str, Any], request_id: RequestId) -> CommitRequest:
    group = _req_str(obj, "group")
    consumer = obj.get("consumer")
    if consumer is not None:
        consumer = _consumer(consumer, "consumer")
    checkpoints = obj.get("checkpoints")
    items: Sequence[CommitItem]
    if checkpoints is None:
        items = (_item(obj, consumer, 0),)
    elif obj.get("shard") is not None or obj.get("checkpoint") is not None:
        raise ProtocolError(
            "BadRequest", "commit takes either shard and checkpoint, or checkpoints"
        )
    else:
        items = _batch_items(checkpoints, consumer)
    return CommitRequest(
        group,
        items,
        checkpoints is not None,
        _opt_bool(obj, "force"),
        _opt_bool(obj, "wait"),
        _opt_timeout(obj),
        request_id,
    )


def _batch_items(value: object, default_consumer: str | None) -> Sequence[CommitItem]:
    if type(value) is not list:
        raise ProtocolError("BadRequest", "checkpoints: must be a list")
    if not value:
        raise ProtocolError("BadRequest", "checkpoints: must not be empty")
    columns = read_plain_batch(value, default_consumer)
    if columns is not None:
        return columns
    return _general_batch_items(value, default_consumer)


def _general_batch_items(value: list[Any], default_consumer: str | None) -> tuple[CommitItem, ...]:
    """A batch in any shape, item by item: the items, or the error of the first bad one."""
    by_shard: dict[int, CommitItem] = {}
    for index, entry in enumerate(value):
        if type(entry) is not dict:
            raise ProtocolError("BadRequest", f"checkpoints[{index}]: must be an object")
        try:
            item = _item(entry, default_consumer, index)
        except ProtocolError as exc:
            # Built only on failure: naming the path of every item would cost each item.
            raise ProtocolError(exc.code, f"checkpoints[{index}].{exc.message}") from None
        # A shard twice keeps the last value; pop first so it also takes the last position.
        if item.shard in by_shard:
            del by_shard[item.shard]
        by_shard[item.shard] = item
    return tuple(by_shard.values())


def _item(obj: Mapping[str, Any], default_consumer: str | None, index: int) -> CommitItem:
    """One item; error messages start with the field name, batches prefix their path."""
    shard = obj.get("shard")
    if shard is None:
        raise ProtocolError("BadRequest", "shard: required")
    checkpoint = obj.get("checkpoint")
    if checkpoint is None:
        raise ProtocolError("BadRequest", "checkpoint: required")
    consumer = obj.get("consumer")
    if consumer is not None:
        consumer = _consumer(consumer, "consumer")
    if type(shard) is not int or not 0 <= shard <= MAX_SHARD:
        _shard(shard, "shard")  # raises the error that fits
    raw = _canonical_base64(checkpoint) if type(checkpoint) is str else None
    if raw is None:
        raise ProtocolError("InvalidShardCheckPoint", f"checkpoint: {_CHECKPOINT_RULE}")
    number = cursor_number(raw)  # what decode_cursor() finds, from this one decoding
    if consumer is None:
        consumer = default_consumer
    return CommitItem(shard, checkpoint, consumer, index, number)


def _shard(value: object, path: str) -> int:
    # bool is an int subclass, and 3.0 is a float: neither is a shard.
    if type(value) is not int:
        raise ProtocolError("BadRequest", f"{path}: must be an integer")
    if not 0 <= value <= MAX_SHARD:
        raise ProtocolError("BadRequest", f"{path}: must be between 0 and {MAX_SHARD}")
    return value


def _canonical_base64(value: str) -> bytes | None:
    """The bytes `value` encodes if it is non-empty, strict, canonical base64, else None."""
    try:
        raw = binascii.a2b_base64(value)
    except (binascii.Error, ValueError):  # ValueError: not ASCII
        return None
    # Re-encoding catches what a2b_base64 lets through: characters outside the alphabet,
    # missing or misplaced padding, non-zero padding bits.
    if not raw or binascii.b2a_base64(raw, newline=False) != value.encode("ascii"):
        return None
    return raw


def is_valid_checkpoint(value: object) -> TypeGuard[str]:
    """Whether `value` is a non-empty string of strict standard base64 with padding."""
    return isinstance(value, str) and _canonical_base64(value) is not None


def _consumer(value: object, path: str) -> str | None:
    if value is None:
        return None
    if type(value) is not str:
        raise ProtocolError("BadRequest", f"{path}: must be a string")
    if not value:
        return None
    if _CONSUMER_NAME.fullmatch(value) is None:
        raise ProtocolError("BadRequest", f"{path}: {_CONSUMER_RULE}")
    return value


def _req_str(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise ProtocolError("BadRequest", f"{name}: required")
    if not isinstance(value, str):
        raise ProtocolError("BadRequest", f"{name}: must be a string")
    return value


def _opt_str(obj: Mapping[str, Any], name: str) -> str | None:
    value = obj.get(name)
    if value is not None and not isinstance(value, str):
        raise ProtocolError("BadRequest", f"{name}: must be a string")
    return value


def _opt_bool(obj: Mapping[str, Any], name: str) -> bool:
    value = obj.get(name)
    if value is None:
        return False
    if type(value) is not bool:
        raise ProtocolError("BadRequest", f"{name}: must be true or false")
    return value


def _opt_timeout(obj: Mapping[str, Any]) -> float | None:
    value = obj.get("timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ProtocolError("BadRequest", "timeout: must be a number of seconds")
    # A huge integer would overflow float(); anything that large is out of range anyway.
    if not isinstance(value, float) and value > MAX_TIMEOUT:
        raise ProtocolError("BadRequest", f"timeout: must be at most {MAX_TIMEOUT:g} seconds")
    seconds = float(value)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ProtocolError("BadRequest", "timeout: must be a number of seconds > 0")
    if seconds > MAX_TIMEOUT:
        raise ProtocolError("BadRequest", f"timeout: must be at most {MAX_TIMEOUT:g} seconds")
    return seconds


_BUILDERS: Final[Mapping[str, Callable[[Mapping[str, Any], RequestId], Request]]] = {
    "commit": _commit,
    "flush": _flush,
    "get": _get,
    "status": _status,
    "ping": _ping,
    "join": _join,
    "release": _release,
    "leave": _leave,
    "assignment": _assignment,
    "members": _members,
}


def _quote(text: str) -> str:
    return json.dumps(text[:64] + ("..." if len(text) > 64 else ""))


def encode_ok(request_id: RequestId = NO_ID, /, **fields: object) -> bytes:
    """A success answer line: `{"ok":true, **fields}` plus the echoed `id`."""
    if not fields:
        if not request_id.present:
            return _OK
        return b'{"ok":true,"id":%b}\n' % _encode_scalar(request_id.value)
    if len(fields) == 1 and type(count := fields.get("accepted")) is int:
        # A batch commit's answer: the same bytes the encoder writes, without building them.
        if not request_id.present:
            return b'{"ok":true,"accepted":%d}\n' % count
        return b'{"ok":true,"accepted":%d,"id":%b}\n' % (count, _encode_scalar(request_id.value))
    return _dump({"ok": True, **fields}, request_id)


def encode_ok_pieces(
    request_id: RequestId, name: str, items: Sequence[object], *, chunk: int
) -> Iterator[bytes]:
    """The bytes of `encode_ok(request_id, **{name: items})`, in pieces of `chunk` items, so a
    caller can encode a long list without holding its loop for all of it."""
    head = _ENCODER.encode({"ok": True, name: []})
    yield head[:-2].encode("ascii")  # up to and including the list's `[`
    for start in range(0, len(items), chunk):
        part = ",".join(_ENCODER.encode(item) for item in items[start : start + chunk])
        yield (("," if start else "") + part).encode("ascii")
    tail = "]"
    if request_id.present:
        tail += ',"id":' + _ENCODER.encode(request_id.value)
    yield (tail + "}\n").encode("ascii")


def encode_error(
    request_id: RequestId,
    code: str,
    message: str,
    *,
    error_fields: Mapping[str, object] | None = None,
    **fields: object,
) -> bytes:
    """A failure answer line; `error_fields` go inside `error`, `fields` at the top level."""
    error: dict[str, object] = {"code": code, "message": message}
    if error_fields:
        error.update(error_fields)
    return _dump({"ok": False, **fields, "error": error}, request_id)


def encode_event(fields: Mapping[str, object]) -> bytes:
    """An event line (membership): an `event` field and never an `ok` field."""
    return _ENCODER.encode(fields).encode("ascii") + b"\n"


def encode_failure(exc: ProtocolError, request_id: RequestId = NO_ID) -> bytes:
    """The answer line for a refused request; a RequestError's own id and fields win."""
    if not isinstance(exc, RequestError):
        return encode_error(request_id, exc.code, exc.message)
    rid = exc.request_id if exc.request_id.present else request_id
    return encode_error(rid, exc.code, exc.message, error_fields=exc.error_fields, **exc.fields)


def _dump(answer: dict[str, object], request_id: RequestId) -> bytes:
    if request_id.present:
        answer["id"] = request_id.value
    return _ENCODER.encode(answer).encode("ascii") + b"\n"


def _encode_scalar(value: JsonScalar) -> bytes:
    # The two common id types directly; the encoder's own rules (and errors) for the rest.
    if type(value) is int:
        return int.__repr__(value).encode("ascii")
    if type(value) is str:
        return _encode_string(value).encode("ascii")
    return _ENCODER.encode(value).encode("ascii")


def encode_request(request: Request) -> bytes:
    """The wire line of a request (what a client sends); parse_request() reads it back."""
    fields: dict[str, object] = {"op": request.op}
    if isinstance(request, CommitRequest):
        fields.update(_commit_fields(request))
    elif isinstance(request, FlushRequest):
        fields.update(group=request.group, timeout=request.timeout)
    elif isinstance(request, GetRequest):
        fields.update(group=request.group, shard=request.shard, remote=request.remote or None)
    elif isinstance(request, JoinRequest):
        fields.update(group=request.group, consumer=request.consumer)
    elif isinstance(request, ReleaseRequest):
        fields.update(group=request.group, shard=request.shard)
    elif isinstance(request, LeaveRequest | AssignmentRequest | MembersRequest):
        fields.update(group=request.group)
    wire = {key: value for key, value in fields.items() if value is not None}
    if request.request_id.present:
        wire["id"] = request.request_id.value
    return _ENCODER.encode(wire).encode("ascii") + b"\n"


def _commit_fields(request: CommitRequest) -> dict[str, object]:
    fields: dict[str, object] = {
        "group": request.group,
        "force": request.force or None,
        "wait": request.wait or None,
        "timeout": request.timeout,
    }
    if request.batch:
        fields["checkpoints"] = [_item_fields(item) for item in request.items]
    else:
        fields.update(_item_fields(request.items[0]))
    return fields


def _item_fields(item: CommitItem) -> dict[str, object]:
    fields: dict[str, object] = {"shard": item.shard, "checkpoint": item.checkpoint}
    if item.consumer is not None:
        fields["consumer"] = item.consumer
    return fields
