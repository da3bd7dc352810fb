"""The client's sans-I/O core fed bytes: framing, answers by id and order, events apart."""

from __future__ import annotations

import itertools
import json
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cpmgr.client import (
    Assigned,
    ClientCore,
    CpmgrClientError,
    Ended,
    Lost,
    OtherEvent,
    Reply,
    Revoked,
)
from cpmgr.client.core import Received
from cpmgr.client.member import MemberState


def line(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


ASSIGNED = {"event": "assigned", "group": "g", "consumer": "c", "shard": 3, "checkpoint": "MTA="}
REVOKED = {
    "event": "revoked",
    "group": "g",
    "consumer": "c",
    "shard": 3,
    "reason": "rebalance",
    "deadline": 10.0,
}
ENDED = {"event": "ended", "group": "g", "consumer": "c", "shard": 4}
LOST = {"event": "lost", "group": "g", "consumer": "c", "shards": [3, 5], "reason": "not_owner"}
FUTURE = {"event": "split", "group": "g", "consumer": "c", "parent": 1}


def described(items: list[Received]) -> list[object]:
    return [
        ("reply", i.request_id, i.answer) if isinstance(i, Reply) else ("event", i.raw)
        for i in items
    ]


def stream() -> tuple[ClientCore, bytes]:
    """A core with three requests out, and a daemon's bytes answering them between events."""
    core = ClientCore()
    core.send([{"op": "ping"}, {"op": "commit", "group": "g", "shard": 3, "checkpoint": "MTA="}])
    core.send([{"op": "release", "group": "g", "shard": 3}])
    data = b"".join(
        [
            line(ASSIGNED),
            line({"ok": True, "id": 1}),
            line(REVOKED),
            line(ENDED),
            b"\r\n",  # a blank line is ignored
            line({"ok": True, "id": 2}),
            line(FUTURE),
            line(LOST),
            line({"ok": True, "checkpoint": "MTA=", "id": 3}),
        ]
    )
    return core, data


def test_requests_are_pipelined_with_ids() -> None:
    core = ClientCore()
    ids, data = core.send([{"op": "ping"}, {"op": "flush", "group": "g"}])
    assert ids == [1, 2]
    assert data == b'{"op":"ping","id":1}\n{"op":"flush","group":"g","id":2}\n'
    assert core.waiting == 2


def test_events_go_apart_and_answers_match_requests_in_order() -> None:
    core, data = stream()
    received = core.receive(data)
    assert [type(i).__name__ for i in received] == [
        "Assigned",
        "Reply",
        "Revoked",
        "Ended",
        "Reply",
        "OtherEvent",
        "Lost",
        "Reply",
    ]
    replies = [i for i in received if isinstance(i, Reply)]
    assert [(r.request_id, r.payload["op"]) for r in replies] == [
        (1, "ping"),
        (2, "commit"),
        (3, "release"),
    ]
    assert core.waiting == 0
    assigned, revoked, ended, other, lost = (i for i in received if not isinstance(i, Reply))
    assert assigned == Assigned(group="g", consumer="c", shard=3, checkpoint="MTA=", raw={})
    assert revoked == Revoked(
        group="g", consumer="c", shard=3, reason="rebalance", deadline=10.0, raw={}
    )
    assert ended == Ended(group="g", consumer="c", shard=4, raw={})
    assert lost == Lost(group="g", consumer="c", shards=(3, 5), reason="not_owner", raw={})
    # An event kind this client does not know is passed on whole, not dropped.
    assert isinstance(other, OtherEvent)
    assert (other.kind, other.raw) == ("split", FUTURE)


@given(st.lists(st.integers(min_value=0, max_value=600), max_size=12))
def test_any_split_of_the_stream_gives_the_same_replies_and_events(cuts: list[int]) -> None:
    whole_core, data = stream()
    expected = described(whole_core.receive(data))
    core, _ = stream()
    received: list[Received] = []
    bounds = [0, *sorted(min(c, len(data)) for c in cuts), len(data)]
    for start, end in itertools.pairwise(bounds):
        received += core.receive(data[start:end])
    assert described(received) == expected


def test_an_event_never_answers_a_waiting_request() -> None:
    core = ClientCore()
    core.send([{"op": "ping"}])
    assert described(core.receive(line(ASSIGNED) + line(ASSIGNED))) == [
        ("event", ASSIGNED),
        ("event", ASSIGNED),
    ]
    assert core.waiting == 1
    # A line with both `event` and `ok` is an answer (the rule is: event and no ok).
    reply = core.receive(line({"ok": True, "event": "x", "id": 1}))
    assert isinstance(reply[0], Reply)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (line({"ok": True, "id": 7}), "answer for request 7, expected 1"),
        (b"not json\n", "not JSON"),
        (b"[1]\n", "not an object"),
        (line({**ASSIGNED, "shard": "3"}), "malformed assigned event"),
        (line({"event": "lost", "group": "g", "consumer": "c"}), "malformed lost event"),
    ],
)
def test_an_out_of_step_stream_is_an_error(data: bytes, message: str) -> None:
    core = ClientCore()
    core.send([{"op": "ping"}])
    with pytest.raises(CpmgrClientError, match=message):
        core.receive(data)


