"""Answers stay byte-identical: a request mix through parse_request and the encoders, compared
with the exact bytes recorded in tests/data/answers_golden.json.

The recorded bytes are the wire format clients already parse. To change them on purpose,
regenerate with `python -m tests.test_protocol_answers` and review the diff.
"""

from __future__ import annotations

import base64
import functools
import json
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cpmgr.errors import ProtocolError
from cpmgr.protocol import (
    CommitRequest,
    FlushRequest,
    GetRequest,
    PingRequest,
    Request,
    RequestError,
    RequestId,
    StatusRequest,
    encode_error,
    encode_failure,
    encode_ok,
    encode_request,
    parse_request,
)

GOLDEN = Path(__file__).parent / "data" / "answers_golden.json"


def cp(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


CP = cp(1524155379373908496)

# Every JSON scalar an `id` can be, as written on the wire.
IDS = {
    "str": b'"abc-1"',
    "empty-str": b'""',
    "unicode-raw": '"é中😀"'.encode(),
    "unicode-escaped": b'"\\u00e9\\u4e2d\\ud83d\\ude00"',
    "lone-surrogate": b'"\\ud800"',
    "reversed-surrogates": b'"\\udc00\\ud800"',
    "control-chars": b'"\\u0000\\n\\t\\"\\\\/\\u007f"',
    "zero": b"0",
    "negative": b"-3",
    "int64": b"18446744073709551616",
    "bigint": b"1" + b"0" * 300,
    "float": b"1.5",
    "negative-zero": b"-0.0",
    "tiny-float": b"1e-7",
    "huge-float": b"1e300",
    "float-one": b"1.0",
    "exponent-int": b"1E2",
    "inexact": b"0.30000000000000004",
    "denormal": b"5e-324",
    "true": b"true",
    "false": b"false",
    "null": b"null",
}

OK_LINES: dict[str, bytes] = {
    "ping": b'{"op":"ping"}',
    "ping-crlf": b'{"op":"ping"}\r\n',
    "ping-spaces": b'  { "op" : "ping" }  \n',
    "status": b'{"op":"status","id":1}',
    "flush": b'{"op":"flush"}',
    "flush-group-timeout": b'{"op":"flush","group":"orders","timeout":2.5,"id":"f"}',
    "flush-int-timeout": b'{"op":"flush","timeout":3}',
    "get-group": b'{"op":"get","group":"orders","id":"g"}',
    "get-shard-remote": b'{"op":"get","group":"orders","shard":0,"remote":true}',
    "get-unicode-group": '{"op":"get","group":"订单","shard":7}'.encode(),
    "commit": b'{"op":"commit","group":"orders","shard":3,"checkpoint":"' + CP.encode() + b'"}',
    "commit-options": (
        b'{"id":9,"op":"commit","group":"orders","shard":2147483647,"checkpoint":"MTUy",'
        b'"consumer":"pod-a_1.x@y:z","force":true,"wait":true,"timeout":1}'
    ),
    "commit-nulls": (
        b'{"op":"commit","group":"orders","shard":0,"checkpoint":"MTUy","consumer":null,'
        b'"force":null,"wait":false,"timeout":null,"id":null}'
    ),
    "commit-empty-consumer": (
        b'{"op":"commit","group":"orders","shard":1,"checkpoint":"MTUy","consumer":""}'
    ),
    "commit-non-numeric-cursor": (
        b'{"op":"commit","group":"orders","shard":1,"checkpoint":"/+8A"}'
    ),
    "commit-unknown-fields": (
        b'{"op":"commit","group":"orders","shard":1,"checkpoint":"MTUy",'
        b'"extra":{"deep":[1,[2,{"x":null}]]},"colour":"red"}'
    ),
    "batch": (
        b'{"op":"commit","group":"orders","id":"b","checkpoints":['
        b'{"shard":1,"checkpoint":"MTUy","consumer":"a"},{"shard":2,"checkpoint":"MTUz"},'
        b'{"shard":1,"checkpoint":"MTU0","consumer":"late"}],"consumer":"dflt","force":true}'
    ),
    "batch-of-40": json.dumps(
        {
            "op": "commit",
            "group": "orders",
            "wait": True,
            "timeout": 0.5,
            "checkpoints": [{"shard": i, "checkpoint": cp(10**12 + i)} for i in range(40)],
        }
    ).encode(),
    "batch-unknown-item-fields": (
        b'{"op":"commit","group":"orders","checkpoints":'
        b'[{"shard":5,"checkpoint":"MTUy","note":[[["x"]]]}]}'
    ),
    "nesting-at-the-limit": b'{"op":"ping","x":' + b"[" * 31 + b"]" * 31 + b"}",
    "brackets-in-strings": json.dumps(
        {"op": "ping", "x": "[{" * 100, "y": ['a"]\\'] * 40}
    ).encode(),
}
OK_LINES.update(
    {f"ping-id-{name}": b'{"op":"ping","id":' + value + b"}" for name, value in IDS.items()}
)
OK_LINES.update(
    {
        f"batch-id-{name}": b'{"id":'
        + value
        + b',"op":"commit","group":"g","checkpoints":[{"shard":1,"checkpoint":"MTUy"}]}'
        for name, value in IDS.items()
    }
)

BAD_LINES: dict[str, bytes] = {
    "empty": b"",
    "newline": b"\n",
    "not-json": b"not json\n",
    "truncated": b'{"op":"ping"',
    "extra-data": b'{"op":"ping"} x',
    "two-objects": b'{"op":"ping"}{"op":"ping"}',
    "bom": '\ufeff{"op":"ping"}'.encode(),
    "array": b"[1,2]",
    "string": b'"ping"',
    "number": b"42",
    "null": b"null",
    "non-utf8": b'{"op":"ping","x":"\xff\xfe"}',
    "nan": b'{"op":"ping","x":NaN}',
    "infinity": b'{"op":"ping","x":Infinity,"id":1}',
    "minus-infinity": b'{"op":"ping","x":-Infinity}',
    "bad-escape": b'{"op":"ping","x":"\\q"}',
    "control-char-in-string": b'{"op":"ping","x":"a\x01b"}',
    "unterminated-string": b'{"op":"ping","x":"abc',
    "single-quotes": b"{'op':'ping'}",
    "trailing-comma": b'{"op":"ping",}',
    "huge-int": b'{"op":"get","group":"g","shard":' + b"9" * 10_000 + b"}",
    "nesting-past-the-limit": b'{"op":"ping","x":' + b"[" * 32 + b"]" * 32 + b"}",
    "deep-array": b"[" * 40 + b"]" * 40,
    "very-deep": b"[" * 100_000 + b"]" * 100_000,
    "very-deep-unclosed": b'{"a":' * 50_000,
    "id-list": b'{"op":"ping","id":[1]}',
    "id-object": b'{"op":"ping","id":{"a":1}}',
    "id-overflows-to-inf": b'{"op":"ping","id":1e400}',
    "op-missing": b'{"id":"m"}',
    "op-null": b'{"op":null,"id":1}',
    "op-number": b'{"op":3,"id":2}',
    "op-unknown": b'{"op":"launch","id":"x-1"}',
    "op-wrong-case": b'{"op":"Commit"}',
    "op-long": b'{"op":"' + b"x" * 100 + b'"}',
    "op-unicode": '{"op":"запуск\\"\\n"}'.encode(),
    "commit-group-missing": b'{"op":"commit","shard":1,"checkpoint":"MTUy","id":1.5}',
    "commit-group-number": b'{"op":"commit","group":5,"shard":1,"checkpoint":"MTUy"}',
    "commit-shard-missing": b'{"op":"commit","group":"g","checkpoint":"MTUy"}',
    "commit-checkpoint-missing": b'{"op":"commit","group":"g","shard":1}',
    "commit-checkpoint-null": b'{"op":"commit","group":"g","shard":1,"checkpoint":null}',
    "commit-shard-bool": b'{"op":"commit","group":"g","shard":true,"checkpoint":"MTUy"}',
    "commit-shard-float": b'{"op":"commit","group":"g","shard":3.0,"checkpoint":"MTUy"}',
    "commit-shard-negative": b'{"op":"commit","group":"g","shard":-1,"checkpoint":"MTUy"}',
    "commit-shard-string": b'{"op":"commit","group":"g","shard":"3","checkpoint":"MTUy"}',
    "commit-shard-too-big": b'{"op":"commit","group":"g","shard":2147483648,"checkpoint":"MTUy"}',
    "commit-shard-2-70": (
        b'{"op":"commit","group":"g","shard":1180591620717411303424,"checkpoint":"MTUy"}'
    ),
    "commit-consumer-number": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","consumer":5,"id":true}'
    ),
    "commit-force-int": b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","force":1}',
    "commit-wait-string": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","wait":"true"}'
    ),
    "commit-timeout-zero": b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":0}',
    "commit-timeout-negative": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":-1}'
    ),
    "commit-timeout-bool": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":true}'
    ),
    "commit-timeout-string": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":"5"}'
    ),
    "commit-timeout-too-long": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":3601}'
    ),
    "commit-timeout-huge-int": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":1' + b"0" * 400 + b"}"
    ),
    "commit-timeout-1e999": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":1e999}'
    ),
    "commit-timeout-1e300": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy","timeout":1e300}'
    ),
    "batch-and-single": (
        b'{"op":"commit","group":"g","shard":1,"checkpoint":"MTUy",'
        b'"checkpoints":[{"shard":1,"checkpoint":"MTUy"}]}'
    ),
    "batch-empty": b'{"op":"commit","group":"g","checkpoints":[],"id":"e"}',
    "batch-not-a-list": b'{"op":"commit","group":"g","checkpoints":{"shard":1}}',
    "batch-string": b'{"op":"commit","group":"g","checkpoints":"x"}',
    "batch-item-not-object": b'{"op":"commit","group":"g","checkpoints":[{"shard":0,'
    b'"checkpoint":"MTUy"},"item"]}',
    "batch-item-shard-string": (
        b'{"op":"commit","group":"g","id":"b","checkpoints":[{"shard":0,"checkpoint":"MTUy"},'
        b'{"shard":0,"checkpoint":"MTUy"},{"shard":"1","checkpoint":"MTUy"}]}'
    ),
    "batch-item-shard-missing": (
        b'{"op":"commit","group":"g","checkpoints":[{"shard":0,"checkpoint":"MTUy"},'
        b'{"checkpoint":"MTUy"}]}'
    ),
    "batch-item-checkpoint-missing": (b'{"op":"commit","group":"g","checkpoints":[{"shard":0}]}'),
    "batch-item-checkpoint-bad": (
        b'{"op":"commit","group":"g","checkpoints":[{"shard":0,"checkpoint":"MTUy"},'
        b'{"shard":1,"checkpoint":"xx"}]}'
    ),
    "batch-item-consumer-number": (
        b'{"op":"commit","group":"g","checkpoints":[{"shard":0,"checkpoint":"MTUy","consumer":5}]}'
    ),
    "batch-consumer-number": (
        b'{"op":"commit","group":"g","consumer":[],"checkpoints":[{"shard":0,"checkpoint":"MTUy"}]}'
    ),
    "get-group-missing": b'{"op":"get"}',
    "get-group-null": b'{"op":"get","group":null}',
    "get-shard-bool": b'{"op":"get","group":"g","shard":false}',
    "get-remote-int": b'{"op":"get","group":"g","remote":1}',
    "flush-group-number": b'{"op":"flush","group":1}',
    "flush-timeout-zero": b'{"op":"flush","timeout":0.0}',
}
BAD_CHECKPOINTS = ["", "MTU", "MTU=x", "QR==", "MT U=", "MTU=\n", "MTU-", "MT_=", "é===", 42, True]
BAD_LINES.update(
    {
        f"checkpoint-{index}": json.dumps(
            {"op": "commit", "group": "g", "shard": 1, "checkpoint": value, "id": index}
        ).encode()
        for index, value in enumerate(BAD_CHECKPOINTS)
    }
)
BAD_LINES.update(
    {f"unknown-op-id-{name}": b'{"op":"nope","id":' + value + b"}" for name, value in IDS.items()}
)

