"""The socket protocol (CONTRACT.md section 3): one line of bytes -> a typed request or a
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

import base64
import binascii
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, ClassVar, Final, Literal, TypeGuard

from cpmgr.errors import ProtocolError

__all__ = [
    "MAX_DEPTH",
    "MAX_SHARD",
    "MAX_TIMEOUT",
    "NO_ID",
    "CommitItem",
    "CommitRequest",
    "FlushRequest",
    "GetRequest",
    "JsonScalar",
    "PingRequest",
    "Request",
    "RequestError",
    "RequestId",
    "StatusRequest",
    "decode_cursor",
    "encode_error",
    "encode_failure",
    "encode_ok",
    "encode_request",
    "is_blank",
    "is_valid_checkpoint",
    "parse_request",
]

MAX_DEPTH: Final = 32
MAX_SHARD: Final = 2**31 - 1
MAX_TIMEOUT: Final = 3600.0
# Longest decimal cursor decode_cursor() turns into an int; beyond it Python's int parsing gets
# slow (and refuses past 4300 digits), and no real cursor comes close.
_MAX_CURSOR_DIGITS: Final = 256

JsonScalar = str | int | float | bool | None
Op = Literal["commit", "flush", "get", "status", "ping"]

_BLANK: Final = b" \t\r\n"
_TOO_DEEP: Final = f"JSON nested deeper than {MAX_DEPTH} levels"
_CONSUMER_NAME: Final = re.compile(r"[A-Za-z0-9._@:-]{1,128}")
_CONSUMER_RULE: Final = "must be 1-128 characters of A-Z a-z 0-9 . _ @ : -"


@dataclass(frozen=True, slots=True)
class RequestId:
    """The `id` of a request, if it had one (`present` tells `"id": null` from no `id`)."""

    value: JsonScalar = None
    present: bool = False

    @classmethod
    def of(cls, value: JsonScalar) -> RequestId:
        return cls(value, True)


NO_ID: Final = RequestId()


class RequestError(ProtocolError):
    """A refused request, with the `id` to echo and any extra answer fields.

    `error_fields` go inside the answer's `error` object (e.g. `dropped`), `fields` at its top
    level (e.g. `committed` and `failed` for `flush`).
    """

    def __init__(
        self,
        code: str,
        message: str,
        *,
        request_id: RequestId = NO_ID,
        error_fields: Mapping[str, object] | None = None,
        fields: Mapping[str, object] | None = None,
    ) -> None:
        super().__init__(code, message)
        self.request_id = request_id
        self.error_fields: Mapping[str, object] = dict(error_fields or {})
        self.fields: Mapping[str, object] = dict(fields or {})


@dataclass(frozen=True, slots=True)
class CommitItem:
    """One checkpoint of a commit; `consumer` None means the group's default consumer."""

    shard: int
    checkpoint: str
    consumer: str | None = None
    # Position in a batch's `checkpoints` as sent, for error messages (not part of the value).
    index: int = field(default=0, compare=False)


@dataclass(frozen=True, slots=True)
class CommitRequest:
    """`commit`, single (`batch` False, one item) or batch (`checkpoints`, shards distinct)."""

    op: ClassVar[Op] = "commit"
    group: str
    items: tuple[CommitItem, ...]
    batch: bool = False
    force: bool = False
    wait: bool = False
    timeout: float | None = None
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class FlushRequest:
    """`flush` of one group, or of all groups when `group` is None."""

    op: ClassVar[Op] = "flush"
    group: str | None = None
    timeout: float | None = None
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class GetRequest:
    """`get` of one shard, or of every shard of the group when `shard` is None."""

    op: ClassVar[Op] = "get"
    group: str
    shard: int | None = None
    remote: bool = False
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class StatusRequest:
    """`status`."""

    op: ClassVar[Op] = "status"
    request_id: RequestId = NO_ID


@dataclass(frozen=True, slots=True)
class PingRequest:
    """`ping`."""

    op: ClassVar[Op] = "ping"
    request_id: RequestId = NO_ID


Request = CommitRequest | FlushRequest | GetRequest | StatusRequest | PingRequest


def is_blank(line: bytes) -> bool:
    """Whether a line carries no request (only whitespace): it gets no answer."""
    return not line.strip(_BLANK)


