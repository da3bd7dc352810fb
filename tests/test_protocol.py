"""The request parser and answer encoder: every field rule of docs/protocol.md."""

from __future__ import annotations

import base64
import contextlib
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmgr import protocol
from cpmgr.errors import ProtocolError
from cpmgr.protocol import (
    MAX_DEPTH,
    MAX_SHARD,
    MAX_TIMEOUT,
    NO_ID,
    CommitItem,
    CommitRequest,
    FlushRequest,
    GetRequest,
    PingRequest,
    Request,
    RequestError,
    RequestId,
    StatusRequest,
    decode_cursor,
    encode_error,
    encode_failure,
    encode_ok,
    encode_ok_pieces,
    encode_request,
    is_blank,
    parse_request,
)

CP = base64.b64encode(b"1524155379373908496").decode()
CP2 = base64.b64encode(b"1524155379373908497").decode()


def line(obj: Any) -> bytes:
    return json.dumps(obj).encode() + b"\n"


def refused(raw: bytes) -> RequestError:
    with pytest.raises(RequestError) as info:
        parse_request(raw)
    return info.value


def commit(**fields: Any) -> dict[str, Any]:
    return {"op": "commit", "group": "orders", "shard": 3, "checkpoint": CP, **fields}


# --- framing and JSON ---------------------------------------------------------------------


def test_parses_single_commit() -> None:
    request = parse_request(line(commit()))
    assert request == CommitRequest(group="orders", items=(CommitItem(3, CP),))


@pytest.mark.parametrize("ending", [b"", b"\n", b"\r\n", b"  \r\n"])
def test_line_endings_are_accepted(ending: bytes) -> None:
    assert parse_request(b'{"op":"ping"}' + ending) == PingRequest()


@pytest.mark.parametrize("raw", [b"", b"\n", b"\r\n", b"  \t \r\n"])
def test_blank_lines_are_blank(raw: bytes) -> None:
    assert is_blank(raw)


def test_a_request_is_not_blank() -> None:
    assert not is_blank(b'{"op":"ping"}\n')


@pytest.mark.parametrize(
    "raw",
    [b"not json\n", b'{"op":"ping"\n', b"[1,2]\n", b'"ping"\n', b"42\n", b"null\n", b"\n"],
)
def test_not_a_json_object_is_bad_request_without_id(raw: bytes) -> None:
    err = refused(raw)
    assert err.code == "BadRequest"
    assert err.request_id == NO_ID


def test_non_utf8_is_bad_request() -> None:
    err = refused(b'{"op":"ping","x":"\xff\xfe"}\n')
    assert err.code == "BadRequest"
    assert "UTF-8" in err.message


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_and_infinity_are_refused(constant: str) -> None:
    err = refused(b'{"op":"ping","x":' + constant.encode() + b"}")
    assert err.code == "BadRequest"


def test_nesting_up_to_the_limit_is_accepted() -> None:
    nested = "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1)
    assert parse_request(f'{{"op":"ping","x":{nested}}}'.encode()) == PingRequest()


def test_nesting_past_the_limit_is_refused() -> None:
    nested = "[" * MAX_DEPTH + "]" * MAX_DEPTH
    err = refused(f'{{"op":"ping","x":{nested}}}'.encode())
    assert err.code == "BadRequest"
    assert "nested" in err.message


def test_very_deep_json_is_refused_cleanly() -> None:
    err = refused(b"[" * 500_000 + b"]" * 500_000)
    assert err.code == "BadRequest"


def test_brackets_inside_strings_do_not_count_as_nesting() -> None:
    text = json.dumps({"op": "ping", "x": "[{" * 100, "y": ['a"]\\'] * 40})
    assert parse_request(text.encode()) == PingRequest()


def test_huge_integer_is_refused_cleanly() -> None:
    err = refused(b'{"op":"get","group":"g","shard":' + b"9" * 10_000 + b"}")
    assert err.code == "BadRequest"