SHARD_ENTRY = {
    "group": "orders",
    "shard": 3,
    "pending": "MTU0",
    "committed": "MTUy",
    "committed_at": 1764130000.123456,
    "last_error": {
        "code": "ServerBusy",
        "message": "busy \u2013 retry \u00ablater\u00bb",
        "at": 1764130001.5,
    },
}
NEVER_SEEN = {
    "group": "orders",
    "shard": 7,
    "pending": None,
    "committed": None,
    "committed_at": None,
    "last_error": None,
}
REMOTE = {"checkpoint": "MTUy", "update_time": 1764130000, "consumer": "c1"}
STATUS = {
    "version": "0.1.0",
    "uptime_seconds": 12.5,
    "groups": {"orders": {"pending": 0, "tracked": 4, "failures": 0, "last_success": 1.5e9}},
}


def answer_to(request: Request) -> bytes:
    """What a daemon would answer to a request that parsed (a fixed, representative answer)."""
    rid = request.request_id
    if isinstance(request, CommitRequest):
        if request.batch:
            return encode_ok(rid, accepted=len(request.items))
        return encode_ok(rid)
    if isinstance(request, FlushRequest):
        return encode_ok(rid, committed=3)
    if isinstance(request, GetRequest):
        if request.shard is None:
            return encode_ok(rid, shards=[SHARD_ENTRY, NEVER_SEEN])
        if request.remote:
            return encode_ok(rid, shards=[{**SHARD_ENTRY, "remote": REMOTE}])
        return encode_ok(rid, shards=[NEVER_SEEN])
    if isinstance(request, StatusRequest):
        return encode_ok(rid, **STATUS)
    assert isinstance(request, PingRequest)
    return encode_ok(rid)


