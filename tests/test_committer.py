"""The committer against a real in-process emulator, through the real SLS client."""

from __future__ import annotations

import asyncio
import base64
import random
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from cpmgr import committer as committer_module
from cpmgr.backoff import backoff_delay
from cpmgr.committer import (
    CommitOutcome,
    Committer,
    ConcurrencyLimiter,
    NullObserver,
)
from cpmgr.config import Config, parse_config
from cpmgr.emulator import EmulatorHandle, running_emulator
from cpmgr.limiter import TurnBudget
from cpmgr.sls.client import RemoteCheckpoint, SLSClient
from cpmgr.sls.signer import Credentials
from cpmgr.store import CheckpointStore

PROJECT = "test-project"
KEY_ID, KEY_SECRET = "test-id", "test-secret"


def cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


def make_config(*, groups: dict[str, str], **commit: Any) -> Config:
    """`groups` maps alias -> "logstore/consumer_group" in PROJECT."""
    return parse_config(
        {
            "sls": {"endpoint": "127.0.0.1:1", "access_key_id": KEY_ID, "access_key_secret": "x"},
            "commit": {
                "interval": "1h",
                "retry": {"max_attempts": 5, "initial_backoff": "1ms", "max_backoff": "20ms"},
                **commit,
            },
            "groups": [
                {
                    "name": alias,
                    "project": PROJECT,
                    "logstore": where.split("/")[0],
                    "consumer_group": where.split("/")[1],
                }
                for alias, where in groups.items()
            ],
        },
        {},
    )


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class RecordingObserver(NullObserver):
    cycles: int = 0
    cycle_done: asyncio.Event = field(default_factory=asyncio.Event)
    attempts: Counter[str] = field(default_factory=Counter)

    def attempt_finished(self, group: str, code: str, seconds: float) -> None:
        self.attempts[code] += 1

    def cycle_finished(self, seconds: float, shards: int) -> None:
        self.cycles += 1
        self.cycle_done.set()


@dataclass
class Env:
    emulator: EmulatorHandle
    store: CheckpointStore
    committer: Committer
    observer: RecordingObserver
    client: SLSClient
    creds: list[Credentials]

    def remote(self, logstore_group: str, shard: int) -> str | None:
        key = f"{PROJECT}/{logstore_group}/{shard}"
        value: str | None = self.emulator.state.snapshot()["checkpoints"].get(key)
        return value

    def history(self, logstore_group: str, shard: int) -> list[str]:
        return list(self.emulator.state.history.get(f"{PROJECT}/{logstore_group}/{shard}", []))

    def update_calls(self) -> dict[str, int]:
        requests: dict[str, dict[str, int]] = self.emulator.state.snapshot()["requests"]
        return requests.get("UpdateCheckPoint", {})


@asynccontextmanager
async def committer_env(
    config: Config,
    *,
    logstores: tuple[str, ...] = (f"{PROJECT}/ls:16",),
    clock: Callable[[], float] | None = None,
    seed: int = 7,
    **emulator_options: Any,
) -> AsyncIterator[Env]:
    groups = tuple(f"{PROJECT}/{g.logstore}/{g.consumer_group}" for g in config.groups)
    async with running_emulator(
        logstores=logstores,
        consumer_groups=groups,
        access_key_id=KEY_ID,
        access_key_secret=KEY_SECRET,
        seed=seed,
        **emulator_options,
    ) as emulator:
        creds = [Credentials(KEY_ID, KEY_SECRET)]
        client = SLSClient(
            endpoint=emulator.url,
            credentials=lambda: creds[0],
            request_timeout=config.commit.request_timeout,
            connection_limit=config.commit.max_in_flight,
        )
        store = CheckpointStore([g.name for g in config.groups])
        observer = RecordingObserver()
        extra: dict[str, Any] = {"clock": clock} if clock is not None else {}
        committer = Committer(
            config=config,
            store=store,
            client=client,
            observer=observer,
            rng=random.Random(seed),
            **extra,
        )
        async with client:
            try:
                yield Env(emulator, store, committer, observer, client, creds)
            finally:
                await committer.close()