# --- id -------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["abc", 7, 1.5, True, None, -3, ""])
def test_id_is_kept_for_any_scalar(value: Any) -> None:
    request = parse_request(line({"op": "ping", "id": value}))
    assert request.request_id == RequestId.of(value)


def test_no_id_is_not_an_id_of_null() -> None:
    assert parse_request(line({"op": "ping"})).request_id == NO_ID
    assert parse_request(line({"op": "ping", "id": None})).request_id.present


@pytest.mark.parametrize("value", [[1], {"a": 1}])
def test_non_scalar_id_is_bad_request_without_echo(value: Any) -> None:
    err = refused(line({"op": "ping", "id": value}))
    assert err.code == "BadRequest"
    assert err.request_id == NO_ID


def test_errors_after_parsing_carry_the_id() -> None:
    err = refused(line({"op": "launch", "id": "x-1"}))
    assert err.code == "UnknownOp"
    assert err.request_id == RequestId.of("x-1")
    assert json.loads(encode_failure(err)) == {
        "ok": False,
        "id": "x-1",
        "error": {"code": "UnknownOp", "message": 'unknown op "launch"'},
    }


# --- ops ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "code"),
    [({}, "BadRequest"), ({"op": 3}, "BadRequest"), ({"op": "Commit"}, "UnknownOp")],
)
def test_op_is_required_and_known(obj: dict[str, Any], code: str) -> None:
    assert refused(line(obj)).code == code


def test_unknown_fields_are_ignored() -> None:
    request = parse_request(line(commit(extra={"deep": [1, 2]}, colour="red")))
    assert isinstance(request, CommitRequest)
    assert request.items == (CommitItem(3, CP),)


def test_commit_options() -> None:
    request = parse_request(line(commit(consumer="c1", force=True, wait=True, timeout=2.5, id=9)))
    assert request == CommitRequest(
        group="orders",
        items=(CommitItem(3, CP, "c1"),),
        force=True,
        wait=True,
        timeout=2.5,
        request_id=RequestId.of(9),
    )


def test_optional_nulls_are_absent() -> None:
    request = parse_request(line(commit(consumer=None, force=None, wait=None, timeout=None)))
    assert request == CommitRequest(group="orders", items=(CommitItem(3, CP),))


def test_empty_consumer_means_the_group_default() -> None:
    request = parse_request(line(commit(consumer="")))
    assert isinstance(request, CommitRequest)
    assert request.items[0].consumer is None


def test_flush_get_status_ping() -> None:
    assert parse_request(line({"op": "flush"})) == FlushRequest()
    assert parse_request(line({"op": "flush", "group": "g", "timeout": 3})) == FlushRequest(
        "g", 3.0
    )
    assert parse_request(line({"op": "get", "group": "g"})) == GetRequest("g")
    assert parse_request(line({"op": "get", "group": "g", "shard": 0, "remote": True})) == (
        GetRequest("g", 0, remote=True)
    )
    assert parse_request(line({"op": "status"})) == StatusRequest()
    assert parse_request(line({"op": "ping"})) == PingRequest()


@pytest.mark.parametrize(
    "obj",
    [
        {"op": "commit", "shard": 1, "checkpoint": CP},
        {"op": "commit", "group": 5, "shard": 1, "checkpoint": CP},
        {"op": "commit", "group": "g", "checkpoint": CP},
        {"op": "commit", "group": "g", "shard": 1},
        {"op": "commit", "group": "g", "shard": 1, "checkpoint": None},
        {"op": "get"},
        {"op": "get", "group": None},
        {"op": "flush", "group": 1},
    ],
)
def test_missing_or_mistyped_fields_are_bad_request(obj: dict[str, Any]) -> None:
    assert refused(line(obj)).code == "BadRequest"


