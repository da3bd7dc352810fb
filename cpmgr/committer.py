"""The committer: on a timer, commit every dirty shard with UpdateCheckPoint.

A cycle snapshots the dirty shards of the groups that are due and starts one job per shard
(SLS has no batch call, so a cycle is the batch). A job retries with exponential backoff and
full jitter, each attempt sending the newest accepted value, and reports its outcome to the
store, the observer and any `wait`/`flush` caller. The store guarantees one job per shard.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from typing import Protocol

from cpmgr.backoff import backoff_delay
from cpmgr.config import CommitConfig, Config, GroupConfig
from cpmgr.errors import SLSError
from cpmgr.outcomes import TIMED_OUT, CommitOutcome, FlushResult, ShardFailure
from cpmgr.sls.client import RemoteCheckpoint
from cpmgr.store import Attempt, CheckpointStore, ErrorInfo

log = logging.getLogger(__name__)

ShardKey = tuple[str, int]


class CheckpointAPI(Protocol):
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

    async def get_checkpoint(
        self,
        project: str,
        logstore: str,
        group: str,
        shard: int | None = None,
        *,
        endpoint: str | None = None,
        region: str | None = None,
    ) -> list[RemoteCheckpoint]: ...


class CommitObserver(Protocol):
    """Receives what the committer does (metrics, logs); every method must be cheap."""

    def attempt_finished(self, group: str, code: str, seconds: float) -> None: ...
    def retried(self, group: str) -> None: ...
    def commit_finished(self, group: str, code: str, seconds: float, *, ok: bool) -> None: ...
    def cycle_finished(self, seconds: float, shards: int) -> None: ...
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

    def concurrency_changed(self, limit: int) -> None:
        pass


class ConcurrencyLimiter:
    """A semaphore whose size follows AIMD: halve on throttling, creep back on success."""

    def __init__(
        self,
        maximum: int,
        *,
        cooldown: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.maximum = maximum
        self.limit = float(maximum)
        self.in_use = 0
        self._cooldown = cooldown
        self._clock = clock
        self._last_decrease = -float("inf")
        self._waiters: list[asyncio.Future[None]] = []

    @property
    def current(self) -> int:
        return max(1, int(self.limit))

    async def acquire(self) -> None:
        if self.in_use < self.current and not self._waiters:
            self.in_use += 1
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # the slot was handed to us just as we were cancelled
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.in_use -= 1
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.in_use < self.current:
            waiter = self._waiters.pop(0)
            if not waiter.done():
                self.in_use += 1
                waiter.set_result(None)

    def throttled(self) -> bool:
        """Halve the limit (at most once per cooldown); True if it changed."""
        now = self._clock()
        if now - self._last_decrease < self._cooldown or self.limit <= 1:
            return False
        self._last_decrease = now
        self.limit = max(1.0, self.limit / 2)
        return True

    def succeeded(self) -> bool:
        """Grow the limit by about one per window of successes; True if the integer changed."""
        if self.limit >= self.maximum:
            return False
        before = self.current
        self.limit = min(float(self.maximum), self.limit + 1.0 / self.limit)
        self._wake()
        return self.current != before


@dataclass
class _Waiter:
    seq: int
    future: asyncio.Future[CommitOutcome]


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
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
        on_credentials_error: Callable[[], None] | None = None,
        on_committed: Callable[[str, int, str], None] | None = None,
        on_dropped: Callable[[str, int, str], None] | None = None,
    ) -> None:
        self._store = store
        self._client = client
        self._observer: CommitObserver = observer or NullObserver()
        self._clock = clock
        self._wall_clock = wall_clock
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._on_credentials_error = on_credentials_error
        self._on_committed = on_committed
        self._on_dropped = on_dropped
        self._limiter = ConcurrencyLimiter(config.commit.max_in_flight, clock=clock)
        self._commit_cfg: CommitConfig = config.commit
        self._groups: dict[str, _GroupState] = {}
        self._jobs: dict[ShardKey, asyncio.Task[None]] = {}
        self._sending: dict[ShardKey, Attempt] = {}  # the value each job sends now
        self._cycle_watchers: set[asyncio.Task[None]] = set()
        self._waiters: dict[ShardKey, list[_Waiter]] = defaultdict(list)
        self._wakeup = asyncio.Event()
        self._closing = False
        self._loop_task: asyncio.Task[None] | None = None
        self.apply_config(config)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        if self._loop_task is None:
            self._loop_task = asyncio.create_task(self._run(), name="cpmgr-committer")

    async def close(self) -> None:
        """Stop the timer and cancel any job still running (idempotent)."""
        self._closing = True
        self._wakeup.set()
        if self._loop_task is not None:
            self._loop_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loop_task
            self._loop_task = None
        jobs = [*self._jobs.values(), *self._cycle_watchers]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)
        self._fail_all_waiters(CommitOutcome(ok=False, code="ShuttingDown", message="closing"))

    def apply_config(self, config: Config) -> None:
        """Swap in groups and commit settings (SIGHUP); pending values are kept by the store."""
        self._commit_cfg = config.commit
        self._limiter.maximum = config.commit.max_in_flight
        self._limiter.limit = min(self._limiter.limit, float(config.commit.max_in_flight))
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

    # ------------------------------------------------------------------ the timer loop

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
        """Start jobs for every group whose interval has elapsed; returns how many started."""
        now = self._clock()
        jobs: list[asyncio.Task[None]] = []
        for name, state in self._groups.items():
            if state.next_due <= now:
                state.next_due = now + state.interval
                jobs += self.commit_now(group=name)
        if jobs:
            watcher = asyncio.create_task(self._observe_cycle(jobs, now))
            self._cycle_watchers.add(watcher)
            watcher.add_done_callback(self._cycle_watchers.discard)
        return len(jobs)

    async def _observe_cycle(self, jobs: list[asyncio.Task[None]], started: float) -> None:
        await asyncio.gather(*jobs, return_exceptions=True)
        self._observer.cycle_finished(self._clock() - started, len(jobs))

    def commit_now(
        self, *, group: str | None = None, shards: Collection[int] | None = None
    ) -> list[asyncio.Task[None]]:
        """Start a job for every dirty shard not already in flight."""
        return [
            self._launch(attempt) for attempt in self._store.snapshot(group=group, shards=shards)
        ]

    def _launch(self, attempt: Attempt) -> asyncio.Task[None]:
        key = (attempt.group, attempt.shard)
        job = asyncio.create_task(
            self._job(attempt), name=f"commit-{attempt.group}-{attempt.shard}"
        )
        self._jobs[key] = job
        self._sending[key] = attempt
        job.add_done_callback(lambda done: self._job_done(key, done))
        return job

    def _job_done(self, key: ShardKey, job: asyncio.Task[None]) -> None:
        if self._jobs.get(key) is not job:
            return  # a newer job for the shard already took its place
        del self._jobs[key]
        attempt = self._sending.pop(key)
        if job.cancelled():
            # Closing or abandoned, possibly before the job even started: the value stays
            # pending (and is reported as left behind).
            info = ErrorInfo(code="ShuttingDown", message="commit cancelled", at=self._wall_clock())
            self._store.on_retryable_failure(attempt, info)
        elif (exc := job.exception()) is not None:
            # A bug must not leave the shard marked in flight, never to be committed again.
            log.error("commit job for %s/%d failed", key[0], key[1], exc_info=exc)
            info = ErrorInfo(code="InternalError", message=repr(exc), at=self._wall_clock())
            self._store.on_retryable_failure(attempt, info)

    # ------------------------------------------------------------------ one shard's commit

    async def _job(self, attempt: Attempt) -> None:
        key = (attempt.group, attempt.shard)
        started = self._clock()
        attempt, error = await self._attempts(attempt)
        self._record(attempt, error, self._clock() - started)
        self._settle_waiters(key, attempt, error)

    async def _attempts(self, attempt: Attempt) -> tuple[Attempt, SLSError | None]:
        retry = self._commit_cfg.retry
        error: SLSError | None = None
        for number in range(1, retry.max_attempts + 1):
            if number > 1:
                await self._backoff(number - 1)
                attempt = self._store.refresh(attempt)
                self._sending[attempt.group, attempt.shard] = attempt
                self._observer.retried(attempt.group)
            error = await self._send(attempt)
            if error is None or error.permanent:
                return attempt, error
            # Visible in `get` and in the shutdown report while the retries go on.
            self._store.note_error(attempt, self._error_info(error))
            if error.credentials_problem and self._on_credentials_error is not None:
                self._on_credentials_error()
        return attempt, error

    async def _backoff(self, retry_number: int) -> None:
        retry = self._commit_cfg.retry
        delay = backoff_delay(
            retry_number,
            initial=retry.initial_backoff,
            maximum=retry.max_backoff,
            rng=self._rng.random,
        )
        await self._sleep(delay)

    async def _send(self, attempt: Attempt) -> SLSError | None:
        state = self._groups.get(attempt.group)
        if state is None:
            return SLSError("UnknownGroup", 0, f"group {attempt.group!r} is no longer configured")
        group = state.config
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

    def _record(self, attempt: Attempt, error: SLSError | None, seconds: float) -> None:
        if error is None:
            self._store.on_success(attempt, at=self._wall_clock())
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
        """Cancel the jobs of a group about to be forgotten (their values stay pending)."""
        jobs = [job for (name, _), job in self._jobs.items() if name == group]
        for job in jobs:
            job.cancel()
        await asyncio.gather(*jobs, return_exceptions=True)

    # ------------------------------------------------------------------ wait and flush

    def _settle_waiters(self, key: ShardKey, attempt: Attempt, error: SLSError | None) -> None:
        waiters = self._waiters.get(key)
        if not waiters:
            return
        remaining: list[_Waiter] = []
        for waiter in waiters:
            outcome = self._outcome_for(key, waiter.seq, attempt, error)
            if waiter.future.done():
                continue
            if outcome is None:
                remaining.append(waiter)
            else:
                waiter.future.set_result(outcome)
        if remaining:
            self._waiters[key] = remaining
            if not self._closing:
                self.commit_now(group=key[0], shards=[key[1]])
        else:
            self._waiters.pop(key, None)

    def _outcome_for(
        self, key: ShardKey, seq: int, attempt: Attempt, error: SLSError | None
    ) -> CommitOutcome | None:
        fate = self._store.is_settled(key[0], key[1], seq)
        if fate == "committed":
            return CommitOutcome(ok=True)
        if fate == "dropped":
            code = error.code if error is not None else "CommitFailed"
            message = error.message if error is not None else "value was dropped"
            return CommitOutcome(ok=False, code=code, message=message, dropped=True)
        if error is not None and seq <= attempt.seq:
            return CommitOutcome(ok=False, code=error.code, message=error.message, dropped=False)
        return None  # a newer value than the job sent: commit again

    async def wait_for(self, group: str, shard: int, seq: int, timeout: float) -> CommitOutcome:
        """Commit `shard` now (joining a job in flight) until value `seq` or newer is committed."""
        outcome = self._immediate_outcome(group, shard, seq)
        if outcome is not None:
            return outcome
        future: asyncio.Future[CommitOutcome] = asyncio.get_running_loop().create_future()
        key = (group, shard)
        self._waiters[key].append(_Waiter(seq, future))
        if key not in self._jobs:
            self.commit_now(group=group, shards=[shard])
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=timeout)
        except TimeoutError:
            return TIMED_OUT
        finally:
            self._forget_waiter(key, future)

    def _immediate_outcome(self, group: str, shard: int, seq: int) -> CommitOutcome | None:
        fate = self._store.is_settled(group, shard, seq)
        if fate == "committed":
            return CommitOutcome(ok=True)
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
            return CommitOutcome(ok=False, code="ShuttingDown", message="closing")
        return None

    def _forget_waiter(self, key: ShardKey, future: asyncio.Future[CommitOutcome]) -> None:
        waiters = self._waiters.get(key)
        if waiters is None:
            return
        waiters[:] = [w for w in waiters if w.future is not future]
        if not waiters:
            self._waiters.pop(key, None)

    async def flush(self, *, group: str | None = None, timeout: float) -> FlushResult:
        """Commit everything pending now (retrying up to max_attempts) and report per shard."""
        pending = self._store.pending_seqs(group=group)
        if not pending:
            return FlushResult(committed=0)
        waits = {
            (g, shard): asyncio.ensure_future(self.wait_for(g, shard, seq, timeout))
            for g, shard, seq in pending
        }
        outcomes = dict(zip(waits, await asyncio.gather(*waits.values()), strict=True))
        committed = sum(1 for o in outcomes.values() if o.ok)
        failed = tuple(
            ShardFailure(g, shard, o.code, o.message, o.dropped)
            for (g, shard), o in sorted(outcomes.items())
            if not o.ok and o.code != "Timeout"
        )
        timed_out = any(o.code == "Timeout" for o in outcomes.values())
        return FlushResult(committed=committed, failed=failed, timed_out=timed_out)

    def _fail_all_waiters(self, outcome: CommitOutcome) -> None:
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.future.done():
                    waiter.future.set_result(outcome)
        self._waiters.clear()

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
        return len(self._jobs)

    @property
    def concurrency_limit(self) -> int:
        return self._limiter.current