# ---------------------------------------------------------------------------- pure parts


def test_backoff_is_full_jitter_exponential_and_capped() -> None:
    rng = random.Random(1)
    for attempt, ceiling in [(1, 0.2), (2, 0.4), (3, 0.8), (10, 10.0)]:
        delays = [
            backoff_delay(attempt, initial=0.2, maximum=10.0, rng=rng.random) for _ in range(500)
        ]
        assert all(0.0 <= d <= ceiling for d in delays)
        assert max(delays) > ceiling * 0.9  # the whole range is used (full jitter)


def test_limiter_halves_on_throttling_and_recovers() -> None:
    clock = FakeClock()
    limiter = ConcurrencyLimiter(32, cooldown=1.0, clock=clock)
    assert limiter.throttled() and limiter.current == 16
    assert not limiter.throttled()  # a burst of throttled answers counts once per cooldown
    clock.now += 1.5
    assert limiter.throttled() and limiter.current == 8
    for _ in range(500):
        limiter.succeeded()
    assert limiter.current == 32


async def test_limiter_bounds_concurrency() -> None:
    limiter = ConcurrencyLimiter(3)
    running = peak = 0
    gate = asyncio.Event()
    three_running = asyncio.Event()

    async def work() -> None:
        nonlocal running, peak
        await limiter.acquire()
        running += 1
        peak = max(peak, running)
        if running == 3:
            three_running.set()
        await gate.wait()
        running -= 1
        limiter.release()

    tasks = [asyncio.create_task(work()) for _ in range(10)]
    await three_running.wait()
    gate.set()
    await asyncio.gather(*tasks)
    assert peak == 3 and limiter.in_use == 0


# ---------------------------------------------------------------------------- integration


async def test_coalescing_one_call_per_shard_per_cycle() -> None:
    clock = FakeClock()
    config = make_config(groups={"orders": "ls/cg"}, interval="5s")
    async with committer_env(config, clock=clock) as env:
        for n in range(5000):
            env.store.accept("orders", n % 10, cursor(1000 + n))
        assert env.committer.run_due_cycles() == 0  # the interval has not elapsed
        clock.now += 5.0
        assert env.committer.run_due_cycles() == 10
        await env.observer.cycle_done.wait()
        assert env.update_calls() == {"OK": 10}
        for shard in range(10):
            assert env.remote("ls/cg", shard) == cursor(1000 + 4990 + shard)
        assert env.store.pending_count("orders") == 0


async def test_timer_commits_without_being_asked() -> None:
    config = make_config(groups={"orders": "ls/cg"}, interval="20ms")
    async with committer_env(config) as env:
        env.store.accept("orders", 1, cursor(5))
        await env.committer.start()
        await env.observer.cycle_done.wait()
        assert env.remote("ls/cg", 1) == cursor(5)


async def test_exact_final_checkpoints_under_faults_never_backwards() -> None:
    config = make_config(
        groups={"orders": "ls/cg"}, interval="10ms", request_timeout="300ms", max_in_flight=16
    )
    async with committer_env(
        config,
        logstores=(f"{PROJECT}/ls:100",),
        error_rate=0.3,
        reset_rate=0.05,
        throttle_rate=0.1,
        latency_ms=(0.0, 5.0),
    ) as env:
        await env.committer.start()
        latest: dict[int, int] = {}
        rng = random.Random(3)
        for round_ in range(20):
            for shard in range(100):
                latest[shard] = round_ * 1000 + rng.randrange(1000)
                env.store.accept("orders", shard, cursor(latest[shard]))
            await asyncio.sleep(0.005)  # let the timer and the traffic interleave
        for _ in range(20):
            result = await env.committer.flush(timeout=30)
            if result.ok:
                break
        assert result.ok
        calls = env.update_calls()
        assert {"InternalServerError", "ServerBusy", "WriteQuotaExceed"} <= set(calls)
        for shard, value in latest.items():
            assert env.remote("ls/cg", shard) == cursor(value)
            numbers = [int(base64.b64decode(v)) for v in env.history("ls/cg", shard)]
            assert numbers == sorted(numbers), f"shard {shard} went backwards: {numbers}"
        assert env.store.pending_count("orders") == 0