def answer_line(raw: bytes) -> bytes:
    try:
        request = parse_request(raw)
    except ProtocolError as exc:
        return encode_failure(exc)
    return answer_to(request)


RID = RequestId.of("r-1")
FAILED = [{"group": "orders", "shard": 1, "code": "ServerBusy", "message": "m", "dropped": False}]
ENCODED: dict[str, Callable[[], bytes]] = {
    "ok-plain": encode_ok,
    "ok-accepted": lambda: encode_ok(RID, accepted=100),
    "ok-fields-no-id": lambda: encode_ok(committed=0),
    "ok-release-null": lambda: encode_ok(RID, checkpoint=None),
    "ok-unicode-field": lambda: encode_ok(RID, note="ünï\ud800"),
    "error-no-id": lambda: encode_error(RequestId(), "Forbidden", "peer uid is not allowed"),
    "error-too-large": lambda: encode_error(
        RequestId(), "RequestTooLarge", "request line exceeds 1048576 bytes"
    ),
    "error-commit-failed": lambda: encode_error(
        RID, "CommitFailed", "1 shard failed", committed=3, failed=FAILED
    ),
    "error-flush-timeout": lambda: encode_error(
        RID, "Timeout", "flush timed out", committed=1, failed=[]
    ),
    "error-wait-dropped": lambda: encode_failure(
        RequestError("InvalidShardCheckPoint", "bad", error_fields={"dropped": True}), RID
    ),
    "error-batch-wait": lambda: encode_failure(
        RequestError(
            "ServerBusy",
            "busy",
            request_id=RequestId.of(5),
            error_fields={"dropped": False},
            fields={"failed": FAILED},
        ),
        RID,
    ),
    "error-id-from-exception-wins": lambda: encode_failure(
        RequestError("UnknownOp", "x", request_id=RequestId.of(None)), RID
    ),
    "error-no-id-in-exception": lambda: encode_failure(RequestError("UnknownOp", "x"), RID),
}
CODES = [
    "UnknownGroup",
    "CheckpointRegression",
    "Forbidden",
    "TooManyShards",
    "TooManyConnections",
    "NotOwner",
    "NotMember",
    "NotMembershipGroup",
    "ConsumerInUse",
    "ShuttingDown",
    "Timeout",
    "JournalError",
    "InternalError",
    "ServerBusy",
]
ENCODED.update(
    {
        f"code-{code}": (
            lambda code=code: encode_failure(ProtocolError(code, f"{code} «details»"), RID)
        )
        for code in CODES
    }
)


