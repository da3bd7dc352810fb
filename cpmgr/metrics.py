"""Prometheus metrics on an injected registry; derived gauges are computed at scrape time."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import contextvars
import time
from collections.abc import AsyncGenerator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from cpmgr import __version__
from cpmgr.lag.model import GroupLag, ShardLag
from cpmgr.store import CheckpointStore

# From a millisecond (a loopback emulator) to tens of seconds (retries with backoff).
COMMIT_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)

# Why a socket connection was refused or closed (cpmgr_connections_refused_total{reason}).
REFUSAL_REASONS = ("max_connections", "idle_timeout", "max_buffered_bytes", "forbidden")


@dataclass(frozen=True, slots=True)
class GroupFigures:
    """One group's derived gauges, and its shards' times for http.shard_metrics."""

    pending: int
    oldest_dirty_since: float | None
    last_success: float | None
    shards: tuple[tuple[int, float | None, float | None], ...] = ()
    """(shard, dirty_since, committed_at), by shard."""


StoreFigures = dict[str, GroupFigures]

# A scrape being rendered off the loop reads these figures, captured on the loop beforehand.
_CAPTURED: contextvars.ContextVar[StoreFigures | None] = contextvars.ContextVar(
    "cpmgr_captured_store_figures", default=None
)
# Shards read per loop turn while capturing: a 100,000-shard store must not stall the loop.
CAPTURE_CHUNK = 2000


# prometheus_client's own formatting of an `le` bound (untyped there).
_format_bound: Callable[[float], str] = floatToGoString


class _Histogram:
    """One histogram child as plain numbers: a count per bucket (not cumulative) and a sum."""

    __slots__ = ("counts", "total")

    def __init__(self, buckets: int) -> None:
        self.counts = [0] * buckets
        self.total = 0.0


class CommitTally(Collector):
    """The figures every UpdateCheckPoint updates, kept as plain numbers and turned into
    families at scrape time: `cpmgr_commit_requests_total{group,code}`,
    `cpmgr_commit_request_duration_seconds{group}` and `cpmgr_commit_duration_seconds{group}`.

    Why not prometheus_client's Counter and Histogram: each update there takes a lock and a
    loop over the buckets, about 7 µs of the daemon's CPU per commit (5% of a whole
    UpdateCheckPoint); here a commit costs a dict lookup, a bisect and two additions. The
    exposition is the same (names, help, labels in the same order, `le` formatted alike)."""

    def __init__(self, bounds: tuple[float, ...] = COMMIT_BUCKETS) -> None:
        self._bounds = (*bounds, float("inf"))
        self._les = [_format_bound(bound) for bound in self._bounds]
        self.requests: dict[tuple[str, str], int] = {}
        self._request_durations: dict[str, _Histogram] = {}
        self._commit_durations: dict[str, _Histogram] = {}

    def add_group(self, group: str) -> None:
        """Create the group's series (at 0), so they exist before its first commit."""
        self.requests.setdefault((group, "OK"), 0)
        self._histogram(self._request_durations, group)
        self._histogram(self._commit_durations, group)

    def attempt_finished(self, group: str, code: str, seconds: float) -> None:
        key = (group, code)
        self.requests[key] = self.requests.get(key, 0) + 1
        self._observe(self._request_durations, group, seconds)

    def commit_finished(self, group: str, seconds: float) -> None:
        self._observe(self._commit_durations, group, seconds)

    def _observe(self, histograms: dict[str, _Histogram], group: str, seconds: float) -> None:
        histogram = histograms.get(group) or self._histogram(histograms, group)
        histogram.counts[bisect.bisect_left(self._bounds, seconds)] += 1
        histogram.total += seconds

    def _histogram(self, histograms: dict[str, _Histogram], group: str) -> _Histogram:
        histogram = histograms.get(group)
        if histogram is None:
            histogram = histograms[group] = _Histogram(len(self._bounds))
        return histogram

    def collect(self) -> Iterator[Metric]:
        yield self._histogram_family(
            "cpmgr_commit_duration_seconds", _COMMIT_DURATION_HELP, self._commit_durations
        )
        requests = CounterMetricFamily(
            "cpmgr_commit_requests", _COMMIT_REQUESTS_HELP, labels=("group", "code")
        )
        for (group, code), count in list(self.requests.items()):
            requests.add_metric((group, code), count)
        yield requests
        yield self._histogram_family(
            "cpmgr_commit_request_duration_seconds",
            _REQUEST_DURATION_HELP,
            self._request_durations,
        )

    def _histogram_family(
        self, name: str, help_text: str, histograms: dict[str, _Histogram]
    ) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, help_text, labels=("group",))
        for group, histogram in list(histograms.items()):
            cumulative, buckets = 0, []
            for le, count in zip(self._les, list(histogram.counts), strict=True):
                cumulative += count
                buckets.append((le, float(cumulative)))
            family.add_metric((group,), buckets, histogram.total)
        return family