@pytest.mark.parametrize("shard", [True, False, 3.0, -1, "3", [3], MAX_SHARD + 1, 2**70])
def test_shard_must_be_a_non_negative_integer(shard: Any) -> None:
    err = refused(line(commit(shard=shard)))
    assert err.code == "BadRequest"
    assert err.message.startswith("shard:")
    assert refused(line({"op": "get", "group": "g", "shard": shard})).code == "BadRequest"


def test_largest_shard_is_accepted() -> None:
    request = parse_request(line(commit(shard=MAX_SHARD)))
    assert isinstance(request, CommitRequest)
    assert request.items[0].shard == MAX_SHARD


@pytest.mark.parametrize(
    "checkpoint",
    [
        "",
        "MTUy",  # fine, for contrast, see test below
        "MTU",  # missing padding
        "MTU=x",
        "QR==",  # non-zero padding bits
        "MT U=",
        "MTU=\n",
        "MTU-",  # URL-safe alphabet
        "MT_=",
        "é===",
        42,
        True,
        ["MTUy"],
        {"c": "MTUy"},
    ],
)
def test_checkpoint_must_be_strict_standard_base64(checkpoint: Any) -> None:
    if checkpoint == "MTUy":
        assert isinstance(parse_request(line(commit(checkpoint=checkpoint))), CommitRequest)
        return
    err = refused(line(commit(checkpoint=checkpoint)))
    assert err.code == "InvalidShardCheckPoint"


@pytest.mark.parametrize("flag", ["force", "wait"])
@pytest.mark.parametrize("value", [1, 0, "true", [], {}])
def test_flags_must_be_booleans(flag: str, value: Any) -> None:
    assert refused(line(commit(**{flag: value}))).code == "BadRequest"


@pytest.mark.parametrize("value", [1, "yes"])
def test_remote_must_be_a_boolean(value: Any) -> None:
    err = refused(line({"op": "get", "group": "g", "remote": value}))
    assert err.code == "BadRequest"


@pytest.mark.parametrize("timeout", [0, 0.0, -1, True, "5", [5], MAX_TIMEOUT + 1, 10**400, 1e300])
def test_timeout_must_be_a_positive_finite_number_in_range(timeout: Any) -> None:
    raw = json.dumps(commit()).encode()[:-1] + b',"timeout":' + json.dumps(timeout).encode()
    err = refused(raw + b"}")
    assert err.code == "BadRequest"
    assert err.message.startswith("timeout:")
    assert refused(line({"op": "flush", "timeout": timeout})).code == "BadRequest"


def test_timeout_overflowing_to_infinity_is_refused() -> None:
    assert refused(b'{"op":"flush","timeout":1e999}').code == "BadRequest"


def test_timeout_at_the_cap_is_accepted() -> None:
    assert parse_request(line({"op": "flush", "timeout": MAX_TIMEOUT})) == FlushRequest(
        timeout=MAX_TIMEOUT
    )
    assert parse_request(line({"op": "flush", "timeout": 0.001})) == FlushRequest(timeout=0.001)


# --- batch ----------------------------------------------------------------------------------


def batch(items: Any, **fields: Any) -> bytes:
    return line({"op": "commit", "group": "orders", "checkpoints": items, **fields})


def test_batch_commit() -> None:
    request = parse_request(
        batch(
            [{"shard": 1, "checkpoint": CP, "consumer": "a"}, {"shard": 2, "checkpoint": CP2}],
            consumer="dflt",
            force=True,
            wait=True,
            timeout=1,
        )
    )
    assert request == CommitRequest(
        group="orders",
        items=(CommitItem(1, CP, "a"), CommitItem(2, CP2, "dflt")),
        batch=True,
        force=True,
        wait=True,
        timeout=1.0,
    )


def test_batch_shard_twice_keeps_the_last() -> None:
    request = parse_request(
        batch(
            [
                {"shard": 1, "checkpoint": CP},
                {"shard": 2, "checkpoint": CP},
                {"shard": 1, "checkpoint": CP2, "consumer": "late"},
            ]
        )
    )
    assert isinstance(request, CommitRequest)
    assert request.items == (CommitItem(2, CP), CommitItem(1, CP2, "late"))