async def test_permanent_error_drops_only_that_value_and_reaches_callers() -> None:
    config = make_config(groups={"orders": "ls/cg", "other": "ls/cg2"})
    async with committer_env(config) as env:
        env.emulator.faults.update({"force": {f"{PROJECT}/ls/cg": [404, "ConsumerGroupNotExist"]}})
        seq = env.store.accept("orders", 0, cursor(10))
        env.store.accept("other", 0, cursor(10))
        outcome = await env.committer.wait_for("orders", 0, seq, timeout=10)
        assert outcome == CommitOutcome(
            ok=False, code="ConsumerGroupNotExist", message=outcome.message, dropped=True
        )
        view = env.store.shard_view("orders", 0)
        assert view is not None and view.pending is None and view.last_error is not None
        assert view.last_error.code == "ConsumerGroupNotExist"
        env.store.accept("orders", 1, cursor(20))
        result = await env.committer.flush(timeout=10)
        assert result.committed == 1  # the healthy group's shard
        [failure] = result.failed
        assert (failure.group, failure.shard, failure.code, failure.dropped) == (
            "orders",
            1,
            "ConsumerGroupNotExist",
            True,
        )
        assert env.update_calls()["ConsumerGroupNotExist"] == 2  # permanent: never retried
        env.emulator.faults.update({"force": {f"{PROJECT}/ls/cg": None}})
        seq = env.store.accept("orders", 0, cursor(11))
        assert (await env.committer.wait_for("orders", 0, seq, timeout=10)).ok
        assert env.remote("ls/cg", 0) == cursor(11)


async def test_credentials_errors_keep_the_value_pending_until_keys_work() -> None:
    config = make_config(groups={"orders": "ls/cg"})
    async with committer_env(config) as env:
        reloads: list[int] = []
        env.committer._on_credentials_error = lambda: reloads.append(1)
        env.creds[0] = Credentials(KEY_ID, "wrong-secret")
        seq = env.store.accept("orders", 0, cursor(10))
        outcome = await env.committer.wait_for("orders", 0, seq, timeout=10)
        assert (outcome.ok, outcome.code, outcome.dropped) == (False, "SignatureNotMatch", False)
        assert len(reloads) == config.commit.retry.max_attempts
        view = env.store.shard_view("orders", 0)
        assert view is not None and view.pending == cursor(10)
        env.creds[0] = Credentials(KEY_ID, KEY_SECRET)
        assert (await env.committer.flush(timeout=10)).committed == 1
        assert env.remote("ls/cg", 0) == cursor(10)


async def test_failing_group_does_not_starve_a_healthy_one() -> None:
    config = make_config(
        groups={"bad": "ls/cg", "good": "ls/cg2"},
        max_in_flight=2,
        retry={"max_attempts": 50, "initial_backoff": "5ms", "max_backoff": "20ms"},
    )
    async with committer_env(config) as env:
        env.emulator.faults.update({"force": {f"{PROJECT}/ls/cg": [500, "InternalServerError"]}})
        for shard in range(8):
            env.store.accept("bad", shard, cursor(1))
        env.committer.commit_now(group="bad")
        seq = env.store.accept("good", 0, cursor(1))
        outcome = await env.committer.wait_for("good", 0, seq, timeout=10)
        assert outcome.ok
        assert env.store.pending_count("bad") == 8


async def test_wait_is_answered_long_before_the_interval() -> None:
    config = make_config(groups={"orders": "ls/cg"}, interval="1h")
    async with committer_env(config) as env:
        await env.committer.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        seq = env.store.accept("orders", 2, cursor(99))
        assert (await env.committer.wait_for("orders", 2, seq, timeout=30)).ok
        assert loop.time() - started < 5.0
        assert env.remote("ls/cg", 2) == cursor(99)


