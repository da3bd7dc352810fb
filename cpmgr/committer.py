"""The committer: on a timer, commit every dirty shard with UpdateCheckPoint.

SLS has no batch call, so a cycle is the batch. A due group's dirty shards go into a work queue
as one list of shard numbers; a bounded pool of workers (`commit.max_in_flight` tasks, created
while there is work) pulls them, marks each in flight in the store and sends it. A failed
attempt that may be retried is scheduled with a timer (exponential backoff, full jitter), so a
backing-off shard never holds a worker; its retry sends the newest accepted value. Outcomes go
to the store, the observer and any `wait`/`flush` caller. The store guarantees one request in
flight per shard; nothing here is proportional to the number of shards in one loop turn except
sorting a group's dirty set at cycle start.

Workers settle answers a few per loop turn (limiter.TurnBudget), and a cycle of more shards
than `max_in_flight` starts them evenly over `commit.spread` of the interval, so commits take a
steady share of the loop (and of the machine) the consumers share, not bursts (docs/design.md,
"The worker pool").

Work is taken in this order: retries whose backoff elapsed, then `wait`/`flush` work, then
timer cycles, so a caller waiting for one shard is not queued behind a 100,000-shard cycle.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import random
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass, field
from typing import Final, Literal, Protocol

from cpmgr.backoff import backoff_delay
from cpmgr.config import CommitConfig, Config, GroupConfig
from cpmgr.errors import SLSError
from cpmgr.limiter import ConcurrencyLimiter, TurnBudget
from cpmgr.outcomes import TIMED_OUT, CommitOutcome, FlushResult, ShardFailure
from cpmgr.sls.client import CheckpointReads, RemoteCheckpoint
from cpmgr.store import Attempt, CheckpointStore, ErrorInfo

__all__ = [
    "CheckpointAPI",
    "CommitObserver",
    "CommitOutcome",
    "Committer",
    "ConcurrencyLimiter",
    "NullObserver",
]

log = logging.getLogger(__name__)

ShardKey = tuple[str, int]

# Shards a worker may skip (already committed, in flight) before it lets the loop run others.
_SKIPS_PER_TURN: Final = 256
# Shards a new flush reads from the store per loop turn: a 100,000-shard flush must not hold
# the loop while it finds what to wait for.
_FLUSH_CHUNK: Final = 2000
_CLOSING: Final = CommitOutcome(ok=False, code="ShuttingDown", message="closing")
_COMMITTED: Final = CommitOutcome(ok=True)
# Workers that may settle an answer (and go on to their next shard) per loop turn
# (limiter.TurnBudget): answers that arrive together are handled a few per turn, with the
# consumers' lines read in between.
_NEXT_SHARDS_PER_TURN: Final = 8


class CheckpointAPI(CheckpointReads, Protocol):
    """The part of the SLS client the committer uses."""

    async def update_checkpoint(
        self,
        project: str,
        logstore: str,
        group: str,
        shard: int,
        checkpoint: str,
        *,
        consumer: str = "",
        force_success: bool = True,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> None: ...


class CommitObserver(Protocol):
    """Receives what the committer does (metrics, logs); every method must be cheap."""

    def attempt_finished(self, group: str, code: str, seconds: float) -> None: ...
    def retried(self, group: str) -> None: ...
    def commit_finished(self, group: str, code: str, seconds: float, *, ok: bool) -> None: ...
    def cycle_finished(self, seconds: float, shards: int) -> None: ...
    def value_dropped(self, group: str, code: str) -> None: ...
    def concurrency_changed(self, limit: int) -> None: ...


class NullObserver:
    """An observer that ignores everything."""

    def attempt_finished(self, group: str, code: str, seconds: float) -> None:
        pass

    def retried(self, group: str) -> None:
        pass

    def commit_finished(self, group: str, code: str, seconds: float, *, ok: bool) -> None:
        pass

    def cycle_finished(self, seconds: float, shards: int) -> None:
        pass

    def value_dropped(self, group: str, code: str) -> None:
        pass

    def concurrency_changed(self, limit: int) -> None:
        pass


# --- work ---------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Cycle:
    """One timer cycle: done when every shard it queued has been committed or skipped."""

    started: float
    queued: int = 0  # shards still in its batches
    running: int = 0  # its jobs not finished yet
    committed: int = 0  # jobs it started
    pace: float = 0.0  # seconds between the starts of two of its jobs; 0: no pacing
    next_start: float = 0.0  # time.monotonic() from which its next job may start

    def due_in(self) -> float:
        """Seconds until its next job may start (0 or less: now)."""
        return self.next_start - time.monotonic() if self.pace else 0.0

    @property
    def done(self) -> bool:
        return self.queued == 0 and self.running == 0


@dataclass(eq=False)
class _Batch:
    """Shards of one group to commit, pulled one at a time by the workers."""

    group: str
    shards: list[int]
    cycle: _Cycle | None = None
    pos: int = 0

    def discard(self) -> None:
        """Give up the shards not taken yet (a newer batch covers them)."""
        if self.cycle is not None:
            self.cycle.queued -= self.left
        self.pos = len(self.shards)

    def take(self) -> int | None:
        if self.pos >= len(self.shards):
            return None
        shard = self.shards[self.pos]
        self.pos += 1
        if self.cycle is not None:
            self.cycle.queued -= 1
        return shard

    @property
    def left(self) -> int:
        return len(self.shards) - self.pos


@dataclass(eq=False)
class _Job:
    """One shard's commit: the value being sent, attempts made, when it started."""

    attempt: Attempt
    started: float
    cycle: _Cycle | None
    attempts: int = 0
    retry_timer: asyncio.TimerHandle | None = None
    worker: asyncio.Task[None] | None = None