_COMMIT_DURATION_HELP = "One commit from its first attempt to its final outcome, retries included."
_COMMIT_REQUESTS_HELP = "UpdateCheckPoint HTTP attempts by outcome (OK or the error code)."
_REQUEST_DURATION_HELP = "One UpdateCheckPoint HTTP attempt."


class StoreCollector(Collector):
    """Pending shards, oldest pending age and last success per group, read from the store.

    Read live when collected on the loop (tests, small stores). A /metrics scrape instead
    captures the figures in chunks with `capture()` and formats the text a chunk per part
    (`stream()`), so neither the reading of 100,000 shards nor the text holds the loop.
    """

    def __init__(
        self,
        store: CheckpointStore,
        groups: Callable[[], Iterable[str]],
        *,
        shard_metrics: bool = False,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._groups = groups
        self._shard_metrics = shard_metrics
        self._clock = clock

    async def capture(self) -> StoreFigures:
        """Every group's figures, read a chunk of shards per loop turn."""
        figures: StoreFigures = {}
        for group in list(self._groups()):
            figures[group] = await self._capture_group(group)
        return figures

    async def _capture_group(self, group: str) -> GroupFigures:
        store = self._store
        oldest: float | None = None
        dirty = store.dirty_shards(group)
        for start in range(0, len(dirty), CAPTURE_CHUNK):
            since = store.oldest_dirty_since(group, dirty[start : start + CAPTURE_CHUNK])
            if since is not None and (oldest is None or since < oldest):
                oldest = since
            await asyncio.sleep(0)
        shards: list[tuple[int, float | None, float | None]] = []
        if self._shard_metrics:
            numbers = store.shard_numbers(group)
            for start in range(0, len(numbers), CAPTURE_CHUNK):
                shards += store.shard_times(group, numbers[start : start + CAPTURE_CHUNK])
                await asyncio.sleep(0)
        return GroupFigures(
            pending=store.pending_count(group),
            oldest_dirty_since=oldest,
            last_success=store.last_success(group),
            shards=tuple(shards),
        )

    def _live(self) -> StoreFigures:
        store = self._store
        return {
            group: GroupFigures(
                pending=store.pending_count(group),
                oldest_dirty_since=store.oldest_dirty_since(group),
                last_success=store.last_success(group),
                shards=tuple(store.shard_times(group, store.shard_numbers(group)))
                if self._shard_metrics
                else (),
            )
            for group in self._groups()
        }

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
        figures = _CAPTURED.get()
        if figures is None:
            figures = self._live()
        pending = GaugeMetricFamily(
            "cpmgr_pending_shards",
            "Shards with an accepted, uncommitted checkpoint.",
            labels=["group"],
        )
        oldest = GaugeMetricFamily(
            "cpmgr_oldest_pending_age_seconds",
            "Longest time any shard has been continuously uncommitted, 0 if none.",
            labels=["group"],
        )
        last_success = GaugeMetricFamily(
            "cpmgr_last_success_timestamp_seconds",
            "Unix time of the last successful commit, 0 before the first.",
            labels=["group"],
        )
        for group, figure in figures.items():
            pending.add_metric([group], figure.pending)
            since = figure.oldest_dirty_since
            oldest.add_metric([group], max(0.0, now - since) if since is not None else 0.0)
            last_success.add_metric([group], figure.last_success or 0.0)
        yield from (pending, oldest, last_success)
        if self._shard_metrics and _CAPTURED.get() is None:
            yield from self._per_shard(figures, now)

    def _per_shard(self, figures: StoreFigures, now: float) -> Iterator[Metric]:
        age = GaugeMetricFamily(_AGE, _AGE_HELP, labels=["group", "shard"])
        committed = GaugeMetricFamily(_COMMITTED, _COMMITTED_HELP, labels=["group", "shard"])
        for group, figure in figures.items():
            for shard, since, committed_at in figure.shards:
                labels = [group, str(shard)]
                age.add_metric(labels, max(0.0, now - since) if since is not None else 0.0)
                committed.add_metric(labels, committed_at or 0.0)
        yield from (age, committed)

    async def render(self, registry: CollectorRegistry) -> bytes:
        """The whole /metrics text (see `stream`)."""
        return b"".join([part async for part in self.stream(registry)])

    async def stream(self, registry: CollectorRegistry) -> AsyncGenerator[bytes, None]:
        """A /metrics scrape in parts that never hold the loop for long: the store is read a
        chunk of shards per loop turn, the registry (a few hundred series) is rendered at
        once, and the per-shard series (http.shard_metrics) are formatted a chunk per part,
        so that at 100,000 shards neither formatting nor joining nor sending 15 MB happens in
        one go."""
        figures = await self.capture()
        token = _CAPTURED.set(figures)
        try:
            head = generate_latest(_WithoutCreated(registry))
        finally:
            _CAPTURED.reset(token)
        yield head
        if not self._shard_metrics:
            return
        now = self._clock()
        for name, kind in ((_AGE, "age"), (_COMMITTED, "committed")):
            help_text = _AGE_HELP if kind == "age" else _COMMITTED_HELP
            yield f"# HELP {name} {help_text}\n# TYPE {name} gauge\n".encode()
            for group, figure in figures.items():
                label = _escape_label(group)
                for start in range(0, len(figure.shards), CAPTURE_CHUNK):
                    rows = figure.shards[start : start + CAPTURE_CHUNK]
                    yield _shard_lines(name, label, rows, kind, now)
                    await asyncio.sleep(0)


class _WithoutCreated:
    """The registry's families without their `*_created` samples: a creation time per
    counter and histogram child doubles the series and no dashboard or rule of ours reads it.
    (prometheus_client's own switch for this is process-wide; this view is per registry.)"""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


_AGE = "cpmgr_shard_pending_age_seconds"
_AGE_HELP = "How long this shard has been uncommitted, 0 if clean (http.shard_metrics)."
_COMMITTED = "cpmgr_shard_last_commit_timestamp_seconds"
_COMMITTED_HELP = "Unix time of this shard's last successful commit (http.shard_metrics)."


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _shard_lines(
    name: str,
    group_label: str,
    rows: tuple[tuple[int, float | None, float | None], ...],
    kind: str,
    now: float,
) -> bytes:
    prefix = f'{name}{{group="{group_label}",shard="'
    if kind == "age":
        values = [max(0.0, now - since) if since is not None else 0.0 for _, since, _c in rows]
    else:
        values = [committed_at or 0.0 for _, _s, committed_at in rows]
    lines = [f'{prefix}{row[0]}"}} {value!r}\n' for row, value in zip(rows, values, strict=True)]
    return "".join(lines).encode()


# How late the probe may wake, from "unnoticeable" to "the loop was frozen".
LOOP_LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class LoopLagProbe:
    """A task that sleeps `interval` again and again and records how late it wakes: every
    stall of the event loop (a long callback, blocking I/O) shows in the histogram."""

    def __init__(self, histogram: Histogram, *, interval: float = 0.02) -> None:
        self._histogram = histogram
        self._interval = interval
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="cpmgr-loop-lag-probe")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self._interval)
            self._histogram.observe(max(0.0, loop.time() - before - self._interval))