async def test_wait_times_out_with_the_value_still_pending() -> None:
    config = make_config(
        groups={"orders": "ls/cg"},
        retry={"max_attempts": 1000, "initial_backoff": "5ms", "max_backoff": "5ms"},
    )
    async with committer_env(config) as env:
        env.emulator.faults.update({"force": {f"{PROJECT}/ls/cg": [503, "ServerBusy"]}})
        seq = env.store.accept("orders", 2, cursor(99))
        outcome = await env.committer.wait_for("orders", 2, seq, timeout=0.2)
        assert (outcome.ok, outcome.code, outcome.dropped) == (False, "Timeout", False)
        result = await env.committer.flush(timeout=0.2)
        assert result.timed_out and not result.ok


class CountingClient:
    """Wraps the real client to record how many requests each shard has outstanding."""

    def __init__(self, inner: SLSClient) -> None:
        self.inner = inner
        self.outstanding: Counter[int] = Counter()
        self.peak: dict[int, int] = defaultdict(int)
        self.sent: dict[int, list[str]] = defaultdict(list)

    async def update_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        shard, checkpoint = args[3], args[4]
        self.outstanding[shard] += 1
        self.peak[shard] = max(self.peak[shard], self.outstanding[shard])
        self.sent[shard].append(checkpoint)
        try:
            await self.inner.update_checkpoint(*args, **kwargs)
        finally:
            self.outstanding[shard] -= 1

    async def get_checkpoint(self, *args: Any, **kwargs: Any) -> list[RemoteCheckpoint]:
        return await self.inner.get_checkpoint(*args, **kwargs)


async def test_one_request_in_flight_per_shard_with_waits_flushes_and_cycles() -> None:
    config = make_config(groups={"orders": "ls/cg"}, interval="5ms")
    async with committer_env(config, latency_ms=(1.0, 10.0), error_rate=0.2) as env:
        counting = CountingClient(env.client)
        env.committer._client = counting
        await env.committer.start()
        waits = []
        for n in range(200):
            shard = n % 4
            seq = env.store.accept("orders", shard, cursor(n))
            if n % 7 == 0:
                waits.append(asyncio.create_task(env.committer.wait_for("orders", shard, seq, 30)))
            if n % 50 == 0:
                waits.append(asyncio.create_task(env.committer.flush(timeout=30)))
            await asyncio.sleep(0.001)
        await asyncio.gather(*waits)
        assert (await env.committer.flush(timeout=30)).ok
        assert set(counting.peak.values()) == {1}
        for shard in range(4):
            assert env.remote("ls/cg", shard) == cursor(196 + shard)


async def test_remote_reads_getcheckpoint() -> None:
    config = make_config(groups={"orders": "ls/cg"})
    async with committer_env(config) as env:
        seq = env.store.accept("orders", 3, cursor(42))
        assert (await env.committer.wait_for("orders", 3, seq, timeout=10)).ok
        remote = await env.committer.remote("orders", 3)
        assert remote[3].checkpoint == cursor(42)
        assert remote[3].update_time > 0


@pytest.mark.parametrize("code", ["ServerBusy", "WriteQuotaExceed"])
async def test_throttling_lowers_concurrency(code: str) -> None:
    config = make_config(groups={"orders": "ls/cg"}, max_in_flight=16)
    async with committer_env(config) as env:
        status = 503 if code == "ServerBusy" else 403
        env.emulator.faults.update({"force": {f"{PROJECT}/ls/cg": [status, code]}})
        env.store.accept("orders", 0, cursor(1))
        await env.committer.flush(timeout=10)
        assert env.committer.concurrency_limit < 16


async def test_dropped_values_are_logged_once_per_shard_and_code(
    caplog: pytest.LogCaptureFixture,
) -> None:
    config = make_config(groups={"orders": "ls/cg"})
    async with committer_env(config) as env:
        env.emulator.faults.update({"force": {f"{PROJECT}/ls/cg": [400, "ConsumerNotMatch"]}})
        for number in (1, 2):  # the second round drops again: no new lines
            for shard in range(3):
                env.store.accept("orders", shard, cursor(number))
            result = await env.committer.flush(timeout=10)
            assert [f.dropped for f in result.failed] == [True, True, True]
    drops = [r.getMessage() for r in caplog.records if "ConsumerNotMatch" in r.getMessage()]
    assert len(drops) == 3
    assert {f"shard {shard}" in " ".join(drops) for shard in range(3)} == {True}