def test_empty_batch_is_bad_request() -> None:
    err = refused(batch([]))
    assert err.code == "BadRequest"
    assert "empty" in err.message


@pytest.mark.parametrize("items", ["x", {"shard": 1}, 3])
def test_batch_must_be_a_list(items: Any) -> None:
    assert refused(batch(items)).code == "BadRequest"


@pytest.mark.parametrize(
    ("bad", "code", "where"),
    [
        ({"shard": "1", "checkpoint": CP}, "BadRequest", "checkpoints[2].shard"),
        ({"shard": 1, "checkpoint": "xx"}, "InvalidShardCheckPoint", "checkpoints[2].checkpoint"),
        ({"checkpoint": CP}, "BadRequest", "checkpoints[2].shard"),
        ({"shard": 1}, "BadRequest", "checkpoints[2].checkpoint"),
        ({"shard": 1, "checkpoint": CP, "consumer": 5}, "BadRequest", "checkpoints[2].consumer"),
        ("item", "BadRequest", "checkpoints[2]"),
    ],
)
def test_bad_batch_item_refuses_the_batch_and_names_its_index(
    bad: Any, code: str, where: str
) -> None:
    good = {"shard": 0, "checkpoint": CP}
    err = refused(batch([good, good, bad, good], id="b"))
    assert err.code == code
    assert err.message.startswith(where)
    assert err.request_id == RequestId.of("b")


def test_batch_and_single_fields_together_are_bad_request() -> None:
    raw = line(commit(checkpoints=[{"shard": 1, "checkpoint": CP}]))
    assert refused(raw).code == "BadRequest"


# --- consumer names -----------------------------------------------------------------------


CONSUMER_CHARS = "ABCXYZabcxyz0189._@:-"


@pytest.mark.parametrize(
    "name", ["c", "pod-a-1", "pod_a.1@node:7", "a" * 128, CONSUMER_CHARS, "-", "@:"]
)
def test_consumer_names_of_the_allowed_characters_are_kept(name: str) -> None:
    single = parse_request(line(commit(consumer=name)))
    assert isinstance(single, CommitRequest)
    assert single.items[0].consumer == name
    many = parse_request(batch([{"shard": 1, "checkpoint": CP}], consumer=name))
    assert isinstance(many, CommitRequest)
    assert many.items[0].consumer == name


BAD_CONSUMERS = [
    "a" * 129,
    "x" * 500_000,  # accepted once, then every commit failed with a URL too long
    "pod a",
    "pod/a",
    "a&b=c",
    "a%20b",
    "a?b",
    "a#b",
    "pod\n",
    "pod\u0000",
    "caf\u00e9",
    "\u0661",  # an Arabic-Indic digit: a digit to str.isdigit(), not to SLS
    "a+b",
    "*",
]


@pytest.mark.parametrize("name", BAD_CONSUMERS)
def test_consumer_name_outside_the_rule_is_bad_request(name: str) -> None:
    err = refused(line(commit(consumer=name, id=4)))
    assert (err.code, err.request_id) == ("BadRequest", RequestId.of(4))
    assert err.message.startswith("consumer: must be 1-128 characters")


@pytest.mark.parametrize("name", BAD_CONSUMERS)
def test_bad_consumer_name_in_a_batch_names_the_field(name: str) -> None:
    good = {"shard": 0, "checkpoint": CP, "consumer": "pod-a-1"}
    bad = {"shard": 1, "checkpoint": CP, "consumer": name}
    err = refused(batch([good, good, bad]))
    assert err.code == "BadRequest"
    assert err.message.startswith("checkpoints[2].consumer: must be 1-128 characters")
    assert refused(batch([good], consumer=name)).message.startswith("consumer: must be")