# Per membership group: (members, held shards, wall time of the newest successful heartbeat).
MemberFigures = tuple[int, int, float | None]


class MembershipCollector(Collector):
    """cpmgr_members, cpmgr_held_shards and cpmgr_last_heartbeat_timestamp_seconds."""

    def __init__(self, figures: Callable[[], Mapping[str, MemberFigures]]) -> None:
        self._figures = figures

    def collect(self) -> Iterator[Metric]:
        members = GaugeMetricFamily(
            "cpmgr_members", "Members joined through this daemon.", labels=["group"]
        )
        held = GaugeMetricFamily(
            "cpmgr_held_shards", "Shards held (or being released) by its members.", labels=["group"]
        )
        last = GaugeMetricFamily(
            "cpmgr_last_heartbeat_timestamp_seconds",
            "When a member's heartbeat last succeeded (unix time).",
            labels=["group"],
        )
        for group, (count, shards, newest) in sorted(self._figures().items()):
            members.add_metric([group], count)
            held.add_metric([group], shards)
            if newest is not None:
                last.add_metric([group], newest)
        yield from (members, held, last)


class CredentialsCollector(Collector):
    """When the current keys expire, and each membership group's timeout (the shipped alert
    compares the two: expired keys stop heartbeats)."""

    def __init__(
        self,
        expiry: Callable[[], float | None],
        timeouts: Callable[[], Mapping[str, int]],
    ) -> None:
        self._expiry = expiry
        self._timeouts = timeouts

    def collect(self) -> Iterator[Metric]:
        expiry = GaugeMetricFamily(
            "cpmgr_credentials_expiry_timestamp_seconds",
            "When the current keys expire (unix time); 0 for keys that never expire or none yet.",
        )
        expiry.add_metric([], self._expiry() or 0.0)
        timeout = GaugeMetricFamily(
            "cpmgr_membership_timeout_seconds",
            "The SLS consumer-group timeout of each membership group.",
            labels=["group"],
        )
        for group, seconds in sorted(self._timeouts().items()):
            timeout.add_metric([group], seconds)
        yield from (expiry, timeout)