@dataclass(eq=False)
class _Waiter:
    seq: int
    future: asyncio.Future[CommitOutcome]


@dataclass(eq=False)
class _Flush:
    """A flush of one group, shared by every caller that asks while nothing new is accepted."""

    group: str
    barrier: int  # the group's last accepted seq when the snapshot was taken
    remaining: dict[int, int]  # shard -> seq still to settle
    committed: int = 0
    failed: list[ShardFailure] = field(default_factory=list)
    done: asyncio.Event = field(default_factory=asyncio.Event)
    aborted: CommitOutcome | None = None  # closing: every remaining shard failed with this
    callers: int = 0  # flush requests waiting on it
    batch: _Batch | None = None  # its shards in the urgent queue
    gathering: bool = True  # still reading its shards from the store (not done before that)

    def abort(self, outcome: CommitOutcome) -> None:
        self.aborted = outcome
        self.done.set()

    def failures(self) -> list[ShardFailure]:
        """The failed shards; after abort() also the remaining ones (built only when asked)."""
        if self.aborted is None:
            return self.failed
        code, message = self.aborted.code, self.aborted.message
        rest = [ShardFailure(self.group, s, code, message, False) for s in self.remaining]
        return self.failed + rest

    def settle(self, shard: int, outcome: CommitOutcome) -> None:
        if self.remaining.pop(shard, None) is None:
            return
        if outcome.ok:
            self.committed += 1
        elif outcome.code != "Timeout":
            self.failed.append(
                ShardFailure(self.group, shard, outcome.code, outcome.message, outcome.dropped)
            )
        if not self.remaining and not self.gathering:
            self.done.set()


@dataclass
class _GroupState:
    config: GroupConfig
    interval: float
    next_due: float
    # What was logged since the group last succeeded: (code, None) for a retryable failure
    # (one line per group and code), (code, shard) for a dropped value (per shard and code).
    failing: set[tuple[str, int | None]] = field(default_factory=set)