def test_empty_consumer_in_a_batch_means_the_default() -> None:
    request = parse_request(
        batch([{"shard": 1, "checkpoint": CP, "consumer": ""}, {"shard": 2, "checkpoint": CP}])
    )
    assert isinstance(request, CommitRequest)
    assert [item.consumer for item in request.items] == [None, None]
    request = parse_request(batch([{"shard": 1, "checkpoint": CP, "consumer": ""}], consumer="d"))
    assert isinstance(request, CommitRequest)
    assert request.items[0].consumer == "d"


# --- cursors and answers --------------------------------------------------------------------


def test_decode_cursor() -> None:
    assert decode_cursor(CP) == 1524155379373908496
    assert decode_cursor(base64.b64encode(b"007").decode()) == 7
    assert decode_cursor(base64.b64encode(b"12a").decode()) is None
    assert decode_cursor(base64.b64encode(b"-12").decode()) is None
    assert decode_cursor(base64.b64encode("١٢".encode()).decode()) is None
    assert decode_cursor(base64.b64encode(b"9" * 5000).decode()) is None
    assert decode_cursor("not base64!") is None
    assert decode_cursor("") is None


CURSORS = [
    b"1524155379373908496",
    b"007",
    b"0",
    b"12a",
    b"-12",
    b" 12",
    b"1_2",
    "١٢".encode(),
    b"9" * 256,
    b"9" * 257,
    b"\x00\xff",
]


@pytest.mark.parametrize("raw", CURSORS)
def test_parsed_items_carry_the_number_of_their_cursor(raw: bytes) -> None:
    checkpoint = base64.b64encode(raw).decode()
    single = parse_request(line(commit(checkpoint=checkpoint)))
    many = parse_request(
        batch([{"shard": 1, "checkpoint": CP}, {"shard": 2, "checkpoint": checkpoint}])
    )
    assert isinstance(single, CommitRequest)
    assert isinstance(many, CommitRequest)
    assert single.items[0].number == decode_cursor(checkpoint)
    assert [item.number for item in many.items] == [decode_cursor(CP), decode_cursor(checkpoint)]


def test_items_built_by_hand_work_out_their_number() -> None:
    assert CommitItem(1, CP).number == 1524155379373908496
    assert CommitItem(1, "/+8A").number is None
    # The number follows from the checkpoint: it takes no part in equality.
    assert CommitItem(1, CP, number=5) == CommitItem(1, CP)


def test_encode_ok_echoes_the_id() -> None:
    assert json.loads(encode_ok(RequestId.of(None), accepted=2)) == {
        "ok": True,
        "accepted": 2,
        "id": None,
    }
    assert encode_ok() == b'{"ok":true}\n'


def test_encode_error_puts_fields_where_the_contract_says() -> None:
    answer = json.loads(
        encode_error(
            RequestId.of(1),
            "CommitFailed",
            "1 shard failed",
            committed=3,
            failed=[{"group": "g", "shard": 1}],
        )
    )
    assert answer == {
        "ok": False,
        "committed": 3,
        "failed": [{"group": "g", "shard": 1}],
        "error": {"code": "CommitFailed", "message": "1 shard failed"},
        "id": 1,
    }
    wait_failure = RequestError("ServerBusy", "busy", error_fields={"dropped": False})
    assert json.loads(encode_failure(wait_failure, RequestId.of("w"))) == {
        "ok": False,
        "error": {"code": "ServerBusy", "message": "busy", "dropped": False},
        "id": "w",
    }


def test_plain_protocol_error_is_encoded_with_the_given_id() -> None:
    answer = json.loads(encode_failure(ProtocolError("UnknownGroup", "no"), RequestId.of(4)))
    assert answer == {"ok": False, "error": {"code": "UnknownGroup", "message": "no"}, "id": 4}


def test_answers_are_one_ascii_line_even_with_odd_ids() -> None:
    request = parse_request(b'{"op":"ping","id":"\\ud800\\u00e9\\n"}')
    out = encode_ok(request.request_id)
    assert out.endswith(b"\n")
    assert out.count(b"\n") == 1
    assert json.loads(out)["id"] == "\ud800\u00e9\n"


