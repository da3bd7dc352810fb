"""Hostile request lines cost CPU linear in their size and are answered (docs/protocol.md).

Each attack line is about `max_line_bytes` (1 MiB, the largest line the socket reads) and its
CPU per byte is bounded generously against a benign line of the same size measured in the
same test, so a slow or busy machine cannot make these fail, but a superlinear parser cannot
pass: the quadratic nesting check this replaced spent 67 s on 80 KB of the first shape.
"""

from __future__ import annotations

import base64
import gc
import json
import time

from cpmgr.errors import ProtocolError
from cpmgr.protocol import MAX_DEPTH, CommitRequest, PingRequest, encode_failure, parse_request

LINE_BYTES = 1 << 20
# How many times the benign line's CPU per byte an attack line may cost.
MAX_RATIO = 20


def cpu_per_byte(line: bytes) -> float:
    """The least CPU seconds per byte parse_request took on `line` over a few runs."""
    best = float("inf")
    gc.disable()  # a collection landing in one run is noise, not the parser's cost
    try:
        for _ in range(3):
            start = time.process_time()
            try:
                parse_request(line)
            except ProtocolError as exc:
                encode_failure(exc)
            best = min(best, time.process_time() - start)
    finally:
        gc.enable()
    return max(best, 1e-6) / len(line)


def benign_line() -> bytes:
    """A valid batch commit as large as a line may be: the most a well-behaved client sends."""
    entries = []
    size = 64
    shard = 0
    while size < LINE_BYTES - 200:
        cursor = base64.b64encode(str(1524155379373908496 + shard).encode()).decode()
        entry = f'{{"shard":{shard},"checkpoint":"{cursor}","consumer":"pod-a-1"}}'
        entries.append(entry)
        size += len(entry) + 1
        shard += 1
    return f'{{"op":"commit","group":"orders","checkpoints":[{",".join(entries)}]}}\n'.encode()


def assert_linear(*attacks: bytes) -> None:
    baseline = cpu_per_byte(benign_line())
    for attack in attacks:
        assert LINE_BYTES * 0.9 <= len(attack) <= LINE_BYTES * 1.1
        ratio = cpu_per_byte(attack) / baseline
        assert ratio <= MAX_RATIO, (ratio, attack[:40])


def refused_as_bad_request(attack: bytes) -> str:
    try:
        parse_request(attack)
    except ProtocolError as exc:
        assert exc.code == "BadRequest"
        assert encode_failure(exc).endswith(b"\n")
        return exc.message
    raise AssertionError("the attack line was accepted")


def fill(prefix: str, unit: str, suffix: str = "") -> bytes:
    count = (LINE_BYTES - len(prefix) - len(suffix)) // len(unit)
    return (prefix + unit * count + suffix).encode()


def test_attack_quadratic_escape_line_is_linear() -> None:
    # The shape that froze a live daemon: brackets, then an unterminated string of `\"`.
    attack = fill("[" * (MAX_DEPTH + 1) + '"', '\\"')
    assert "not valid JSON" in refused_as_bad_request(attack)
    assert_linear(attack)


def test_attack_quadratic_escape_inside_a_request_is_linear() -> None:
    attack = fill('{"op":"ping","x":' + "[{" * 40 + '"', '\\"\\\\')
    refused_as_bad_request(attack)
    assert_linear(attack)


def deep_in_the_last_item() -> bytes:
    """A batch as large as a line whose last item holds one value nested too deep."""
    line = benign_line()
    head = line[: line.rindex(b"},", 0, len(line) - 1000) + 1]
    deep = b"[" * (MAX_DEPTH - 2) + b"]" * (MAX_DEPTH - 2)
    return head + b',{"shard":1,"checkpoint":"MTUy","x":' + deep + b"}]}"


def test_attack_deep_nesting_is_linear() -> None:
    attacks = [
        fill("", "["),
        fill("", '{"a":'),
        fill('{"op":"ping","x":[', "[" * 500 + "]" * 500 + ",", "0]}"),
        fill('{"op":"ping","x":[', "[" * (MAX_DEPTH - 1) + "]" * (MAX_DEPTH - 1) + ",", "0]}"),
        deep_in_the_last_item(),
    ]
    for attack in attacks:
        assert "nested deeper" in refused_as_bad_request(attack)
    assert_linear(*attacks)


def test_attack_wide_nesting_at_the_limit_is_linear() -> None:
    # As deep as allowed, and as wide as the line: every value is walked once.
    unit = "[" * (MAX_DEPTH - 2) + "]" * (MAX_DEPTH - 2) + ","
    attack = fill('{"op":"ping","x":[', unit, "0]}")
    item = '{"shard":1,"checkpoint":"MTUy","x":' + "[" * (MAX_DEPTH - 3) + "]" * (MAX_DEPTH - 3)
    in_items = fill('{"op":"commit","group":"g","checkpoints":[', item + "},", item + "}]}")
    assert parse_request(attack) == PingRequest()
    assert isinstance(parse_request(in_items), CommitRequest)
    assert_linear(attack, in_items)


def test_attack_long_escapes_are_linear() -> None:
    units = ["\\u00e9", "\\ud83d\\ude00", "\\ud800", '\\"', "\\\\", "\\n\\t\\/"]
    attacks = [fill('{"op":"ping","x":"', unit, '"}') for unit in units]
    for attack in attacks:
        assert parse_request(attack) == PingRequest()
    assert_linear(*attacks)


def test_attack_huge_numbers_are_linear() -> None:
    # Past 4300 digits Python refuses to convert an int; below it conversion is quadratic in
    # the digits of one number, so many numbers just under the limit are the costly shape.
    huge_int = fill('{"op":"ping","x":', "9", "}")
    assert "digits" in refused_as_bad_request(huge_int)
    accepted = [
        fill('{"op":"ping","x":[', "9" * 4299 + ",", "0]}"),
        fill('{"op":"ping","x":0.', "9", "}"),
        fill('{"op":"ping","x":1', "0", "e-999999}"),
        fill('{"op":"ping","x":[', "1e400,", "0]}"),
    ]
    for attack in accepted:
        assert parse_request(attack) == PingRequest()
    assert_linear(huge_int, *accepted)


def test_attack_many_keys_is_linear() -> None:
    keys = ",".join(f'"k{i}":[{{}}]' for i in range(LINE_BYTES // 12))
    many_keys = f'{{"op":"ping",{keys}}}'.encode()[:LINE_BYTES]
    many_keys = many_keys[: many_keys.rindex(b",")] + b"}"
    same_key = fill('{"op":"ping"', ',"k":[]', "}")
    assert parse_request(many_keys) == PingRequest()
    assert parse_request(same_key) == PingRequest()
    assert_linear(many_keys, same_key)


def test_attack_bad_bytes_at_the_end_are_linear() -> None:
    attacks = [
        fill('{"op":"ping","x":"', "a", '"}')[:-2] + b'\xff"}',
        fill('{"op":"ping","x":[', "1,", "NaN]}"),
        fill('{"op":"ping","x":[', "1,", "Infinity]}"),
        fill('{"op":"ping","x":"', "a", '"} x'),
    ]
    for attack in attacks:
        refused_as_bad_request(attack)
    assert_linear(*attacks)


def test_benign_line_is_a_valid_batch_of_the_largest_size() -> None:
    line = benign_line()
    request = parse_request(line)
    assert isinstance(request, CommitRequest)
    assert len(request.items) == len(json.loads(line)["checkpoints"]) > 10_000
    assert LINE_BYTES * 0.9 < len(line) <= LINE_BYTES