class Committer:
    """Commits the store's dirty shards on a timer, and on demand for `wait` and `flush`."""

    def __init__(
        self,
        *,
        config: Config,
        store: CheckpointStore,
        client: CheckpointAPI,
        observer: CommitObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        on_credentials_error: Callable[[], None] | None = None,
        on_committed: Callable[[str, int, str], None] | None = None,
        on_dropped: Callable[[str, int, str], None] | None = None,
        on_refused: Callable[[str, int, str | None, SLSError], None] | None = None,
    ) -> None:
        self._store = store
        self._client = client
        self._observer: CommitObserver = observer or NullObserver()
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._on_credentials_error = on_credentials_error
        self._on_committed = on_committed
        self._on_dropped = on_dropped
        # (group, shard, consumer, error) of every value SLS refused for good: membership
        # learns from it that a member lost a shard.
        self._on_refused = on_refused
        self._limiter = ConcurrencyLimiter(config.commit.max_in_flight, clock=clock)
        self._commit_cfg: CommitConfig = config.commit
        self._groups: dict[str, _GroupState] = {}
        self._jobs: dict[ShardKey, _Job] = {}
        self._retries: collections.deque[ShardKey] = collections.deque()
        self._urgent: collections.deque[_Batch] = collections.deque()
        self._regular: collections.deque[_Batch] = collections.deque()
        self._cycle_batches: dict[str, _Batch] = {}  # each group's newest cycle batch
        self._workers: set[asyncio.Task[None]] = set()
        self._busy = 0  # workers in the middle of an attempt
        self._turns = TurnBudget(_NEXT_SHARDS_PER_TURN)
        self._pace_timer: asyncio.TimerHandle | None = None  # a paced cycle's next start
        # Idle workers waiting for a paced cycle's next start (or other work), first come first.
        self._parked: collections.deque[asyncio.Future[None]] = collections.deque()
        # Shards whose last success may be overtaken by an earlier unanswered attempt: they are
        # sent again once that attempt's window has passed (store.on_success).
        self._verify_timers: dict[ShardKey, asyncio.TimerHandle] = {}
        self._waiters: dict[ShardKey, list[_Waiter]] = collections.defaultdict(list)
        self._flushes: dict[str, list[_Flush]] = collections.defaultdict(list)
        self._wakeup = asyncio.Event()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self.apply_config(config)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="cpmgr-committer")

    async def close(self) -> None:
        """Stop the timer and the workers; values in flight stay pending (idempotent)."""
        self._closing = True
        self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        self._urgent.clear()
        self._regular.clear()
        self._cycle_batches.clear()
        self._retries.clear()
        for timer in self._verify_timers.values():
            timer.cancel()
        self._verify_timers.clear()
        if self._pace_timer is not None:
            self._pace_timer.cancel()
            self._pace_timer = None
        self._parked.clear()  # their workers are cancelled below
        await self._stop_jobs(lambda key: True)
        self._fail_all_waiters(_CLOSING)

    def apply_config(self, config: Config) -> None:
        """Swap in groups and commit settings (SIGHUP); pending values are kept by the store."""
        self._commit_cfg = config.commit
        self._limiter.resize(config.commit.max_in_flight)
        self._observer.concurrency_changed(self._limiter.current)
        now = self._clock()
        groups: dict[str, _GroupState] = {}
        for group in config.groups:
            interval = config.interval_for(group)
            old = self._groups.get(group.name)
            next_due = now + interval if old is None else min(old.next_due, now + interval)
            groups[group.name] = _GroupState(group, interval, next_due)
        self._groups = groups
        self._wakeup.set()

    # ------------------------------------------------------------------ the timer

    async def _run(self) -> None:
        while not self._closing:
            self.run_due_cycles()
            await self._wait_for_next_tick()

    async def _wait_for_next_tick(self) -> None:
        delay = max(
            0.0, min((g.next_due for g in self._groups.values()), default=60.0) - self._clock()
        )
        self._wakeup.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wakeup.wait(), timeout=delay)

    def run_due_cycles(self) -> int:
        """Queue every dirty shard of the groups whose interval has elapsed; how many."""
        now = self._clock()
        cycle = _Cycle(started=now)
        window = float("inf")
        for name, state in self._groups.items():
            if state.next_due <= now:
                state.next_due = now + state.interval
                shards = self._store.dirty_shards(name)
                if shards:
                    self._replace_cycle_batch(_Batch(name, shards, cycle))
                    window = min(window, state.interval * self._commit_cfg.spread)
        if cycle.queued:
            self._pace(cycle, window)
            self._ensure_workers()
        return cycle.queued

    def _pace(self, cycle: _Cycle, window: float) -> None:
        """Spread the starts of a cycle of more shards than one round of the pool evenly over
        `window` (`commit.spread` of the shortest interval among its groups). Sent as fast as
        the pool goes, a 1,000-shard cycle keeps the daemon's core (and SLS) busy in one burst
        while the consumers' lines wait; spread, it takes a steady share. Smaller cycles are
        one round of requests: nothing to spread. Pacing runs on the real clock, whatever
        clock times the intervals, since it only shapes how the CPU is used."""
        if window > 0 and cycle.queued > self._limiter.maximum:
            cycle.pace = window / cycle.queued
            cycle.next_start = time.monotonic()

    def _replace_cycle_batch(self, batch: _Batch) -> None:
        """Queue a cycle's batch. A group's previous cycle batch, if the workers have not got
        through it yet (SLS slower than the interval), is given up: the new one holds every
        shard dirty now, so an outage does not pile up one list of shards per interval."""
        old = self._cycle_batches.get(batch.group)
        if old is not None and old.left:
            old.discard()
            self._cycle_progress(old.cycle)
        assert batch.cycle is not None
        batch.cycle.queued += len(batch.shards)
        self._cycle_batches[batch.group] = batch
        self._regular.append(batch)

    def commit_now(self, *, group: str | None = None, shards: Collection[int] | None = None) -> int:
        """Queue (ahead of timer cycles) every dirty shard, of one group and/or some shards;
        how many were queued."""
        queued = 0
        for name in self._store.groups() if group is None else [group]:
            dirty = self._store.dirty_shards(name)
            if shards is not None:
                wanted = set(shards)
                dirty = [s for s in dirty if s in wanted]
            chosen = dirty
            if chosen:
                queued += len(chosen)
                self._urgent.append(_Batch(name, chosen))
        if queued:
            self._ensure_workers()
        return queued

    def _queue_one(self, key: ShardKey) -> None:
        if key in self._jobs or key in self._verify_timers or self._closing:
            return  # its running job, or its verification, will answer for it
        self._urgent.append(_Batch(key[0], [key[1]]))
        self._ensure_workers()

    # ------------------------------------------------------------------ workers

    def _ensure_workers(self) -> None:
        """If there is work no worker is free to take, wake a parked worker or start one more
        (the pool stays within `max_in_flight`). A worker that takes a job calls this again,
        so the pool grows to what the queue needs within a few loop turns."""
        if self._closing:
            return
        if not self._has_work():
            if self._regular and self._regular[0].cycle is not None:
                self._due(self._regular[0].cycle)  # a paced cycle's next start: workers then
            return
        if self._parked:
            self._unpark(1)
        elif len(self._workers) == self._busy:
            self._start_workers(1)

    def _start_workers(self, count: int) -> None:
        for _ in range(min(count, self._limiter.maximum - len(self._workers))):
            worker = asyncio.create_task(self._work(), name="cpmgr-commit-worker")
            self._workers.add(worker)
            worker.add_done_callback(self._workers.discard)

    def _unpark(self, count: int) -> int:
        """Wake up to `count` parked workers; how many."""
        woken = 0
        while self._parked and woken < count:
            waiter = self._parked.popleft()
            if not waiter.done():
                waiter.set_result(None)
                woken += 1
        return woken

    def _has_work(self) -> bool:
        """Whether a worker could take a job now (a paced cycle's next start may be later)."""
        if self._retries or self._urgent:
            return True
        regular = self._regular
        if not regular:
            return False
        head = regular[0]
        return not head.left or head.cycle is None or head.cycle.due_in() <= 0

    def _queued_count(self) -> int:
        return (
            len(self._retries)
            + sum(b.left for b in self._urgent)
            + sum(b.left for b in self._regular)
        )

    async def _work(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        try:
            while not self._closing:
                job = self._next_job()
                if job is None:
                    if self._has_work():
                        await asyncio.sleep(0)  # skipped many shards: let the loop breathe
                    elif self._regular:
                        await self._park()
                    else:
                        self._unpark(len(self._parked))  # nothing left: they end too
                        return
                    continue
                job.worker = task
                self._busy += 1
                self._ensure_workers()
                try:
                    await self._attempt(job)
                finally:
                    job.worker = None
                    self._busy -= 1
        finally:
            # Leave the pool now, not in the done callback a loop turn later: work queued in
            # between (a flush right after a cycle ended) would see this worker as idle, start
            # none, and wait for the next cycle.
            self._workers.discard(task)

    def _next_job(self) -> _Job | None:
        """A job ready to send: a due retry, else a new one from the queues. None when the
        queues are empty or after skipping a run of shards that need nothing."""
        while self._retries:
            job = self._jobs.get(self._retries.popleft())
            if job is not None and job.retry_timer is None and job.worker is None:
                return job
        for _ in range(_SKIPS_PER_TURN):
            batch, shard = self._take_shard()
            if batch is None or shard is None:
                return None
            job = self._begin(batch, shard)
            if job is not None:
                return job
        return None

    def _take_shard(self) -> tuple[_Batch | None, int | None]:
        for queue in (self._urgent, self._regular):
            while queue:
                batch = queue[0]
                if batch.cycle is not None and batch.left and not self._due(batch.cycle):
                    return None, None
                shard = batch.take()
                if shard is not None:
                    return batch, shard
                queue.popleft()
                self._cycle_progress(batch.cycle)
        return None, None

    def _begin(self, batch: _Batch, shard: int) -> _Job | None:
        key = (batch.group, shard)
        if key in self._jobs or key in self._verify_timers:
            return None
        attempt = self._store.begin(batch.group, shard)
        if attempt is None:
            self._answer_settled(key)
            return None
        job = _Job(attempt, self._clock(), batch.cycle)
        if batch.cycle is not None:
            batch.cycle.running += 1
            batch.cycle.committed += 1
            batch.cycle.next_start += batch.cycle.pace  # shards skipped take no time
        self._jobs[key] = job
        return job

    def _due(self, cycle: _Cycle) -> bool:
        """Whether the paced cycle's next job may start now; if not, wake a worker then."""
        delay = cycle.due_in()
        if delay <= 0:
            return True
        if self._pace_timer is None:
            loop = asyncio.get_running_loop()
            self._pace_timer = loop.call_later(delay, self._pace_due)
        return False

    def _pace_due(self) -> None:
        """A paced cycle's next start has come: as many workers as starts are due take them
        (a timer fires a millisecond late at best, and later on a busy loop, so a fast pace
        has several starts due at once)."""
        self._pace_timer = None
        if not self._regular or self._closing:
            return
        head = self._regular[0]
        cycle = head.cycle
        due = head.left
        if cycle is not None and cycle.pace:
            due = min(due, int(-cycle.due_in() / cycle.pace) + 1)
        self._start_workers(due - self._unpark(due))

    async def _park(self) -> None:
        """Wait, idle, until a paced start is due or other work comes."""
        waiter = asyncio.get_running_loop().create_future()
        self._parked.append(waiter)
        await waiter

    def _cycle_progress(self, cycle: _Cycle | None) -> None:
        if cycle is not None and cycle.done:
            cycle.queued = -1  # report once
            self._observer.cycle_finished(self._clock() - cycle.started, cycle.committed)

    # ------------------------------------------------------------------ one attempt

    async def _attempt(self, job: _Job) -> None:
        if job.attempts:
            job.attempt = self._store.refresh(job.attempt)
            self._observer.retried(job.attempt.group)
        job.attempts += 1
        attempt = job.attempt
        sent_at = self._clock()
        error = await self._send(attempt, sent_at)
        # Settling this shard and sending the worker's next one, a few workers per loop turn.
        await self._turns.pass_()
        if error is None:
            settled = self._store.on_success(attempt, at=self._wall_clock(), sent_at=sent_at)
            self._finish(job, None, settled=settled)
            return
        if not error.permanent:
            self._store.note_error(attempt, self._error_info(error))
            if error.may_have_landed:
                # From when the attempt ended, not from when it was queued: an attempt that
                # waited for a free slot went out later than `sent_at`, and its window must
                # not close early (a later success would then settle under a late landing).
                until = self._clock() + 2 * self._commit_cfg.request_timeout
                self._store.on_ambiguous(attempt, until=until)
            if error.credentials_problem and self._on_credentials_error is not None:
                self._on_credentials_error()
            if job.attempts < self._commit_cfg.retry.max_attempts and not self._closing:
                self._schedule_retry(job)
                return
        self._finish(job, error)

    def _schedule_retry(self, job: _Job) -> None:
        retry = self._commit_cfg.retry
        delay = backoff_delay(
            job.attempts,
            initial=retry.initial_backoff,
            maximum=retry.max_backoff,
            rng=self._rng.random,
        )
        key = (job.attempt.group, job.attempt.shard)
        job.retry_timer = asyncio.get_running_loop().call_later(delay, self._retry_due, key)

    def _retry_due(self, key: ShardKey) -> None:
        job = self._jobs.get(key)
        if job is None:
            return
        job.retry_timer = None
        self._retries.append(key)
        self._ensure_workers()

    async def _send(self, attempt: Attempt, sent_at: float) -> SLSError | None:
        state = self._groups.get(attempt.group)
        if state is None:
            return SLSError("UnknownGroup", 0, f"group {attempt.group!r} is no longer configured")
        group = state.config
        started = sent_at
        if not self._limiter.try_acquire():
            await self._limiter.acquire()
            started = self._clock()
        try:
            await self._client.update_checkpoint(
                group.project,
                group.logstore,
                group.consumer_group,
                attempt.shard,
                attempt.checkpoint,
                consumer=attempt.consumer or group.consumer or "",
                force_success=group.force_success,
                endpoint=group.endpoint,
                region=group.region,
            )
        except SLSError as exc:
            self._observer.attempt_finished(attempt.group, exc.code, self._clock() - started)
            self._adjust_concurrency(exc)
            return exc
        except Exception as exc:  # a client bug must not leave the shard in flight forever
            log.exception("unexpected error committing %s/%d", attempt.group, attempt.shard)
            return SLSError("ClientError", 0, f"unexpected {type(exc).__name__}")
        finally:
            self._limiter.release()
        self._observer.attempt_finished(attempt.group, "OK", self._clock() - started)
        self._adjust_concurrency(None)
        return None

    def _adjust_concurrency(self, error: SLSError | None) -> None:
        changed = self._limiter.succeeded() if error is None else False
        if error is not None and error.throttling:
            changed = self._limiter.throttled()
            if changed:
                log.warning(
                    "SLS is throttling (%s): commit concurrency lowered to %d",
                    error.code,
                    self._limiter.current,
                )
        if changed:
            self._observer.concurrency_changed(self._limiter.current)

    # ------------------------------------------------------------------ outcomes

    def _finish(self, job: _Job, error: SLSError | None, *, settled: bool = True) -> None:
        attempt = job.attempt
        key = (attempt.group, attempt.shard)
        if self._jobs.get(key) is job:
            del self._jobs[key]
        if settled:
            self._record(attempt, error, self._clock() - job.started)
        else:
            self._verify_later(key)
        if job.cycle is not None:
            job.cycle.running -= 1
            self._cycle_progress(job.cycle)
        self._answer(key, attempt, error)

    def _verify_later(self, key: ShardKey) -> None:
        """Send the shard again once the unanswered attempt's window has passed."""
        delay = max(0.0, self._store.unsettled_until(*key) - self._clock())
        old = self._verify_timers.pop(key, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._verify_timers[key] = loop.call_later(delay, self._verify_due, key)

    def _verify_due(self, key: ShardKey) -> None:
        self._verify_timers.pop(key, None)
        self._queue_one(key)

    def _record(self, attempt: Attempt, error: SLSError | None, seconds: float) -> None:
        if error is None:
            if self._on_committed is not None:
                self._on_committed(attempt.group, attempt.shard, attempt.checkpoint)
            self._observer.commit_finished(attempt.group, "OK", seconds, ok=True)
            self._group_recovered(attempt.group)
            return
        info = self._error_info(error)
        if error.permanent:
            self._store.on_permanent_failure(attempt, info)
            if self._on_dropped is not None:
                self._on_dropped(attempt.group, attempt.shard, attempt.checkpoint)
            if self._on_refused is not None:
                self._on_refused(attempt.group, attempt.shard, attempt.consumer, error)
        else:
            self._store.on_retryable_failure(attempt, info)
        self._observer.commit_finished(attempt.group, error.code, seconds, ok=False)
        self._group_failed(attempt, error)

    def _error_info(self, error: SLSError) -> ErrorInfo:
        return ErrorInfo(code=error.code, message=error.message, at=self._wall_clock())

    def _group_failed(self, attempt: Attempt, error: SLSError) -> None:
        state = self._groups.get(attempt.group)
        key = (error.code, attempt.shard if error.permanent else None)
        if state is None or key in state.failing:
            return
        state.failing.add(key)
        action = "dropped" if error.permanent else "kept pending"
        log.warning(
            "group %s: commit of shard %d failed with %s (%s); value %s",
            attempt.group,
            attempt.shard,
            error.code,
            error.message,
            action,
        )

    def _group_recovered(self, name: str) -> None:
        state = self._groups.get(name)
        if state is not None and state.failing:
            state.failing.clear()
            log.info("group %s: commits succeed again", name)

    async def abandon(self, group: str) -> None:
        """Stop the work of a group about to be forgotten (its values stay pending)."""
        for batch in [*self._urgent, *self._regular]:
            if batch.group == group:
                batch.discard()  # popped when the workers reach it
                self._cycle_progress(batch.cycle)
        self._cycle_batches.pop(group, None)
        for key in [k for k in self._verify_timers if k[0] == group]:
            self._verify_timers.pop(key).cancel()
        await self._stop_jobs(lambda key: key[0] == group)

    async def _stop_jobs(self, which: Callable[[ShardKey], bool]) -> None:
        """End the chosen jobs: their values stay pending, callers learn ShuttingDown."""
        jobs = [job for key, job in self._jobs.items() if which(key)]
        workers = {job.worker for job in jobs if job.worker is not None}
        if self._closing:
            workers |= self._workers
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
        for job in jobs:
            if job.retry_timer is not None:
                job.retry_timer.cancel()
            info = ErrorInfo(code="ShuttingDown", message="commit cancelled", at=self._wall_clock())
            self._store.on_retryable_failure(job.attempt, info)
            key = (job.attempt.group, job.attempt.shard)
            if self._jobs.get(key) is job:
                del self._jobs[key]
            if job.cycle is not None:
                job.cycle.running -= 1
                self._cycle_progress(job.cycle)
        self._ensure_workers()  # the workers cancelled with these jobs served others too

    # ------------------------------------------------------------------ wait and flush

    def _answer(self, key: ShardKey, attempt: Attempt, error: SLSError | None) -> None:
        """Tell `wait` and `flush` callers of the shard what its job achieved; queue it again
        if one of them waits for a value newer than the job sent."""
        group, shard = key
        waiters = self._waiters.get(key)
        flushes = self._flushes.get(group)
        if not waiters and not flushes:
            return
        again = False
        # Once per commit during a flush: no list of watchers is built.
        for waiter in waiters or ():
            if not waiter.future.done():
                outcome = self._outcome_for(key, waiter.seq, attempt, error)
                if outcome is None:
                    again = True
                else:
                    waiter.future.set_result(outcome)
        for flush in flushes or ():
            seq = flush.remaining.get(shard)
            if seq is not None:
                outcome = self._outcome_for(key, seq, attempt, error)
                if outcome is None:
                    again = True
                else:
                    flush.settle(shard, outcome)
        self._prune_waiters(key)
        if again:
            self._queue_one(key)

    def _answer_settled(self, key: ShardKey) -> None:
        """The shard needs no request (committed, dropped or gone): answer its callers."""
        for seq, deliver in self._watchers(key):
            outcome = self._immediate_outcome(key[0], key[1], seq)
            if outcome is not None:
                deliver(outcome)
        self._prune_waiters(key)

    def _watchers(self, key: ShardKey) -> list[tuple[int, Callable[[CommitOutcome], None]]]:
        """(seq waited for, how to deliver its outcome) of every caller waiting on the shard."""
        group, shard = key
        watchers: list[tuple[int, Callable[[CommitOutcome], None]]] = [
            (w.seq, w.future.set_result) for w in self._waiters.get(key, ()) if not w.future.done()
        ]
        for flush in self._flushes.get(group, ()):
            seq = flush.remaining.get(shard)
            if seq is not None:
                watchers.append((seq, functools.partial(flush.settle, shard)))
        return watchers

    def _prune_waiters(self, key: ShardKey) -> None:
        waiters = self._waiters.get(key)
        if waiters is not None:
            waiters[:] = [w for w in waiters if not w.future.done()]
            if not waiters:
                del self._waiters[key]
        flushes = self._flushes.get(key[0])
        if flushes is not None:
            flushes[:] = [f for f in flushes if not f.done.is_set()]
            if not flushes:
                del self._flushes[key[0]]

    def _outcome_for(
        self, key: ShardKey, seq: int, attempt: Attempt, error: SLSError | None
    ) -> CommitOutcome | None:
        fate = self._store.is_settled(key[0], key[1], seq)
        if fate == "committed":
            return _COMMITTED
        if fate == "dropped":
            code = error.code if error is not None else "CommitFailed"
            message = error.message if error is not None else "value was dropped"
            return CommitOutcome(ok=False, code=code, message=message, dropped=True)
        if error is not None and seq <= attempt.seq:
            return CommitOutcome(ok=False, code=error.code, message=error.message, dropped=False)
        return None  # a newer value than the job sent, or not settled yet: commit again

    def discard(self, group: str, shard: int, *, code: str, message: str) -> None:
        """Drop the shard's pending value (its member lost the shard); callers waiting for it
        learn `code` with `dropped`. A job in flight still ends on its own."""
        info = ErrorInfo(code=code, message=message, at=self._wall_clock())
        checkpoint = self._store.discard_pending(group, shard, info)
        if checkpoint is None:
            return
        self._observer.value_dropped(group, code)
        if self._on_dropped is not None:
            self._on_dropped(group, shard, checkpoint)
        self._answer_settled((group, shard))

    async def wait_for(self, group: str, shard: int, seq: int, timeout: float) -> CommitOutcome:
        """Commit `shard` now (joining a job in flight) until value `seq` or newer is settled."""
        outcome = self._immediate_outcome(group, shard, seq)
        if outcome is not None:
            return outcome
        future: asyncio.Future[CommitOutcome] = asyncio.get_running_loop().create_future()
        key = (group, shard)
        self._waiters[key].append(_Waiter(seq, future))
        self._queue_one(key)
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout)
        except TimeoutError:
            return TIMED_OUT
        finally:
            if not future.done():
                future.cancel()
            self._prune_waiters(key)

    def _immediate_outcome(self, group: str, shard: int, seq: int) -> CommitOutcome | None:
        fate = self._store.is_settled(group, shard, seq)
        if fate == "committed":
            return _COMMITTED
        if fate == "dropped":
            view = self._store.shard_view(group, shard)
            error = view.last_error if view is not None else None
            return CommitOutcome(
                ok=False,
                code=error.code if error else "CommitFailed",
                message=error.message if error else "value was dropped",
                dropped=True,
            )
        if self._closing:
            return _CLOSING
        return None

    async def flush(self, *, group: str | None = None, timeout: float) -> FlushResult:
        """Commit everything pending now (retrying up to max_attempts) and report per shard.
        Callers share a group's flush in progress while nothing was accepted since it began."""
        if self._closing:
            return self._closing_result(group)
        names = self._store.groups() if group is None else [group]
        flushes: list[_Flush] = []
        waits: list[asyncio.Future[Literal[True]]] = []
        try:
            for name in names:
                await self._join_flush(name, flushes)
            if not flushes:
                return FlushResult(committed=0)
            waits = [asyncio.ensure_future(f.done.wait()) for f in flushes]
            _done, late = await asyncio.wait(waits, timeout=timeout)
        finally:
            for wait in waits:
                wait.cancel()
            for flush in flushes:
                self._leave_flush(flush)
        failed = sorted(
            (failure for f in flushes for failure in f.failures()),
            key=lambda f: (f.group, f.shard),
        )
        return FlushResult(
            committed=sum(f.committed for f in flushes),
            failed=tuple(failed),
            timed_out=bool(late),
        )

    def _leave_flush(self, flush: _Flush) -> None:
        """A caller is done with `flush`. A flush nobody waits for any more is forgotten, and
        so are its queued shards not yet taken: commits already under way go on, and the timer
        commits the rest. Otherwise a consumer that commits between timed-out flushes would
        pile up one list of pending shards per flush."""
        flush.callers -= 1
        if flush.callers or flush.done.is_set():
            return
        flushes = self._flushes.get(flush.group)
        if flushes is not None and flush in flushes:
            flushes.remove(flush)
            if not flushes:
                del self._flushes[flush.group]
        if flush.batch is not None:
            flush.batch.discard()

    async def _join_flush(self, group: str, joined: list[_Flush]) -> None:
        """Join the group's shared flush in progress, or start a new one, adding it to `joined`
        (as one more caller) before anything is awaited; nothing if nothing is pending."""
        barrier = self._store.last_seq(group)
        for flush in self._flushes.get(group, ()):
            if flush.barrier == barrier and not flush.done.is_set():
                flush.callers += 1
                joined.append(flush)
                return
        if not self._store.pending_count(group):
            return
        flush = _Flush(group, barrier, {}, callers=1)
        self._flushes[group].append(flush)
        joined.append(flush)
        await self._gather(flush)
        flush.gathering = False
        if flush.done.is_set():  # aborted: the committer is closing
            return
        if not flush.remaining:  # every value was settled while it was read
            flush.done.set()
            return
        flush.batch = _Batch(group, list(flush.remaining))  # in shard order, as read
        self._urgent.append(flush.batch)
        self._ensure_workers()

    async def _gather(self, flush: _Flush) -> None:
        """Read the values `flush` waits for (shard -> seq of each pending value, in or out of
        flight) a chunk of shards per loop turn. A value settled before its shard is read is
        not waited for; one settled after is taken off `remaining` like any other."""
        dirty = self._store.dirty_shards(flush.group)
        for start in range(0, len(dirty), _FLUSH_CHUNK):
            if flush.done.is_set():  # aborted: the committer is closing
                return
            chunk = dirty[start : start + _FLUSH_CHUNK]
            flush.remaining.update(self._store.pending_by_shard(flush.group, chunk))
            if start + _FLUSH_CHUNK < len(dirty):
                await asyncio.sleep(0)

    def _closing_result(self, group: str | None) -> FlushResult:
        failed = tuple(
            ShardFailure(g, shard, _CLOSING.code, _CLOSING.message, False)
            for g, shard, _seq in self._store.pending_seqs(group=group)
        )
        return FlushResult(committed=0, failed=failed)

    def _fail_all_waiters(self, outcome: CommitOutcome) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_result(outcome)
        self._waiters.clear()
        for flushes in self._flushes.values():
            for flush in flushes:
                flush.abort(outcome)
        self._flushes.clear()

    # ------------------------------------------------------------------ remote reads

    async def remote(self, group: str, shard: int | None = None) -> dict[int, RemoteCheckpoint]:
        """GetCheckPoint for a configured group: the server's view, by shard."""
        config = self._groups[group].config
        entries = await self._client.get_checkpoint(
            config.project,
            config.logstore,
            config.consumer_group,
            shard,
            endpoint=config.endpoint,
            region=config.region,
        )
        return {entry.shard: entry for entry in entries}

    @property
    def in_flight(self) -> int:
        """Shards being committed or queued to be."""
        return len(self._jobs) + self._queued_count()

    @property
    def concurrency_limit(self) -> int:
        return self._limiter.current