# --- properties -----------------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner),
    max_leaves=20,
)
FIELDS = "op id group shard checkpoint checkpoints consumer force wait timeout remote"
fieldnames = st.sampled_from(FIELDS.split())
ops = st.sampled_from(["commit", "flush", "get", "status", "ping", "other"])
checkpoints = st.binary(min_size=1, max_size=12).map(lambda b: base64.b64encode(b).decode())
request_like = st.dictionaries(
    fieldnames, json_values | ops | checkpoints | st.integers(0, 5), max_size=8
)
FAST = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@FAST
@given(st.binary(max_size=200))
def test_arbitrary_bytes_parse_or_raise_protocol_error(raw: bytes) -> None:
    with contextlib.suppress(ProtocolError):
        parse_request(raw)


TOKENS = [b"{", b"}", b"[", b"]", b'"', b"\\", b":", b",", b" ", b"\n", b"\xff", b"\xc3"]
TOKENS += [b"1", b"-0", b"1e999", b"NaN", b"null", b"true", b'"op"', b'"commit"', b'"id"']
TOKENS += [b'"group"', b'"g"', b'"shard"', b'"checkpoint"', b'"MTUy"', b'"checkpoints"']
TOKENS += [b'"consumer"', b'"c"', b'"\\ud800"', b'"timeout"', b'"ping"', b'"get"', b'"flush"']


@FAST
@given(st.lists(st.sampled_from(TOKENS), max_size=60).map(b"".join))
def test_token_soup_parses_or_raises_protocol_error_and_is_answered(raw: bytes) -> None:
    try:
        request = parse_request(raw)
    except ProtocolError as exc:
        answer = json.loads(encode_failure(exc))
        assert answer["ok"] is False
        return
    assert parse_request(encode_request(request)) == request


@FAST
@given(request_like)
def test_arbitrary_request_objects_parse_or_raise_protocol_error(obj: dict[str, Any]) -> None:
    raw = json.dumps(obj).encode()
    try:
        request = parse_request(raw)
    except RequestError as err:
        answer = json.loads(encode_failure(err))
        assert answer["ok"] is False
        # Every object with a scalar id gets it echoed.
        if "id" in obj and not isinstance(obj["id"], list | dict):
            assert answer["id"] == obj["id"]
        return
    assert parse_request(encode_request(request)) == request


groups = st.text(min_size=1, max_size=10)
shards = st.integers(0, MAX_SHARD)
consumers = st.none() | st.text(CONSUMER_CHARS, min_size=1, max_size=128)
timeouts = st.none() | st.floats(0.001, MAX_TIMEOUT)
ids = st.just(NO_ID) | json_scalars.map(RequestId.of)
items = st.builds(CommitItem, shards, checkpoints, consumers)
single_commits = st.builds(
    CommitRequest,
    group=groups,
    items=items.map(lambda item: (item,)),
    batch=st.just(False),
    force=st.booleans(),
    wait=st.booleans(),
    timeout=timeouts,
    request_id=ids,
)
batch_commits = st.builds(
    CommitRequest,
    group=groups,
    items=st.lists(items, min_size=1, max_size=5, unique_by=lambda i: i.shard).map(tuple),
    batch=st.just(True),
    force=st.booleans(),
    wait=st.booleans(),
    timeout=timeouts,
    request_id=ids,
)
requests: st.SearchStrategy[Request] = st.one_of(
    single_commits,
    batch_commits,
    st.builds(FlushRequest, st.none() | groups, timeouts, ids),
    st.builds(GetRequest, groups, st.none() | shards, st.booleans(), ids),
    st.builds(StatusRequest, ids),
    st.builds(PingRequest, ids),
)


@FAST
@given(requests)
def test_valid_requests_round_trip(request: Request) -> None:
    assert parse_request(encode_request(request)) == request