def test_an_answer_to_no_request_is_an_error() -> None:
    with pytest.raises(CpmgrClientError, match="never sent"):
        ClientCore().receive(line({"ok": True}))


def test_an_answer_without_id_still_comes_in_order() -> None:
    core = ClientCore()
    core.send([{"op": "ping"}, {"op": "ping"}])
    bad = {"ok": False, "error": {"code": "BadRequest", "message": "not JSON"}}
    received = core.receive(line(bad) + line({"ok": True, "id": 2}))
    assert [(r.request_id, r.answer) for r in received if isinstance(r, Reply)] == [
        (1, bad),
        (2, {"ok": True, "id": 2}),
    ]


def test_a_connection_level_refusal_answers_every_waiting_request() -> None:
    core = ClientCore()
    core.send([{"op": "ping"}] * 3)
    refusal = {"ok": False, "error": {"code": "Forbidden", "message": "uid 5 not allowed"}}
    received = core.receive(line(refusal) + line({"ok": True, "id": 2}))
    assert [(r.request_id, r.answer) for r in received if isinstance(r, Reply)] == [
        (1, refusal),
        (2, refusal),
        (3, refusal),
    ]
    assert core.refused == refusal


def test_unanswered_requests_are_handed_back_in_order() -> None:
    core = ClientCore()
    core.send([{"op": "ping"}, {"op": "flush"}, {"op": "status"}])
    core.receive(line({"ok": True, "id": 1}) + b'{"ok":tr')
    assert core.unanswered() == [{"op": "flush"}, {"op": "status"}]
    assert core.waiting == 0
    core.send([{"op": "ping"}])
    assert described(core.receive(line({"ok": True, "id": 4}))) == [
        ("reply", 4, {"ok": True, "id": 4})
    ]


def test_a_line_longer_than_the_bound_is_refused() -> None:
    core = ClientCore(max_line_bytes=100)
    core.send([{"op": "ping"}])
    core.receive(b"x" * 100)
    with pytest.raises(CpmgrClientError, match="too long"):
        core.receive(b"x")


def test_a_long_answer_in_small_reads_is_scanned_once() -> None:
    """Each read scans only its new bytes for the newline: 8 MiB in 1 KiB reads costs about
    what one read does (rescanning the growing buffer each time costs some 30 times more)."""
    answer = line({"ok": True, "id": 1, "x": "a" * (8 << 20)})

    def cpu(step: int) -> float:
        core = ClientCore()
        core.send([{"op": "get"}])
        started = time.process_time()
        for start in range(0, len(answer), step):
            received = core.receive(answer[start : start + step])
        assert isinstance(received[0], Reply)
        return time.process_time() - started

    whole = cpu(len(answer))
    chunked = cpu(1024)
    assert chunked < 10 * whole + 0.1, (chunked, whole)


# --- what a member holds -----------------------------------------------------------------


def test_member_state_follows_events_and_answers_in_arrival_order() -> None:
    state = MemberState("g", "c")
    core = ClientCore()
    core.send([{"op": "release", "group": "g", "shard": 3}])
    reassigned = {**ASSIGNED, "checkpoint": "MjA="}
    # The release answer and the shard's next assignment arrive in one read: the late
    # answer must not drop the new holding.
    data = line(ASSIGNED) + line(REVOKED) + line({"ok": True, "id": 1}) + line(reassigned)
    passed_on = [state.observe(item) for item in core.receive(data)]
    assert [e.kind for e in passed_on if e is not None] == ["assigned", "revoked", "assigned"]
    assert state.shards == {3: "held"}
    state.observe(Revoked(group="g", consumer="c", shard=3, reason="shutdown", deadline=1, raw={}))
    assert state.shards == {3: "releasing"}
    state.observe(Lost(group="g", consumer="c", shards=(3,), reason="expired", raw={}))
    assert state.shards == {}


def test_member_state_on_leave_and_disconnect() -> None:
    state = MemberState("g", "c")
    state.observe(Assigned(group="g", consumer="c", shard=1, checkpoint="MQ==", raw={}))
    state.observe(Assigned(group="g", consumer="c", shard=0, checkpoint="MQ==", raw={}))
    refused = {"ok": False, "error": {"code": "CommitFailed", "message": "x"}}
    state.observe(Reply(1, {"op": "leave", "group": "g"}, refused))
    assert (state.shards, state.ended) == ({0: "held", 1: "held"}, False)
    lost = state.disconnected()
    assert (lost.shards, lost.reason, state.shards, state.ended) == (
        (0, 1),
        "disconnected",
        {},
        True,
    )
    assert lost.raw == {
        "event": "lost",
        "group": "g",
        "consumer": "c",
        "shards": [0, 1],
        "reason": "disconnected",
    }
    left = MemberState("g", "c")
    left.observe(Reply(1, {"op": "leave", "group": "g"}, {"ok": True, "released": 0}))
    assert left.ended