async def test_abandon_cancels_a_groups_jobs_and_keeps_their_values_pending() -> None:
    config = make_config(groups={"orders": "ls/cg", "other": "ls/cg2"})
    async with committer_env(config, latency_ms=(2000.0, 2000.0)) as env:
        env.store.accept("orders", 0, cursor(5))
        env.store.accept("other", 0, cursor(5))
        env.committer.commit_now()
        assert env.committer.in_flight == 2
        await env.committer.abandon("orders")
        assert env.committer.in_flight == 1  # the other group's job goes on
        view = env.store.shard_view("orders", 0)
        assert view is not None and view.pending == cursor(5) and not view.in_flight


def test_backoff_does_not_overflow_with_many_attempts() -> None:
    rng = random.Random(2)
    assert 0.0 <= backoff_delay(100_000, initial=0.2, maximum=10.0, rng=rng.random) <= 10.0


# ------------------------------------------------------------------------ settled means verified


class HoldFirstRequest:
    """The emulator's latency sleep: the first request waits until released (it then lands
    late, after the client gave up); every later one passes at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.holding = asyncio.Event()
        self.released = asyncio.Event()

    async def __call__(self, seconds: float) -> None:
        self.calls += 1
        if self.calls == 1:
            self.holding.set()
            await self.released.wait()


class SuccessSignal:
    """Wraps the real client; `succeeded` is set when an UpdateCheckPoint of `checkpoint`
    returns successfully."""

    def __init__(self, inner: SLSClient, checkpoint: str) -> None:
        self.inner = inner
        self.checkpoint = checkpoint
        self.succeeded = asyncio.Event()

    async def update_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        await self.inner.update_checkpoint(*args, **kwargs)
        if args[4] == self.checkpoint:
            self.succeeded.set()

    async def get_checkpoint(self, *args: Any, **kwargs: Any) -> list[RemoteCheckpoint]:
        return await self.inner.get_checkpoint(*args, **kwargs)


async def test_a_late_landing_attempt_is_overwritten_before_the_value_counts_as_committed() -> None:
    config = make_config(
        groups={"orders": "ls/cg"},
        request_timeout="500ms",
        retry={"max_attempts": 5, "initial_backoff": "1ms", "max_backoff": "1ms"},
    )
    hold = HoldFirstRequest()
    async with committer_env(config, latency_ms=(1.0, 1.0), sleep=hold) as env:
        signal = SuccessSignal(env.client, cursor(200))
        env.committer._client = signal
        first = env.store.accept("orders", 0, cursor(100))
        waiting_first = asyncio.create_task(env.committer.wait_for("orders", 0, first, 30))
        await hold.holding.wait()  # 100 reached SLS, which has not applied it yet
        second = env.store.accept("orders", 0, cursor(200))
        await signal.succeeded.wait()  # the retry carried 200, and SLS said OK
        view = env.store.shard_view("orders", 0)
        assert view is not None
        # The timed-out 100 may still land: 200 is not settled, however SLS answered.
        assert (view.committed, view.pending) == (None, cursor(200))
        assert not waiting_first.done()
        hold.released.set()  # ... and now 100 lands, after 200
        assert (await env.committer.wait_for("orders", 0, second, 30)).ok
        assert (await waiting_first).ok
        assert env.history("ls/cg", 0) == [cursor(200), cursor(100), cursor(200)]
        assert env.remote("ls/cg", 0) == cursor(200)
        view = env.store.shard_view("orders", 0)
        assert view is not None and (view.committed, view.pending) == (cursor(200), None)


async def test_a_value_resent_after_an_unanswered_attempt_is_not_a_no_op() -> None:
    config = make_config(
        groups={"orders": "ls/cg"},
        request_timeout="300ms",
        retry={"max_attempts": 1, "initial_backoff": "1ms", "max_backoff": "1ms"},
    )
    hold = HoldFirstRequest()
    async with committer_env(config, latency_ms=(1.0, 1.0), sleep=hold) as env:
        seq = env.store.accept("orders", 0, cursor(100))
        outcome = await env.committer.wait_for("orders", 0, seq, 30)
        assert (outcome.ok, outcome.code, outcome.dropped) == (False, "Timeout", False)
        hold.released.set()
        # The same value again: SLS may or may not hold it, so it is sent (and verified).
        assert env.store.accept("orders", 0, cursor(100)) == seq
        assert (await env.committer.wait_for("orders", 0, seq, 30)).ok
        assert env.remote("ls/cg", 0) == cursor(100)
        assert env.update_calls().get("OK", 0) >= 2


async def test_limiter_survives_a_waiter_cancelled_as_its_slot_frees() -> None:
    limiter = ConcurrencyLimiter(1)
    await limiter.acquire()
    waiters = [asyncio.create_task(limiter.acquire()) for _ in range(3)]
    await asyncio.sleep(0)  # every waiter is queued
    waiters[0].cancel()  # cancelled in the same loop turn as the slot is handed over
    limiter.release()
    first, second = await asyncio.gather(*waiters[:2], return_exceptions=True)
    assert isinstance(first, asyncio.CancelledError)
    assert second is None and limiter.in_use == 1  # the slot went to the next live waiter
    limiter.release()
    await waiters[2]
    limiter.release()
    assert limiter.in_use == 0


async def test_a_cycle_of_many_shards_runs_on_a_bounded_pool_of_workers() -> None:
    clock = FakeClock()
    # Not spread (commit.spread 0): the cycle goes as fast as the pool allows.
    config = make_config(groups={"orders": "ls/cg"}, interval="5s", max_in_flight=4, spread=0)
    async with committer_env(config, clock=clock, logstores=(f"{PROJECT}/ls:500",)) as env:
        for shard in range(500):
            env.store.accept("orders", shard, cursor(shard + 1))
        clock.now += 5.0
        assert env.committer.run_due_cycles() == 500
        peak = 0
        while not env.observer.cycle_done.is_set():  # no task per shard: a pool of 4 at most
            peak = max(peak, len(env.committer._workers))
            await asyncio.sleep(0)
        assert peak == 4
        assert env.update_calls() == {"OK": 500}
        assert env.store.pending_count("orders") == 0


async def test_concurrent_flushes_with_nothing_new_share_one_flush() -> None:
    config = make_config(groups={"orders": "ls/cg"})
    async with committer_env(config, latency_ms=(5.0, 5.0)) as env:
        for shard in range(16):
            env.store.accept("orders", shard, cursor(7))
        results = await asyncio.gather(*(env.committer.flush(timeout=30) for _ in range(50)))
        assert {r.committed for r in results} == {16}
        assert env.update_calls() == {"OK": 16}
        assert not env.committer._flushes  # nothing is kept once every caller is answered


async def test_a_flush_read_over_several_loop_turns_is_shared_and_can_be_cancelled(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A flush reads its shards a chunk per loop turn (100,000 at once held the loop): callers
    # that arrive meanwhile join it, and one cancelled meanwhile leaves nothing queued.
    monkeypatch.setattr(committer_module, "_FLUSH_CHUNK", 4)
    config = make_config(groups={"orders": "ls/cg"})
    async with committer_env(config, latency_ms=(5.0, 5.0)) as env:
        for shard in range(16):
            env.store.accept("orders", shard, cursor(7))
        cancelled = asyncio.create_task(env.committer.flush(timeout=30))
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # it has read a chunk or two of the four
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        assert not env.committer._flushes and not env.committer._urgent
        assert env.update_calls() == {}
        first = asyncio.create_task(env.committer.flush(timeout=30))
        await asyncio.sleep(0)
        assert env.committer._flushes and not env.committer._urgent  # still reading
        joining = [asyncio.create_task(env.committer.flush(timeout=30)) for _ in range(3)]
        results = await asyncio.gather(first, *joining)
        assert [r.committed for r in results] == [16, 16, 16, 16]
        assert env.update_calls() == {"OK": 16}
        assert not env.committer._flushes


async def test_attack_dropped_shards_are_forgotten_not_kept_for_ever() -> None:
    # Values for shards that do not exist are refused for good: the shards must not stay in
    # memory (nor count toward max_shards) once nothing is left to guard or send.
    config = make_config(groups={"orders": "ls/cg"}, max_in_flight=8)
    async with committer_env(config, logstores=(f"{PROJECT}/ls:4",)) as env:
        for shard in range(4, 504):
            env.store.accept("orders", shard, cursor(1))
        result = await env.committer.flush(timeout=30)
        assert len(result.failed) == 500 and all(f.dropped for f in result.failed)
        assert env.store.tracked_count("orders") == 0
        view = env.store.shard_view("orders", 503)  # still explains what happened to it
        assert view is not None and view.last_error is not None
        assert view.last_error.code in {"ShardNotExist", "ShardNotExsit"}
        env.store.accept("orders", 1, cursor(5))
        assert (await env.committer.flush(timeout=30)).committed == 1
        assert env.store.tracked_count("orders") == 1


async def test_cycles_during_an_outage_do_not_pile_up_work() -> None:
    clock = FakeClock()
    config = make_config(groups={"orders": "ls/cg"}, interval="1s", max_in_flight=1)
    async with committer_env(config, clock=clock, latency_ms=(2000.0, 2000.0)) as env:
        for shard in range(16):
            env.store.accept("orders", shard, cursor(1))
        for _ in range(50):  # SLS answers nothing while 50 intervals pass
            clock.now += 1.0
            assert env.committer.run_due_cycles() == 16
        waiting = [batch for batch in env.committer._regular if batch.left]
        assert len(waiting) == 1  # the newest cycle's list of dirty shards, not fifty
        assert env.committer.in_flight <= 16 + 1


async def test_attack_commits_between_timed_out_flushes_do_not_pile_up_flushes() -> None:
    # Each commit makes the next flush a new one; a flush whose caller gave up is forgotten,
    # so memory does not grow with the number of flush requests.
    config = make_config(groups={"orders": "ls/cg"}, max_in_flight=1)
    async with committer_env(config, latency_ms=(2000.0, 2000.0)) as env:
        for shard in range(16):
            env.store.accept("orders", shard, cursor(1))
        for round_ in range(20):
            env.store.accept("orders", round_ % 16, cursor(round_ + 2))
            result = await env.committer.flush(timeout=0.001)
            assert result.timed_out
        assert not env.committer._flushes
        queued = sum(batch.left for batch in env.committer._urgent)
        assert queued <= 16


def watch_sends(env: Env, note: Callable[[], None]) -> None:
    """Call `note` as each UpdateCheckPoint of the committer starts; the real client sends it."""
    update = env.client.update_checkpoint

    async def noted(*args: Any, **kwargs: Any) -> None:
        note()
        await update(*args, **kwargs)

    env.committer._client = type("Watched", (), {"update_checkpoint": staticmethod(noted)})()


class TurnCounter:
    """Counts event-loop turns: a callback that schedules itself again runs once per turn."""

    def __init__(self) -> None:
        self.turn = 0
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def _tick(self) -> None:
        self.turn += 1
        self._handle = asyncio.get_running_loop().call_soon(self._tick)

    def stop(self) -> None:
        self._handle.cancel()


async def test_turn_budget_lets_a_few_through_per_turn_in_order() -> None:
    budget = TurnBudget(3)
    turns = TurnCounter()
    passed: list[tuple[int, int]] = []

    async def passer(n: int) -> None:
        await budget.pass_()
        passed.append((n, turns.turn))

    tasks = [asyncio.create_task(passer(n)) for n in range(20)]
    tasks[5].cancel()  # a waiter cancelled while queued gives its place to the next
    await asyncio.gather(*tasks, return_exceptions=True)
    turns.stop()
    assert [n for n, _ in passed] == [n for n in range(20) if n != 5]  # first come, first served
    per_turn = Counter(turn for _, turn in passed)
    assert max(per_turn.values()) <= 2 * 3
    assert len(per_turn) >= 19 // 6


async def test_answers_arriving_together_are_followed_up_a_few_per_loop_turn() -> None:
    # 32 requests in flight, and the loop held by other work while their answers arrive: the
    # workers then go on to their next request a few per loop turn, not all 32 in one, so the
    # loop reads the consumers' socket in between.
    config = make_config(groups={"orders": "ls/cg"}, max_in_flight=32)
    logstores = (f"{PROJECT}/ls:400",)
    async with committer_env(config, logstores=logstores, latency_ms=(5.0, 5.0)) as env:
        for shard in range(400):
            env.store.accept("orders", shard, cursor(shard + 1))
        await env.committer.flush(timeout=60)  # the connections are open
        for shard in range(400):
            env.store.accept("orders", shard, cursor(shard + 2))
        turns = TurnCounter()
        sent_in_turn: Counter[int] = Counter()
        watch_sends(env, lambda: sent_in_turn.update((turns.turn,)))
        flush = asyncio.create_task(env.committer.flush(timeout=60))
        for _ in range(10_000):  # until the pool is full
            if env.committer._busy == 32:
                break
            await asyncio.sleep(0)
        assert env.committer._busy == 32
        time.sleep(0.05)  # noqa: ASYNC251 (held on purpose: every answer arrives meanwhile)
        result = await flush
        turns.stop()
        assert result.committed == 400 and env.update_calls() == {"OK": 800}
        assert sum(sent_in_turn.values()) == 400
        assert max(sent_in_turn.values()) <= 2 * committer_module._NEXT_SHARDS_PER_TURN


async def test_a_large_cycle_is_spread_over_its_share_of_the_interval() -> None:
    # 200 dirty shards, an 800 ms interval and spread 0.25: the cycle's requests start evenly
    # over about 200 ms, a steady 1 per ms, instead of in one burst of the whole pool.
    clock = FakeClock()
    config = make_config(
        groups={"orders": "ls/cg"}, interval="800ms", max_in_flight=32, spread=0.25
    )
    async with committer_env(config, clock=clock, logstores=(f"{PROJECT}/ls:200",)) as env:
        for shard in range(200):
            env.store.accept("orders", shard, cursor(shard + 1))
        starts: list[float] = []
        watch_sends(env, lambda: starts.append(time.monotonic()))
        clock.now += 0.8
        assert env.committer.run_due_cycles() == 200
        await env.observer.cycle_done.wait()
        assert env.update_calls() == {"OK": 200} and env.store.pending_count("orders") == 0
        took = starts[-1] - starts[0]
        assert 0.19 <= took < 0.6  # 199 gaps of 1 ms; a loaded machine can only make it longer
        # Across the window, not in a burst at either end: requests start in most of its
        # 10 ms slots (a stalled loop catches up on the starts it owes, so not in every one).
        slots = {int((t - starts[0]) / 0.010) for t in starts}
        assert len(slots) >= 10


async def test_a_flush_right_after_a_cycle_ended_is_not_left_waiting() -> None:
    # The cycle's last worker ends in the loop turn that reports the cycle done; a flush
    # queued in the next turn must start a worker of its own, not count on that one. Neither
    # is spread over the hour's interval (a 15-minute spread would time out here): a cycle of
    # one round of the pool has nothing to spread, and a flush never is.
    clock = FakeClock()
    config = make_config(groups={"orders": "ls/cg"}, interval="1h", max_in_flight=32, spread=0.25)
    async with committer_env(config, clock=clock, logstores=(f"{PROJECT}/ls:200",)) as env:
        for shard in range(32):
            env.store.accept("orders", shard, cursor(shard + 1))
        clock.now += 3600
        assert env.committer.run_due_cycles() == 32
        await env.observer.cycle_done.wait()
        for shard in range(200):
            env.store.accept("orders", shard, cursor(shard + 2))
        result = await env.committer.flush(timeout=30)
        assert result.committed == 200 and not result.timed_out
        assert env.update_calls() == {"OK": 232}