# The single commit's fast reading (protocol._plain_commit) against the general builder, on
# objects near its shape: right and wrong types, values out of range, extra fields.
EDGES = [-1, 0, MAX_SHARD, MAX_SHARD + 1, True, 1.0, None, [], {}, "", "commit", "ping", "g"]
EDGES += ["MTUy", "MTUy=", "YQ==", "YR==", " MTUy", "c", 1.5, float(MAX_SHARD)]
near_plain_values = st.sampled_from(EDGES) | json_scalars | checkpoints
near_plain = st.dictionaries(
    st.sampled_from(["op", "group", "shard", "checkpoint", "id", "consumer", "force"]),
    near_plain_values,
    min_size=3,
    max_size=6,
)
plain_commits = st.fixed_dictionaries(
    {"op": st.just("commit"), "group": st.text(max_size=10), "shard": shards},
    optional={"id": st.integers() | st.text(max_size=8)},
).flatmap(lambda obj: checkpoints.map(lambda cp: {**obj, "checkpoint": cp}))

# A valid single commit with one field changed or one added: the shapes closest to the fast one.
one_off_plain = st.tuples(
    plain_commits,
    st.sampled_from(["op", "group", "shard", "checkpoint", "id", "consumer", "force"]),
    st.sampled_from(EDGES) | json_values,
).map(lambda change: {**change[0], change[1]: change[2]})


def general_reading(raw: bytes) -> Request | ProtocolError:
    """What the general builder makes of a line, or the error it raises."""
    obj = protocol._load_object(raw)
    try:
        return protocol._build(obj, protocol._request_id(obj))
    except ProtocolError as exc:
        return exc


@settings(FAST, max_examples=1500)
@given(near_plain | plain_commits | one_off_plain)
def test_the_fast_single_commit_reads_what_the_general_builder_reads(obj: dict[str, Any]) -> None:
    raw = json.dumps(obj).encode()
    fast = protocol._plain_commit(protocol._load_object(raw))
    if fast is None:
        return  # the general builder reads it, as before
    general = general_reading(raw)
    assert isinstance(general, CommitRequest)
    assert fast == general
    assert [item.number for item in fast.items] == [item.number for item in general.items]
    assert fast.request_id == general.request_id
    assert parse_request(raw) == general


@FAST
@given(plain_commits)
def test_every_valid_single_commit_takes_the_fast_reading(obj: dict[str, Any]) -> None:
    assert protocol._plain_commit(protocol._load_object(json.dumps(obj).encode())) is not None


def dumped(answer: dict[str, Any]) -> bytes:
    """An answer as json.dumps() writes it: the bytes clients have always received."""
    return json.dumps(answer, separators=(",", ":"), allow_nan=False).encode("ascii") + b"\n"


any_text = st.text(st.characters(exclude_categories=()), max_size=12)  # lone surrogates too
wire_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(-(10**300), 10**300)
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_text
)


RESERVED = {"ok", "id", "error", "code", "message", "error_fields", "request_id"}
field_names = any_text.filter(lambda name: name not in RESERVED)


@FAST
@given(wire_scalars, st.dictionaries(field_names, wire_scalars, max_size=3))
def test_answers_are_the_bytes_json_dumps_writes(value: Any, fields: dict[str, Any]) -> None:
    rid = RequestId.of(value)
    assert encode_ok() == dumped({"ok": True})
    assert encode_ok(rid) == dumped({"ok": True, "id": value})
    assert encode_ok(rid, **fields) == dumped({"ok": True, **fields, "id": value})
    error = {"code": "Timeout", "message": "m"}
    assert encode_error(rid, "Timeout", "m", **fields) == dumped(
        {"ok": False, **fields, "error": error, "id": value}
    )


