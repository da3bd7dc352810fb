"""The emulator's bookkeeping: groups, heartbeats and balancing, checkpoints, persistence."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmgr.emulator.state import ApiError, EmulatorState, OwnershipErrors, is_valid_checkpoint
from cpmgr.errors import ConfigError

P, L, G = "proj", "store", "group-a"
CP1, CP2 = "MTAw", "MjAw"  # "100", "200"


class FakeClock:
    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_state(shards: int = 4, timeout: int = 60) -> tuple[EmulatorState, FakeClock]:
    clock = FakeClock(1000.0)
    state = EmulatorState(wall_clock=lambda: 1_700_000_000.5, monotonic=clock)
    state.add_logstore(P, L, shards)
    state.create_group(P, L, G, timeout=timeout)
    return state, clock


def error_of(call: Callable[..., object], *args: object, **kwargs: object) -> tuple[int, str]:
    with pytest.raises(ApiError) as caught:
        call(*args, **kwargs)
    return caught.value.status, caught.value.code


def commit(
    state: EmulatorState, shard: int, cp: str, consumer: str = "", force: bool = True
) -> None:
    state.update_checkpoint(
        P, L, G, shard=shard, checkpoint=cp, consumer=consumer, force_success=force
    )


# --- groups ------------------------------------------------------------------------------


def test_unknown_project_logstore_and_group_are_distinct_404s() -> None:
    state, _ = make_state()
    assert error_of(state.list_groups, "other", L) == (404, "ProjectNotExist")
    assert error_of(state.list_groups, P, "other") == (404, "LogStoreNotExist")
    assert error_of(state.get_checkpoints, P, L, "nope", None) == (404, "ConsumerGroupNotExist")


def test_group_lifecycle_create_list_update_delete() -> None:
    state, _ = make_state()
    state.create_group(P, L, "group-b", timeout=30, order=True)
    assert error_of(state.create_group, P, L, "group-b", timeout=30) == (
        400,
        "ConsumerGroupAlreadyExist",
    )
    state.update_group(P, L, "group-b", timeout=45, order=None)
    assert state.list_groups(P, L) == [
        {"name": "group-a", "timeout": 60, "order": False},
        {"name": "group-b", "timeout": 45, "order": True},
    ]
    state.delete_group(P, L, "group-b")
    assert [group["name"] for group in state.list_groups(P, L)] == ["group-a"]
    assert error_of(state.delete_group, P, L, "group-b") == (404, "ConsumerGroupNotExist")


@pytest.mark.parametrize("name", ["A-upper", "x", "-lead", "trail_", "has space", "a" * 129])
def test_invalid_group_names_are_refused(name: str) -> None:
    state, _ = make_state()
    assert error_of(state.create_group, P, L, name, timeout=10) == (400, "ParameterInvalid")


def test_deleting_a_group_drops_its_checkpoints_but_keeps_the_history() -> None:
    state, _ = make_state()
    commit(state, 0, CP1)
    state.delete_group(P, L, G)
    state.create_group(P, L, G, timeout=60)
    assert state.get_checkpoints(P, L, G, 0)[0]["checkpoint"] == ""
    assert state.snapshot()["history"] == {f"{P}/{L}/{G}/0": [CP1]}


# --- heartbeats --------------------------------------------------------------------------


def test_first_consumer_joins_with_empty_body_and_gets_every_shard() -> None:
    state, _ = make_state()
    assert state.heartbeat(P, L, G, "c1", []) == [0, 1, 2, 3]


def test_unknown_consumer_with_a_body_is_refused() -> None:
    state, _ = make_state()
    assert error_of(state.heartbeat, P, L, G, "c1", [0]) == (400, "NotExistConsumerWithBody")


def test_second_consumer_gets_shards_only_after_the_first_releases_them() -> None:
    state, _ = make_state()
    state.heartbeat(P, L, G, "c1", [])
    assert state.heartbeat(P, L, G, "c2", []) == []  # shards 2, 3 are in transfer
    # c1 is told to keep 0 and 1; while it still reports 2 and 3 they stay with it
    assert state.heartbeat(P, L, G, "c1", [0, 1, 2, 3]) == [0, 1]
    assert state.heartbeat(P, L, G, "c2", []) == []
    assert state.heartbeat(P, L, G, "c1", [0, 1]) == [0, 1]
    assert state.heartbeat(P, L, G, "c2", []) == [2, 3]
    assert state.assignments(P, L, G) == {"c1": [0, 1], "c2": [2, 3]}


def test_a_shard_in_transfer_still_belongs_to_its_holder_for_strict_commits() -> None:
    state, _ = make_state()
    state.heartbeat(P, L, G, "c1", [])
    state.heartbeat(P, L, G, "c2", [])
    commit(state, 3, CP1, consumer="c1", force=False)  # the old holder flushes before release
    assert error_of(commit, state, 3, CP2, "c2", False) == (400, "ConsumerNotMatch")


def test_silent_consumer_expires_and_its_shards_are_reassigned() -> None:
    state, clock = make_state(timeout=60)
    state.heartbeat(P, L, G, "c1", [])
    state.heartbeat(P, L, G, "c2", [])
    state.heartbeat(P, L, G, "c1", [0, 1])
    assert state.heartbeat(P, L, G, "c2", []) == [2, 3]
    clock.advance(40)
    state.heartbeat(P, L, G, "c1", [0, 1])
    clock.advance(25)  # c2 silent for 65 s > 60 s, c1 for 25 s
    assert state.heartbeat(P, L, G, "c1", [0, 1]) == [0, 1, 2, 3]
    assert state.assignments(P, L, G) == {"c1": [0, 1, 2, 3]}
    # an expired consumer must join again with an empty body
    assert error_of(state.heartbeat, P, L, G, "c2", [2, 3]) == (400, "NotExistConsumerWithBody")


def test_consumer_heartbeating_exactly_at_the_timeout_is_still_alive() -> None:
    state, clock = make_state(timeout=60)
    state.heartbeat(P, L, G, "c1", [])
    clock.advance(60)
    assert state.heartbeat(P, L, G, "c1", [0, 1, 2, 3]) == [0, 1, 2, 3]


def settle(state: EmulatorState, consumers: list[str], rounds: int = 4) -> dict[str, list[int]]:
    """Cooperative consumers: each reports what it was last told to hold."""
    told: dict[str, list[int]] = {}
    for name in consumers:
        told[name] = state.heartbeat(P, L, G, name, [])
    for _ in range(rounds):
        for name in consumers:
            told[name] = state.heartbeat(P, L, G, name, told[name])
    return told


@settings(max_examples=60, deadline=None)
@given(shards=st.integers(1, 24), consumers=st.integers(1, 7))
def test_cooperative_consumers_converge_to_a_balanced_assignment(
    shards: int, consumers: int
) -> None:
    state, _ = make_state(shards=shards)
    names = [f"c{index}" for index in range(consumers)]
    told = settle(state, names)
    counts = [len(held) for held in told.values()]
    assert max(counts) - min(counts) <= 1
    assigned = sorted(shard for held in told.values() for shard in held)
    assert assigned == list(range(shards))  # every shard held by exactly one consumer


def test_balanced_group_is_stable() -> None:
    state, _ = make_state(shards=5)
    told = settle(state, ["a", "b", "c"])
    assert settle(state, ["a", "b", "c"]) == told


# --- checkpoints -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "valid"),
    [
        ("MTUyNDE1NTM3OTM3MzkwODQ5Ng==", True),
        ("MTAw", True),
        ("", False),
        ("MTAw=", False),  # bad padding
        ("MTA", False),  # missing padding
        ("MT Aw", False),
        ("not base64!", False),
        ("MTAx\n", False),
        ("_-8=", False),  # urlsafe alphabet
        ("MTB=", False),  # non-canonical trailing bits
    ],
)
def test_checkpoint_must_be_canonical_padded_base64(value: str, valid: bool) -> None:
    assert is_valid_checkpoint(value) is valid


def test_never_committed_shard_reads_as_empty_checkpoint() -> None:
    state, _ = make_state()
    assert state.get_checkpoints(P, L, G, 2) == [
        {"shard": 2, "checkpoint": "", "updateTime": 0, "consumer": ""}
    ]
    assert state.get_checkpoints(P, L, G, 9) == []
    assert state.get_checkpoints(P, L, G, -1) == []
    assert [entry["shard"] for entry in state.get_checkpoints(P, L, G, None)] == [0, 1, 2, 3]


def test_commit_is_stored_with_microsecond_time_and_consumer() -> None:
    state, _ = make_state()
    commit(state, 1, CP1, consumer="c9")
    assert state.get_checkpoints(P, L, G, 1) == [
        {"shard": 1, "checkpoint": CP1, "updateTime": 1_700_000_000_500_000, "consumer": "c9"}
    ]


def test_every_successful_commit_is_appended_to_the_history() -> None:
    state, _ = make_state()
    commit(state, 0, CP1)
    commit(state, 0, CP2)
    commit(state, 0, CP1)
    with pytest.raises(ApiError):
        commit(state, 0, "bad!")
    snapshot = state.snapshot()
    assert snapshot["checkpoints"] == {f"{P}/{L}/{G}/0": CP1}
    assert snapshot["history"] == {f"{P}/{L}/{G}/0": [CP1, CP2, CP1]}


def test_commit_validation_codes() -> None:
    state, _ = make_state()
    assert error_of(commit, state, 0, "bad!") == (400, "InvalidShardCheckPoint")
    assert error_of(commit, state, 4, CP1) == (404, "ShardNotExist")
    assert error_of(commit, state, 0, CP1, "", False) == (400, "ParameterInvalid")
    assert state.snapshot()["history"] == {}


def test_strict_commit_needs_the_consumer_to_hold_the_shard() -> None:
    state, _ = make_state()
    assert error_of(commit, state, 0, CP1, "ghost", False) == (404, "ConsumerNotExist")
    state.heartbeat(P, L, G, "c1", [])
    state.heartbeat(P, L, G, "c1", [0, 1, 2, 3])
    state.heartbeat(P, L, G, "c2", [])
    state.heartbeat(P, L, G, "c1", [0, 1])
    state.heartbeat(P, L, G, "c2", [])
    commit(state, 0, CP1, consumer="c1", force=False)
    assert error_of(commit, state, 0, CP2, "c2", False) == (400, "ConsumerNotMatch")
    commit(state, 0, CP2, consumer="c2", force=True)  # forceSuccess skips the ownership check
    assert state.get_checkpoints(P, L, G, 0)[0]["consumer"] == "c2"


def test_ownership_error_codes_are_configurable() -> None:
    quirks = OwnershipErrors(
        consumer_not_exist=(400, "ConsumerNotExsit"), consumer_not_match=(403, "ConsumerNotMatch")
    )
    state = EmulatorState(ownership_errors=quirks)
    state.add_logstore(P, L, 1)
    state.create_group(P, L, G, timeout=60)
    assert error_of(commit, state, 0, CP1, "ghost", False) == (400, "ConsumerNotExsit")
    state.heartbeat(P, L, G, "owner", [])
    state.heartbeat(P, L, G, "other", [])
    assert error_of(commit, state, 0, CP1, "other", False) == (403, "ConsumerNotMatch")


def test_list_shards_covers_the_hash_space() -> None:
    state, _ = make_state(shards=3)
    shards = state.list_shards(P, L)
    assert [shard["shardID"] for shard in shards] == [0, 1, 2]
    assert shards[0]["inclusiveBeginKey"] == "0" * 32
    assert shards[-1]["exclusiveEndKey"] == "f" * 32
    for before, after in itertools.pairwise(shards):
        assert before["exclusiveEndKey"] == after["inclusiveBeginKey"]
    assert {shard["status"] for shard in shards} == {"readwrite"}


def test_redeclaring_a_logstore_with_another_shard_count_is_refused() -> None:
    state, _ = make_state(shards=4)
    state.add_logstore(P, L, 4)
    assert error_of(state.add_logstore, P, L, 8) == (400, "LogStoreAlreadyExist")


# --- persistence -------------------------------------------------------------------------


def test_state_file_round_trip(tmp_path: Path) -> None:
    state, _ = make_state()
    state.create_group(P, L, "ordered", timeout=20, order=True)
    commit(state, 1, CP1, consumer="c1")
    commit(state, 1, CP2)
    path = tmp_path / "state.json"
    state.save_file(path)

    restored = EmulatorState()
    restored.load_file(path)
    assert restored.list_groups(P, L) == state.list_groups(P, L)
    assert restored.get_checkpoints(P, L, G, None) == state.get_checkpoints(P, L, G, None)
    assert restored.snapshot()["history"] == {f"{P}/{L}/{G}/1": [CP1, CP2]}
    assert not path.with_name("state.json.tmp").exists()


def test_missing_state_file_is_a_first_start(tmp_path: Path) -> None:
    state = EmulatorState()
    state.load_file(tmp_path / "absent.json")
    assert state.logstores == {}


@pytest.mark.parametrize("content", ["{not json", '{"version": 99}', '{"version": 1}', "[]"])
def test_unreadable_state_file_is_a_config_error(tmp_path: Path, content: str) -> None:
    path = tmp_path / "state.json"
    path.write_text(content)
    with pytest.raises(ConfigError, match="state file"):
        EmulatorState().load_file(path)