def parse_request(line: bytes) -> Request:
    """Parse one request line (with or without its `\\n` / `\\r\\n`).

    Raises RequestError (a ProtocolError) carrying the request's `id` once the line parsed as a
    JSON object.
    """
    obj = _load_object(line)
    request_id = _request_id(obj)
    try:
        return _build(obj, request_id)
    except ProtocolError as exc:
        raise RequestError(exc.code, exc.message, request_id=request_id) from None


def _load_object(line: bytes) -> dict[str, Any]:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError("BadRequest", "request is not valid UTF-8") from None
    try:
        if text.startswith("\ufeff"):  # json.loads() refuses a BOM too, with this message
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _DECODER.decode(text)
    except RecursionError:
        # The scanner recursed as deep as the stack allows, far past MAX_DEPTH.
        raise RequestError("BadRequest", _TOO_DEEP) from None
    except ValueError as exc:
        raise RequestError("BadRequest", f"request is not valid JSON: {_short(exc)}") from None
    # Fewer brackets than MAX_DEPTH cannot nest deeper: the common case skips the walk.
    if line.count(b"[") + line.count(b"{") > MAX_DEPTH and _too_deep(obj):
        raise RequestError("BadRequest", _TOO_DEEP)
    if not isinstance(obj, dict):
        raise RequestError("BadRequest", "request must be a JSON object")
    return obj


def _too_deep(value: object) -> bool:
    """Whether parsed JSON nests containers deeper than MAX_DEPTH.

    Level by level, so the cost is linear in the number of values and the walk stops at
    MAX_DEPTH levels, never recursing.
    """
    level = [value] if isinstance(value, dict | list) else []
    depth = 1
    while level:
        if depth > MAX_DEPTH:
            return True
        level = [
            child
            for container in level
            for child in (container.values() if isinstance(container, dict) else container)
            if isinstance(child, dict | list)
        ]
        depth += 1
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


# One decoder for every line: json.loads() with an option builds a new one per call.
_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def _short(exc: BaseException) -> str:
    text = str(exc)
    return text if len(text) <= 200 else text[:200] + "..."


def _request_id(obj: Mapping[str, Any]) -> RequestId:
    if "id" not in obj:
        return NO_ID
    value = obj["id"]
    if value is not None and not isinstance(value, str | int | float | bool):
        raise RequestError("BadRequest", "id: must be a JSON scalar")
    if isinstance(value, float) and not math.isfinite(value):
        # 1e400 parses as inf, which no answer could echo as JSON.
        raise RequestError("BadRequest", "id: must be a finite number")
    return RequestId.of(value)


def _build(obj: Mapping[str, Any], request_id: RequestId) -> Request:
    op = obj.get("op")
    if op is None:
        raise ProtocolError("BadRequest", "op: required")
    if not isinstance(op, str):
        raise ProtocolError("BadRequest", "op: must be a string")
    if op == "commit":
        return _commit(obj, request_id)
    if op == "flush":
        return FlushRequest(
            group=_opt_str(obj, "group"), timeout=_opt_timeout(obj), request_id=request_id
        )
    if op == "get":
        shard = obj.get("shard")
        return GetRequest(
            group=_req_str(obj, "group"),
            shard=None if shard is None else _shard(shard, "shard"),
            remote=_opt_bool(obj, "remote"),
            request_id=request_id,
        )
    if op == "status":
        return StatusRequest(request_id=request_id)
    if op == "ping":
        return PingRequest(request_id=request_id)
    raise ProtocolError("UnknownOp", f"unknown op {_quote(op)}")


def _commit(obj: Mapping[str, Any], request_id: RequestId) -> CommitRequest:
    group = _req_str(obj, "group")
    consumer = _consumer(obj.get("consumer"), "consumer")
    batch = obj.get("checkpoints") is not None
    if batch:
        if obj.get("shard") is not None or obj.get("checkpoint") is not None:
            raise ProtocolError(
                "BadRequest", "commit takes either shard and checkpoint, or checkpoints"
            )
        items = _batch_items(obj["checkpoints"], consumer)
    else:
        items = (_item(obj, "", consumer),)
    return CommitRequest(
        group=group,
        items=items,
        batch=batch,
        force=_opt_bool(obj, "force"),
        wait=_opt_bool(obj, "wait"),
        timeout=_opt_timeout(obj),
        request_id=request_id,
    )