@FAST
@given(st.none() | wire_scalars.map(RequestId.of), st.integers() | st.booleans())
def test_a_batch_answer_is_the_bytes_json_dumps_writes(rid: RequestId | None, count: int) -> None:
    expected: dict[str, Any] = {"ok": True, "accepted": count}
    if rid is not None:
        expected["id"] = rid.value
    assert encode_ok(rid or NO_ID, accepted=count) == dumped(expected)


@FAST
@given(wire_scalars)
def test_every_id_that_parses_is_echoed_exactly(value: Any) -> None:
    raw = json.dumps({"op": "ping", "id": value}).encode()
    request = parse_request(raw)
    assert encode_ok(request.request_id) == dumped({"ok": True, "id": value})


def nesting(value: Any) -> int:
    """How deep containers nest in a JSON value (a scalar is 0, `[]` is 1)."""
    if isinstance(value, dict):
        return 1 + max(map(nesting, value.values()), default=0)
    if isinstance(value, list):
        return 1 + max(map(nesting, value), default=0)
    return 0


def chain_of(depth: int, leaf: Any) -> Any:
    for level in range(depth):
        leaf = [leaf] if level % 2 else {"k": leaf}
    return leaf


# Where a nested value may sit in a batch commit: fields the parser checks and fields it
# ignores, at the top and in an item; the depth check must see every one of them.
PLACES = ["x", "id", "consumer", "group", "checkpoints", "item.note", "item.shard", "item.consumer"]


@FAST
@given(
    st.sampled_from(PLACES),
    st.integers(0, MAX_DEPTH + 3),
    st.integers(0, 3),
    json_scalars,
)
def test_depth_is_checked_wherever_the_nesting_is(
    place: str, depth: int, item_index: int, leaf: Any
) -> None:
    items: list[Any] = [{"shard": i, "checkpoint": CP} for i in range(4)]
    obj: dict[str, Any] = {"op": "commit", "group": "orders", "checkpoints": items, "id": 1}
    nested = chain_of(depth, leaf)
    if place.startswith("item."):
        items[item_index][place[5:]] = nested
    else:
        obj[place] = nested
    try:
        parse_request(json.dumps(obj).encode())
    except RequestError as err:
        too_deep = "nested deeper" in err.message
        assert too_deep == (nesting(obj) > MAX_DEPTH), err.message
        if too_deep:
            assert err.request_id == NO_ID
        return
    assert nesting(obj) <= MAX_DEPTH


@settings(FAST, max_examples=100)
@given(json_values, st.integers(0, MAX_DEPTH + 3))
def test_deep_values_anywhere_are_refused(value: Any, depth: int) -> None:
    obj = {"op": "ping", "x": chain_of(depth, value)}
    raw = json.dumps(obj).encode()
    if nesting(obj) > MAX_DEPTH:
        assert "nested deeper" in refused(raw).message
    else:
        assert parse_request(raw) == PingRequest()


@FAST
@given(st.text(alphabet='[]{}":,0\\ ', max_size=300))
def test_bracket_soup_parses_or_raises_protocol_error(text: str) -> None:
    with contextlib.suppress(ProtocolError):
        parse_request(('{"op":"ping","x":' + text + "}").encode())


@pytest.mark.parametrize("chunk", [1, 2, 7, 1000])
@pytest.mark.parametrize(
    "request_id",
    [NO_ID, RequestId.of(7), RequestId.of("é\ud800"), RequestId.of(1.5), RequestId.of(None)],
)
@pytest.mark.parametrize("count", [0, 1, 6, 13])
def test_an_answer_encoded_in_pieces_has_the_bytes_of_one_encoded_at_once(
    chunk: int, request_id: RequestId, count: int
) -> None:
    items = [
        {"group": "orders", "shard": n, "pending": None, "note": "ü" * n} for n in range(count)
    ]
    pieces = list(encode_ok_pieces(request_id, "shards", items, chunk=chunk))
    assert b"".join(pieces) == encode_ok(request_id, shards=items)
    assert len(pieces) == 2 + -(-count // chunk)  # head, one piece per chunk, tail