LagReadings = Callable[[], Mapping[str, GroupLag]]
_SHARD_LAG = (
    (
        "cpmgr_shard_lag_log_groups",
        "Log groups this shard's checkpoint at SLS is behind its end (http.shard_metrics).",
    ),
    (
        "cpmgr_shard_lag_seconds",
        "Receive time of this shard's newest log group minus the last consumed one's.",
    ),
    ("cpmgr_shard_stalled", "1 if this shard is stalled (http.shard_metrics)."),
)


class LagCollector(Collector):
    """cpmgr_consumer_lag_log_groups, cpmgr_consumer_lag_seconds and cpmgr_stalled_shards per
    group, from the lag reader's latest readings; per shard with http.shard_metrics.

    A streamed /metrics scrape gets the per-shard series from `stream_shards()`, a chunk of
    shards per part; a plain collection (tests) gets them from `collect()`.
    """

    def __init__(self, readings: LagReadings, *, shard_metrics: bool = False) -> None:
        self._readings = readings
        self._shard_metrics = shard_metrics

    def collect(self) -> Iterator[Metric]:
        readings = self._readings()
        log_groups = GaugeMetricFamily(
            "cpmgr_consumer_lag_log_groups",
            "Log groups the group's checkpoints at SLS are behind the shards' ends (sum).",
            labels=["group"],
        )
        seconds = GaugeMetricFamily(
            "cpmgr_consumer_lag_seconds",
            "Receive time of the newest log group minus the last consumed one's (max over shards).",
            labels=["group"],
        )
        stalled = GaugeMetricFamily(
            "cpmgr_stalled_shards",
            "Shards behind whose checkpoint at SLS has not moved for lag.stall_after.",
            labels=["group"],
        )
        lagging = GaugeMetricFamily(
            "cpmgr_lagging_shards",
            "Shards more than lag.lagging_after behind (and not stalled).",
            labels=["group"],
        )
        for group, reading in sorted(readings.items()):
            log_groups.add_metric([group], reading.log_groups)
            seconds.add_metric([group], reading.seconds)
            stalled.add_metric([group], reading.stalled)
            lagging.add_metric([group], reading.lagging)
        yield from (log_groups, seconds, stalled, lagging)
        if self._shard_metrics and _CAPTURED.get() is None:
            yield from self._per_shard(readings)

    def _per_shard(self, readings: Mapping[str, GroupLag]) -> Iterator[Metric]:
        families = [GaugeMetricFamily(n, h, labels=["group", "shard"]) for n, h in _SHARD_LAG]
        for group, reading in sorted(readings.items()):
            for shard, lag in sorted(reading.shards.items()):
                labels = [group, str(shard)]
                for family, value in zip(families, _shard_values(lag), strict=True):
                    family.add_metric(labels, value)
        yield from families

    async def stream_shards(self) -> AsyncGenerator[bytes, None]:
        """The per-shard series as exposition text, CAPTURE_CHUNK shards per part."""
        if not self._shard_metrics:
            return
        readings = sorted(self._readings().items())
        for index, (name, help_text) in enumerate(_SHARD_LAG):
            yield f"# HELP {name} {help_text}\n# TYPE {name} gauge\n".encode()
            for group, reading in readings:
                prefix = f'{name}{{group="{_escape_label(group)}",shard="'
                # In reading order, not sorted: sorting 100,000 shards would hold the loop.
                shards = list(reading.shards.values())
                for start in range(0, len(shards), CAPTURE_CHUNK):
                    rows = shards[start : start + CAPTURE_CHUNK]
                    text = "".join(
                        f'{prefix}{lag.shard}"}} {_shard_values(lag)[index]!r}\n' for lag in rows
                    )
                    yield text.encode()
                    await asyncio.sleep(0)


