"""The `membership:` block of a group (docs/configuration.md): defaults, every rule, good and
bad."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from cpmgr.config import MembershipConfig, parse_config
from cpmgr.daemon import _membership_changes
from cpmgr.errors import ConfigError
from cpmgr.protocol import (
    AssignmentRequest,
    JoinRequest,
    LeaveRequest,
    MembersRequest,
    ReleaseRequest,
    encode_request,
    parse_request,
)


def _config(membership: object, **group: object) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": "orders", "project": "p", "logstore": "l"}
    entry.update(consumer_group="cg", membership=membership, **group)
    return {
        "sls": {"endpoint": "127.0.0.1:1", "access_key_id": "id", "access_key_secret": "s"},
        "groups": [entry],
    }


def _same_sls_group(name: str) -> dict[str, object]:
    return {"name": name, "project": "p", "logstore": "l", "consumer_group": "cg"}


def _problems(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(data, {})
    return caught.value.problems


def test_an_empty_block_takes_every_default_and_commits_as_each_member() -> None:
    group = parse_config(_config({}), {}).groups[0]
    assert group.membership == MembershipConfig()
    assert group.membership.start_from == "begin"
    assert group.force_success is False and group.consumer is None


def test_every_key_is_read() -> None:
    block = {
        "heartbeat_interval": "200ms",
        "timeout": "2s",
        "create": True,
        "order": True,
        "release_timeout": "1s",
        "start": "2026-01-02T03:04:05Z",
    }
    cfg = parse_config({**_config(block), "commit": {"request_timeout": "500ms"}}, {})
    m = cfg.groups[0].membership
    assert m == MembershipConfig(0.2, 2, True, True, 1.0, "2026-01-02T03:04:05Z")
    assert m.start_from == int(datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    ("block", "where"),
    [
        ({"timeout": "1.5s"}, "membership.timeout: must be a whole number of seconds"),
        ({"timeout": 0}, "membership.timeout"),
        ({"start": "yesterday"}, "membership.start: must be begin, end or an RFC 3339 time"),
        ({"start": "2026-01-02T03:04:05"}, "membership.start"),  # no offset: ambiguous
        ({"heartbeat_interval": "soon"}, "membership.heartbeat_interval"),
        ({"create": "yes"}, "membership.create: must be true or false"),
        ({"colour": "red"}, "membership.colour: unknown key"),
    ],
)
def test_bad_values_are_named_by_their_path(block: dict[str, object], where: str) -> None:
    assert any(where in p for p in _problems(_config(block))), _problems(_config(block))


def test_heartbeats_must_fit_twice_into_the_timeout() -> None:
    data = {**_config({"heartbeat_interval": "25s", "timeout": 60}), "commit": {}}
    (problem,) = _problems(data)
    assert "heartbeat_interval (25s) + commit.request_timeout (5s)" in problem
    assert "less than timeout / 2 (30s)" in problem


@pytest.mark.parametrize("key", ["consumer", "force_success"])
def test_a_fixed_consumer_or_force_success_is_a_problem(key: str) -> None:
    value: object = "c-1" if key == "consumer" else True
    (problem,) = _problems(_config({}, **{key: value}))
    assert problem.startswith(f"groups[0].{key}: not allowed with membership")


def test_one_sls_consumer_group_is_configured_once_with_membership() -> None:
    data = _config({})
    data["groups"].append(
        {"name": "again", "project": "p", "logstore": "l", "consumer_group": "cg"}
    )
    (problem,) = _problems(data)
    assert "groups[1].consumer_group: groups[0] names the same SLS consumer group" in problem


def test_plain_groups_may_still_share_an_sls_consumer_group() -> None:
    data = _config({})
    del data["groups"][0]["membership"]
    data["groups"].append(
        {"name": "again", "project": "p", "logstore": "l", "consumer_group": "cg"}
    )
    assert len(parse_config(data, {}).groups) == 2


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (b'{"op":"join","group":"g","consumer":"pod-a-1"}', JoinRequest("g", "pod-a-1")),
        (b'{"op":"release","group":"g","shard":3}', ReleaseRequest("g", 3)),
        (b'{"op":"leave","group":"g"}', LeaveRequest("g")),
        (b'{"op":"assignment","group":"g"}', AssignmentRequest("g")),
        (b'{"op":"members"}', MembersRequest()),
        (b'{"op":"members","group":"g"}', MembersRequest("g")),
    ],
)
def test_membership_ops_parse_and_encode_back(line: bytes, expected: object) -> None:
    assert parse_request(line) == expected
    assert parse_request(encode_request(parse_request(line))) == expected


@pytest.mark.parametrize(
    ("line", "message"),
    [
        (b'{"op":"join","group":"g"}', "consumer: required"),
        (b'{"op":"join","group":"g","consumer":"a b"}', "consumer: must be 1-128 characters"),
        (b'{"op":"join","group":"g","consumer":""}', "consumer: required, must be 1-128"),
        (b'{"op":"release","group":"g"}', "shard: required"),
        (b'{"op":"release","group":"g","shard":-1}', "shard: must be between"),
        (b'{"op":"leave"}', "group: required"),
    ],
)
def test_bad_membership_requests_are_refused_with_bad_request(line: bytes, message: str) -> None:
    with pytest.raises(Exception) as caught:
        parse_request(line)
    assert getattr(caught.value, "code", None) == "BadRequest"
    assert message in str(caught.value)


def test_a_reload_may_not_add_or_remove_a_membership_block() -> None:
    plain = _config({})
    del plain["groups"][0]["membership"]
    member = parse_config(_config({}), {})
    without = parse_config(plain, {})
    assert _membership_changes(without, member) == [
        "group orders: adding or removing membership needs a restart"
    ]
    assert _membership_changes(member, without) == _membership_changes(without, member)
    faster = parse_config(_config({"heartbeat_interval": "1s"}), {})
    assert _membership_changes(member, faster) == []
