"""Prometheus metrics on an injected registry; derived gauges are computed at scrape time."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from cpmgr import __version__
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


class StoreCollector(Collector):
    """Pending shards, oldest pending age and last success per group, read from the store."""

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

    def collect(self) -> Iterator[Metric]:
        now = self._clock()
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
        for group in self._groups():
            pending.add_metric([group], self._store.pending_count(group))
            since = self._store.oldest_dirty_since(group)
            oldest.add_metric([group], max(0.0, now - since) if since is not None else 0.0)
            last_success.add_metric([group], self._store.last_success(group) or 0.0)
        yield from (pending, oldest, last_success)
        if self._shard_metrics:
            yield from self._per_shard(now)

    def _per_shard(self, now: float) -> Iterator[Metric]:
        age = GaugeMetricFamily(
            "cpmgr_shard_pending_age_seconds",
            "How long this shard has been uncommitted, 0 if clean (http.shard_metrics).",
            labels=["group", "shard"],
        )
        committed = GaugeMetricFamily(
            "cpmgr_shard_last_commit_timestamp_seconds",
            "Unix time of this shard's last successful commit (http.shard_metrics).",
            labels=["group", "shard"],
        )
        for group in self._groups():
            for view in self._store.shard_views(group):
                labels = [group, str(view.shard)]
                since = view.dirty_since
                age.add_metric(labels, max(0.0, now - since) if since is not None else 0.0)
                committed.add_metric(labels, view.committed_at or 0.0)
        yield from (age, committed)


class Metrics:
    """Every cpmgr metric, registered on `registry`; also the committer's observer."""

    def __init__(self, registry: CollectorRegistry, *, process_metrics: bool = True) -> None:
        self.registry = registry
        self.commit_duration = Histogram(
            "cpmgr_commit_duration_seconds",
            "One commit from its first attempt to its final outcome, retries included.",
            ["group"],
            buckets=COMMIT_BUCKETS,
            registry=registry,
        )
        self.commit_requests = Counter(
            "cpmgr_commit_requests",
            "UpdateCheckPoint HTTP attempts by outcome (OK or the error code).",
            ["group", "code"],
            registry=registry,
        )
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
        self.request_duration = Histogram(
            "cpmgr_commit_request_duration_seconds",
            "One UpdateCheckPoint HTTP attempt.",
            ["group"],
            buckets=COMMIT_BUCKETS,
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
        self.journal_errors = Counter(
            "cpmgr_journal_errors",
            "Commits refused because the journal could not persist them.",
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
            self.commit_duration.labels(group)
            self.request_duration.labels(group)
            self.commit_requests.labels(group, "OK")
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
        self.commit_requests.labels(group, code).inc()
        self.request_duration.labels(group).observe(seconds)

    def retried(self, group: str) -> None:
        self.retries.labels(group).inc()

    def commit_finished(self, group: str, code: str, seconds: float, *, ok: bool) -> None:
        self.commit_duration.labels(group).observe(seconds)
        if not ok:
            self.commit_failures.labels(group, code).inc()

    def cycle_finished(self, seconds: float, shards: int) -> None:
        self.cycle_duration.observe(seconds)

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