def _shard_values(lag: ShardLag) -> tuple[float, float, float]:
    return float(lag.log_groups), float(lag.seconds), 1.0 if lag.state == "stalled" else 0.0


class Metrics:
    """Every cpmgr metric, registered on `registry`; also the committer's observer."""

    def __init__(self, registry: CollectorRegistry, *, process_metrics: bool = True) -> None:
        self.registry = registry
        # The commit-request counter and both commit histograms (one update per commit).
        self.commits = CommitTally()
        registry.register(self.commits)
        self.commit_failures = Counter(
            "cpmgr_commit_failures",
            "Commits that ended without success (dropped or retries exhausted).",
            ["group", "code"],
            registry=registry,
        )
        self.received = Counter(
            "cpmgr_checkpoints_received",
            "Checkpoints accepted over the socket (a batch counts each).",
            ["group"],
            registry=registry,
        )
        self.retries = Counter(
            "cpmgr_commit_retries",
            "UpdateCheckPoint attempts after the first for the same commit.",
            ["group"],
            registry=registry,
        )
        self.cycle_duration = Histogram(
            "cpmgr_commit_cycle_duration_seconds",
            "A timed commit cycle, from snapshot until its last shard's outcome.",
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.concurrency = Gauge(
            "cpmgr_commit_concurrency_limit",
            "Current limit on concurrent UpdateCheckPoint requests (lowered when throttled).",
            registry=registry,
        )
        self.connections = Gauge(
            "cpmgr_socket_connections",
            "Open consumer connections on the Unix socket.",
            registry=registry,
        )
        self.connections_total = Counter(
            "cpmgr_socket_accepted_connections",
            "Consumer connections accepted on the Unix socket.",
            registry=registry,
        )
        self.socket_errors = Counter(
            "cpmgr_socket_request_errors",
            "Socket requests answered with an error, by protocol error code.",
            ["code"],
            registry=registry,
        )
        self.connections_refused = Counter(
            "cpmgr_connections_refused",
            "Socket connections refused or closed by a limit, by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSAL_REASONS:
            self.connections_refused.labels(reason)
        self.loop_lag = Histogram(
            "cpmgr_event_loop_lag_seconds",
            "How late a probe task wakes on the event loop: every stall of the loop shows here.",
            buckets=LOOP_LAG_BUCKETS,
            registry=registry,
        )
        self.journal_errors = Counter(
            "cpmgr_journal_errors",
            "Commits refused because the journal could not persist them.",
            registry=registry,
        )
        self.heartbeat_requests = Counter(
            "cpmgr_heartbeat_requests",
            "ConsumerGroupHeartBeat requests sent for members, by outcome (OK or the error code).",
            ["group", "code"],
            registry=registry,
        )
        self.handoffs = Counter(
            "cpmgr_shard_handoffs",
            "Shards that left a member (rebalance, shutdown, deadline, disconnect, ended, lost).",
            ["group", "reason"],
            registry=registry,
        )
        self.handoff_duration = Histogram(
            "cpmgr_handoff_duration_seconds",
            "From a shard's revoked event to the shard leaving its member's heartbeat.",
            ["group"],
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.credentials_refresh = Counter(
            "cpmgr_credentials_refresh",
            "Attempts to get keys from the credentials source, by source and result.",
            ["source", "result"],
            registry=registry,
        )
        self.lag_read_failures = Counter(
            "cpmgr_lag_read_failures",
            "Failed SLS requests of lag readings, by error code (commits are not affected).",
            ["group", "code"],
            registry=registry,
        )
        Info("cpmgr_build", "cpmgr build information.", registry=registry).info(
            {"version": __version__}
        )
        self._received_by_group: dict[str, Counter] = {}
        if process_metrics:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)

    def add_groups(self, groups: Iterable[str]) -> None:
        """Create every per-group series, so they exist (at 0) from the start."""
        for group in groups:
            self.commits.add_group(group)
            self.received.labels(group)
            self.retries.labels(group)

    def watch_store(
        self,
        store: CheckpointStore,
        groups: Callable[[], Iterable[str]],
        *,
        shard_metrics: bool = False,
    ) -> StoreCollector:
        collector = StoreCollector(store, groups, shard_metrics=shard_metrics)
        self.registry.register(collector)
        return collector

    # ---------------------------------------------------------------- the committer's observer

    def attempt_finished(self, group: str, code: str, seconds: float) -> None:
        self.commits.attempt_finished(group, code, seconds)

    def retried(self, group: str) -> None:
        self.retries.labels(group).inc()

    def commit_finished(self, group: str, code: str, seconds: float, *, ok: bool) -> None:
        self.commits.commit_finished(group, seconds)
        if not ok:
            self.commit_failures.labels(group, code).inc()

    def cycle_finished(self, seconds: float, shards: int) -> None:
        self.cycle_duration.observe(seconds)

    def value_dropped(self, group: str, code: str) -> None:
        self.commit_failures.labels(group, code).inc()

    # ---------------------------------------------------------------- membership's observer

    def heartbeat_finished(self, group: str, code: str, wall_time: float) -> None:
        self.heartbeat_requests.labels(group, code).inc()

    def handoff_finished(self, group: str, reason: str, seconds: float | None) -> None:
        self.handoffs.labels(group, reason).inc()
        if seconds is not None:
            self.handoff_duration.labels(group).observe(seconds)

    def watch_membership(self, figures: Callable[[], Mapping[str, MemberFigures]]) -> None:
        """Members, held shards and the last heartbeat per group, read at scrape time."""
        self.registry.register(MembershipCollector(figures))

    def watch_credentials(
        self, expiry: Callable[[], float | None], timeouts: Callable[[], Mapping[str, int]]
    ) -> None:
        """The keys' expiry and the membership timeouts, read at scrape time."""
        self.registry.register(CredentialsCollector(expiry, timeouts))

    def credentials_refreshed(self, source: str, result: str) -> None:
        self.credentials_refresh.labels(source, result).inc()

    def watch_lag(self, readings: LagReadings, *, shard_metrics: bool = False) -> LagCollector:
        """Lag per group (and per shard), read from the lag reader at scrape time."""
        collector = LagCollector(readings, shard_metrics=shard_metrics)
        self.registry.register(collector)
        return collector

    # ---------------------------------------------------------------- the lag reader's observer

    def lag_read_failed(self, group: str, code: str) -> None:
        self.lag_read_failures.labels(group, code).inc()

    def concurrency_changed(self, limit: int) -> None:
        self.concurrency.set(limit)

    # ---------------------------------------------------------------- the socket side

    def checkpoints_received(self, group: str, count: int = 1) -> None:
        # On the per-line hot path: skip labels()'s validation and lock after the first time.
        child = self._received_by_group.get(group)
        if child is None:
            child = self._received_by_group[group] = self.received.labels(group)
        child.inc(count)

    def connection_opened(self) -> None:
        self.connections.inc()
        self.connections_total.inc()

    def connection_closed(self) -> None:
        self.connections.dec()

    def connection_refused(self, reason: str) -> None:
        self.connections_refused.labels(reason).inc()

    def request_error(self, code: str) -> None:
        self.socket_errors.labels(code).inc()
        if code == "JournalError":
            self.journal_errors.inc()