def current_answers() -> Iterator[tuple[str, str]]:
    for name, raw in {**OK_LINES, **BAD_LINES}.items():
        yield f"line:{name}", answer_line(raw).decode("ascii")
    for name, raw in OK_LINES.items():
        yield f"request:{name}", encode_request(parse_request(raw)).decode("ascii")
    for name, encode in ENCODED.items():
        yield f"encoded:{name}", encode().decode("ascii")


@functools.cache
def computed_answers() -> dict[str, str]:
    return dict(current_answers())


def load_golden() -> dict[str, str]:
    golden: dict[str, str] = json.loads(GOLDEN.read_text(encoding="ascii"))
    return golden


def test_every_ok_line_parses() -> None:
    for raw in OK_LINES.values():
        assert isinstance(parse_request(raw), Request)


def test_every_bad_line_is_refused() -> None:
    for raw in BAD_LINES.values():
        with pytest.raises(ProtocolError):
            parse_request(raw)


def test_the_golden_file_covers_the_whole_mix() -> None:
    assert sorted(load_golden()) == sorted(computed_answers())


def test_answers_are_byte_identical() -> None:
    computed = computed_answers()
    changed = {
        name: {"now": computed.get(name), "recorded": answer}
        for name, answer in load_golden().items()
        if computed.get(name) != answer
    }
    assert changed == {}


if __name__ == "__main__":
    GOLDEN.write_text(json.dumps(dict(current_answers()), indent=1) + "\n", encoding="ascii")
    sys.stdout.write(f"wrote {GOLDEN}\n")