def _batch_items(value: object, default_consumer: str | None) -> tuple[CommitItem, ...]:
    if not isinstance(value, list):
        raise ProtocolError("BadRequest", "checkpoints: must be a list")
    if not value:
        raise ProtocolError("BadRequest", "checkpoints: must not be empty")
    by_shard: dict[int, CommitItem] = {}
    for index, entry in enumerate(value):
        path = f"checkpoints[{index}]."
        if not isinstance(entry, dict):
            raise ProtocolError("BadRequest", f"checkpoints[{index}]: must be an object")
        item = replace(_item(entry, path, default_consumer), index=index)
        # A shard twice keeps the last value; pop first so it also takes the last position.
        by_shard.pop(item.shard, None)
        by_shard[item.shard] = item
    return tuple(by_shard.values())


def _item(obj: Mapping[str, Any], path: str, default_consumer: str | None) -> CommitItem:
    shard = obj.get("shard")
    if shard is None:
        raise ProtocolError("BadRequest", f"{path}shard: required")
    checkpoint = obj.get("checkpoint")
    if checkpoint is None:
        raise ProtocolError("BadRequest", f"{path}checkpoint: required")
    consumer = _consumer(obj.get("consumer"), f"{path}consumer")
    return CommitItem(
        shard=_shard(shard, f"{path}shard"),
        checkpoint=_checkpoint(checkpoint, f"{path}checkpoint"),
        consumer=consumer if consumer is not None else default_consumer,
    )


def _shard(value: object, path: str) -> int:
    # bool is an int subclass, and 3.0 is a float: neither is a shard.
    if not isinstance(value, int) or isinstance(value, bool):
        raise ProtocolError("BadRequest", f"{path}: must be an integer")
    if not 0 <= value <= MAX_SHARD:
        raise ProtocolError("BadRequest", f"{path}: must be between 0 and {MAX_SHARD}")
    return value


def is_valid_checkpoint(value: object) -> TypeGuard[str]:
    """Whether `value` is a non-empty string of strict standard base64 with padding."""
    if not isinstance(value, str) or not value or len(value) % 4:
        return False
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    # Re-encoding catches non-zero padding bits, the one laxity b64decode keeps.
    return base64.b64encode(raw).decode("ascii") == value


def _checkpoint(value: object, path: str) -> str:
    if not is_valid_checkpoint(value):
        raise ProtocolError(
            "InvalidShardCheckPoint",
            f"{path}: must be a non-empty string of standard base64 with padding",
        )
    return value


def _consumer(value: object, path: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
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
    if not isinstance(value, bool):
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


def _quote(text: str) -> str:
    return json.dumps(text[:64] + ("..." if len(text) > 64 else ""))


def decode_cursor(checkpoint: str) -> int | None:
    """The decimal number a checkpoint encodes, or None if it does not encode one."""
    try:
        raw = base64.b64decode(checkpoint, validate=True)
    except (binascii.Error, ValueError):
        return None
    if not raw or len(raw) > _MAX_CURSOR_DIGITS or not raw.isdigit():
        return None
    return int(raw)


def encode_ok(request_id: RequestId = NO_ID, /, **fields: object) -> bytes:
    """A success answer line: `{"ok":true, **fields}` plus the echoed `id`."""
    return _dump({"ok": True, **fields}, request_id)


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


def encode_failure(exc: ProtocolError, request_id: RequestId = NO_ID) -> bytes:
    """The answer line for a refused request; a RequestError's own id and fields win."""
    if not isinstance(exc, RequestError):
        return encode_error(request_id, exc.code, exc.message)
    rid = exc.request_id if exc.request_id.present else request_id
    return encode_error(rid, exc.code, exc.message, error_fields=exc.error_fields, **exc.fields)


def _dump(answer: dict[str, object], request_id: RequestId) -> bytes:
    if request_id.present:
        answer["id"] = request_id.value
    # ASCII output: an echoed id may hold a lone surrogate that UTF-8 cannot encode.
    text = json.dumps(answer, separators=(",", ":"), allow_nan=False)
    return text.encode("ascii") + b"\n"


def encode_request(request: Request) -> bytes:
    """The wire line of a request (what a client sends); parse_request() reads it back."""
    fields: dict[str, object] = {"op": request.op}
    if isinstance(request, CommitRequest):
        fields.update(_commit_fields(request))
    elif isinstance(request, FlushRequest):
        fields.update(group=request.group, timeout=request.timeout)
    elif isinstance(request, GetRequest):
        fields.update(group=request.group, shard=request.shard, remote=request.remote or None)
    wire = {key: value for key, value in fields.items() if value is not None}
    if request.request_id.present:
        wire["id"] = request.request_id.value
    return json.dumps(wire, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


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
