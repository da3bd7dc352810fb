"""What consumer-group members rely on in the emulator: a shard its holder still reports never
goes to another consumer, an empty heartbeat hands the holder's shards on at once, and the
group's timeout and order are created and updated through the HTTP API."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from typing import Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpmgr.emulator import running_emulator
from cpmgr.emulator.app import EmulatorHandle
from cpmgr.emulator.state import ApiError, EmulatorState
from cpmgr.errors import SLSError
from cpmgr.sls.client import ConsumerGroup, RemoteCheckpoint, SLSClient
from cpmgr.sls.signer import Credentials

P, L, G = "member-project", "member-logstore", "member-group"
KEY_ID, SECRET = "member-key", "member-secret"
CP1 = "MTUyNDE1NTM3OTM3MzkwODQ5Ng=="


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make_state(shards: int, timeout: int = 10) -> tuple[EmulatorState, FakeClock]:
    clock = FakeClock()
    state = EmulatorState(wall_clock=lambda: 1_700_000_000.0, monotonic=clock)
    state.add_logstore(P, L, shards)
    state.create_group(P, L, G, timeout=timeout)
    return state, clock


# --- ownership of shards being released ------------------------------------------------------

# What a model consumer does on its turn:
# - "beat": reports what it holds, then gives up at once what the answer left out;
# - "slow": keeps reporting what the answer left out (a release still committing);
# - "drop": stops reporting some of its shards, whether asked to or not;
# - "leave": an empty heartbeat, as a member whose connection closed;
# - "sleep": time passes; a consumer silent beyond the timeout considers its shards lost.
Action = Literal["beat", "slow", "drop", "leave", "sleep"]
steps = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.sampled_from(["beat", "slow", "slow", "drop", "leave", "sleep"]),
        st.integers(0, 255),
    ),
    max_size=60,
)


class ModelConsumers:
    """Consumers that believe they hold what they were told and have not given up yet."""

    def __init__(self, state: EmulatorState, clock: FakeClock, timeout: int) -> None:
        self.state, self.clock, self.timeout = state, clock, timeout
        self.held: dict[str, set[int]] = {}
        self.last_beat: dict[str, float] = {}
        self.transfers_seen = 0

    def turn(self, name: str, action: Action, mask: int) -> None:
        if action == "sleep":
            self.clock.advance(3 + mask % 10)
            for other, beat in self.last_beat.items():
                if self.clock.now - beat > self.timeout:
                    self.held.pop(other, None)  # as cpmgr's `lost`: stop at once
            return
        current = self.held.get(name, set())
        body = self._body(current, action, mask)
        try:
            answer = set(self.state.heartbeat(P, L, G, name, sorted(body)))
        except ApiError as exc:  # it expired and reported shards: it must rejoin with []
            assert exc.code == "NotExistConsumerWithBody"
            self.held.pop(name, None)
            return
        self.last_beat[name] = self.clock.now
        self.transfers_seen += len(body - answer)
        self.held[name] = answer if action == "beat" else body | answer

    @staticmethod
    def _body(current: set[int], action: Action, mask: int) -> set[int]:
        if action == "leave":
            return set()
        if action == "drop":
            return {shard for shard in current if not mask >> shard & 1}
        return set(current)

    def assert_no_shard_has_two_holders(self) -> None:
        for (a, held_a), (b, held_b) in itertools.combinations(self.held.items(), 2):
            assert held_a.isdisjoint(held_b), f"{a} and {b} both hold {held_a & held_b}"


@settings(max_examples=300, deadline=None)
@given(shards=st.integers(1, 8), steps=steps)
def test_a_shard_its_holder_still_reports_never_goes_to_another_consumer(
    shards: int, steps: list[tuple[int, Action, int]]
) -> None:
    state, clock = make_state(shards, timeout=10)
    consumers = ModelConsumers(state, clock, timeout=10)
    for index, action, mask in steps:
        consumers.turn(f"c{index}", action, mask)
        consumers.assert_no_shard_has_two_holders()


def test_the_model_sees_transfers_so_the_property_is_not_vacuous() -> None:
    state, clock = make_state(4)
    consumers = ModelConsumers(state, clock, timeout=10)
    for name, action in [("c0", "beat"), ("c1", "beat"), ("c0", "slow"), ("c1", "beat")]:
        consumers.turn(name, action, 0)  # type: ignore[arg-type]
    assert consumers.transfers_seen == 2
    assert consumers.held == {"c0": {0, 1, 2, 3}, "c1": set()}  # c0 still releases 2 and 3
    consumers.turn("c0", "beat", 0)  # reports 2 and 3 a last time, then gives them up
    consumers.turn("c1", "beat", 0)
    assert consumers.held == {"c0": {0, 1}, "c1": set()}
    consumers.turn("c0", "beat", 0)
    consumers.turn("c1", "beat", 0)
    assert consumers.held == {"c0": {0, 1}, "c1": {2, 3}}


def test_an_empty_heartbeat_hands_the_shards_to_the_others_at_their_next_heartbeat() -> None:
    state, _ = make_state(4, timeout=60)
    state.heartbeat(P, L, G, "a", [])
    state.heartbeat(P, L, G, "b", [])
    state.heartbeat(P, L, G, "a", [0, 1])
    assert state.heartbeat(P, L, G, "b", []) == [2, 3]
    assert state.heartbeat(P, L, G, "b", [2, 3]) == [2, 3]
    assert state.heartbeat(P, L, G, "a", []) == []  # a leaves, long before the 60 s timeout
    assert state.assignments(P, L, G) == {"b": [2, 3]}
    assert state.heartbeat(P, L, G, "b", [2, 3]) == [0, 1, 2, 3]
    # a may come back as a new consumer: it joins with [] and the shards are balanced again
    assert state.heartbeat(P, L, G, "a", []) == []
    assert state.heartbeat(P, L, G, "b", [0, 1, 2, 3]) == [0, 1]
    assert state.heartbeat(P, L, G, "b", [0, 1]) == [0, 1]
    assert state.heartbeat(P, L, G, "a", []) == [2, 3]


def test_an_empty_heartbeat_that_finishes_a_release_is_not_a_leave() -> None:
    state, _ = make_state(1, timeout=60)
    assert state.heartbeat(P, L, G, "a", []) == [0]
    assert state.heartbeat(P, L, G, "b", []) == []
    assert state.heartbeat(P, L, G, "a", [0]) == [0]  # one shard, two consumers: a keeps it
    assert state.assignments(P, L, G) == {"a": [0], "b": []}
    assert state.heartbeat(P, L, G, "b", []) == []  # b holds nothing: [] is its normal body
    assert state.assignments(P, L, G) == {"a": [0], "b": []}


def test_an_empty_heartbeat_before_the_first_answer_arrives_is_not_a_leave() -> None:
    state, _ = make_state(4, timeout=60)
    state.heartbeat(P, L, G, "a", [])
    state.heartbeat(P, L, G, "b", [])
    state.heartbeat(P, L, G, "a", [0, 1])  # 2 and 3 are handed to b during a's heartbeat
    assert state.heartbeat(P, L, G, "b", []) == [2, 3]  # b was never told: it joins, not leaves


# --- through the HTTP API with the daemon's client --------------------------------------------


@pytest.fixture
def monotonic() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def emulator(monotonic: FakeClock) -> AsyncIterator[EmulatorHandle]:
    async with running_emulator(
        logstores=[f"{P}/{L}:4"],
        access_key_id=KEY_ID,
        access_key_secret=SECRET,
        monotonic=monotonic,
    ) as handle:
        yield handle


@pytest.fixture
async def client(emulator: EmulatorHandle) -> AsyncIterator[SLSClient]:
    async with SLSClient(
        endpoint=emulator.url, credentials=lambda: Credentials(KEY_ID, SECRET)
    ) as sls:
        yield sls


async def test_create_and_update_timeout_and_order(client: SLSClient) -> None:
    await client.create_consumer_group(P, L, G, heartbeat_timeout=2, order=True)
    assert await client.list_consumer_groups(P, L) == [ConsumerGroup(G, 2, True)]
    with pytest.raises(SLSError) as exists:
        await client.create_consumer_group(P, L, G, heartbeat_timeout=9)
    assert (exists.value.status, exists.value.code) == (400, "ConsumerGroupAlreadyExist")

    await client.update_consumer_group(P, L, G, heartbeat_timeout=30)
    assert await client.list_consumer_groups(P, L) == [ConsumerGroup(G, 30, True)]
    await client.update_consumer_group(P, L, G, order=False)
    assert await client.list_consumer_groups(P, L) == [ConsumerGroup(G, 30, False)]
    with pytest.raises(SLSError) as missing:
        await client.update_consumer_group(P, L, "no-such-group", order=True)
    assert (missing.value.status, missing.value.code) == (404, "ConsumerGroupNotExist")


async def test_the_updated_timeout_decides_when_a_silent_consumer_expires(
    client: SLSClient, monotonic: FakeClock
) -> None:
    await client.create_consumer_group(P, L, G, heartbeat_timeout=2)
    assert await client.heartbeat(P, L, G, "slow", []) == [0, 1, 2, 3]
    await client.update_consumer_group(P, L, G, heartbeat_timeout=10)
    monotonic.advance(5)  # beyond the old timeout, within the new one
    assert await client.heartbeat(P, L, G, "slow", [0, 1, 2, 3]) == [0, 1, 2, 3]
    monotonic.advance(11)
    with pytest.raises(SLSError) as expired:
        await client.heartbeat(P, L, G, "slow", [0, 1, 2, 3])
    assert (expired.value.status, expired.value.code) == (400, "NotExistConsumerWithBody")
    assert expired.value.member_expired and not expired.value.retryable
    assert await client.heartbeat(P, L, G, "slow", []) == [0, 1, 2, 3]  # rejoins with []


async def test_strict_commit_by_an_expired_member_says_it_expired(
    client: SLSClient, monotonic: FakeClock
) -> None:
    await client.create_consumer_group(P, L, G, heartbeat_timeout=2)
    await client.heartbeat(P, L, G, "m", [])
    monotonic.advance(3)
    with pytest.raises(SLSError) as caught:
        await client.update_checkpoint(P, L, G, 0, CP1, consumer="m", force_success=False)
    assert (caught.value.code, caught.value.member_expired) == ("ConsumerNotExist", True)


async def test_one_shard_checkpoint_read_for_a_new_owner(client: SLSClient) -> None:
    await client.create_consumer_group(P, L, G, heartbeat_timeout=10)
    never = await client.get_shard_checkpoint(P, L, G, 2)
    assert never == RemoteCheckpoint(shard=2, checkpoint="", update_time=0, consumer="")
    await client.heartbeat(P, L, G, "m", [])
    await client.update_checkpoint(P, L, G, 2, CP1, consumer="m", force_success=False)
    committed = await client.get_shard_checkpoint(P, L, G, 2)
    assert committed is not None
    assert (committed.checkpoint, committed.consumer) == (CP1, "m")
    assert committed.update_time > 1_000_000_000_000_000  # microseconds
    assert await client.get_checkpoint(P, L, G, 2) == [committed]  # exactly one entry
    assert await client.get_shard_checkpoint(P, L, G, 4) is None  # no such shard
