"""The composition root: build every component, start them in order, stop them in reverse.

Only this module creates long-lived tasks and knows about signals. Signal handlers only
record what happened; the run loop does the work (drain on SIGTERM/SIGINT, exit at once on
a second one, reload on SIGHUP).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from cpmgr import __version__
from cpmgr.committer import Committer
from cpmgr.config import Config, GroupConfig, load_config
from cpmgr.errors import ConfigError, CpmgrError, SLSError
from cpmgr.gcpolicy import freeze_startup
from cpmgr.ingest import IngestServer
from cpmgr.journal import Journal
from cpmgr.lag import LAG_CONCURRENCY, LagReader
from cpmgr.logs import configure_logging
from cpmgr.membership import Membership
from cpmgr.metrics import LoopLagProbe, Metrics
from cpmgr.notify import notify
from cpmgr.sls.client import SLSClient
from cpmgr.sls.credentials.refresher import CredentialsRefresher
from cpmgr.store import CheckpointStore
from cpmgr.web import WebServer, build_app

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LEFT_BEHIND = 1
# After the drain, requests still being handled get this long to send the answer they already
# have (a `wait` whose value the final flush committed); the rest are answered ShuttingDown.
CLOSE_GRACE = 1.0
# Shards named one per line in the shutdown report, per group; the rest are counted in one line
# (a 100,000-shard backlog must not turn the report into minutes of logging).
LEFT_BEHIND_LINES = 100
# Requests membership may have open at once (heartbeats, GetCheckPoint, GetCursor).
MEMBERSHIP_CONNECTIONS = 8

ShutdownTrigger = Callable[[], Awaitable[object]]

# Settings read once at startup by components that cannot swap them live.
_RESTART_ONLY: tuple[tuple[str, Callable[[Config], object]], ...] = (
    ("socket.*", lambda c: c.socket),
    ("http.*", lambda c: c.http),
    ("state.*", lambda c: c.state),
    ("sls.endpoint", lambda c: c.sls.endpoint),
    ("sls.signature_version", lambda c: c.sls.signature_version),
    ("sls.region", lambda c: c.sls.region),
    ("commit.request_timeout", lambda c: c.commit.request_timeout),
)


@contextlib.contextmanager
def _startup_step(what: str) -> Iterator[None]:
    """Report an OSError of a startup step as one CpmgrError line naming the step."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.filename:
            reason = f"{reason}: {exc.filename}"
        raise CpmgrError(f"{what}: {reason}") from exc


class Daemon:
    """Every component of a running cpmgr, and the order they start and stop in."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | Path | None = None,
        registry: CollectorRegistry | None = None,
        process_metrics: bool = True,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.registry = registry if registry is not None else CollectorRegistry()
        self.metrics = Metrics(self.registry, process_metrics=process_metrics)
        self.store = CheckpointStore([g.name for g in config.groups])
        self.metrics.add_groups(self.store.groups())
        self.store_collector = self.metrics.watch_store(
            self.store, self.store.groups, shard_metrics=config.http.shard_metrics
        )
        self.loop_lag = LoopLagProbe(self.metrics.loop_lag)
        self.credentials = CredentialsRefresher(config.sls, observer=self.metrics)
        self.metrics.watch_credentials(
            lambda: self.credentials.expires_at, self._membership_timeouts
        )
        self.client = SLSClient(
            endpoint=config.sls.endpoint,
            credentials=self.credentials,
            signature_version=config.sls.signature_version,
            region=config.sls.region,
            request_timeout=config.commit.request_timeout,
            connection_limit=config.commit.max_in_flight,
        )
        self.committer = Committer(
            config=config,
            store=self.store,
            client=self.client,
            observer=self.metrics,
            on_credentials_error=self.credentials.invalidate,
            on_committed=self._committed,
            on_dropped=self._journal_dropped,
            on_refused=self._member_refused,
        )
        self.member_clients, self.membership = self._membership(config)
        # Lag has a client of its own too: its reads never queue behind commits or heartbeats.
        self.lag_client = SLSClient(
            endpoint=config.sls.endpoint,
            credentials=self.credentials,
            signature_version=config.sls.signature_version,
            region=config.sls.region,
            request_timeout=config.commit.request_timeout,
            connection_limit=LAG_CONCURRENCY,
        )
        self.lag = LagReader(
            config=config,
            api=self.lag_client,
            observer=self.metrics,
            on_credentials_error=self.credentials.invalidate,
        )
        self.lag_collector = self.metrics.watch_lag(
            self.lag.readings, shard_metrics=config.http.shard_metrics
        )
        self.journal = (
            Journal(
                config.state.dir,
                fsync=config.state.fsync,
                fsync_interval=config.state.fsync_interval,
            )
            if config.state.dir
            else None
        )
        self.ingest = IngestServer(
            config=config,
            store=self.store,
            committer=self.committer,
            journal=self.journal,
            metrics=self.metrics,
            status=self.status,
            membership=self.membership,
            lag=self._shard_lag,
        )
        self.web = (
            WebServer(
                config.http.listen,
                build_app(
                    status=self.status,
                    ready=self._ready_for_probes,
                    render=self._render_metrics,
                ),
            )
            if config.http.listen
            else None
        )
        self.ready = False
        self.shutting_down = False
        self.dropped = 0  # accepted values given up after a permanent failure, for the exit log
        self._started_at = time.monotonic()
        self._started: list[Callable[[], Awaitable[None]]] = []
        self._close_grace = CLOSE_GRACE
        # Removed by a reload but still known to the committer until their final flush.
        self._retiring_groups: dict[str, GroupConfig] = {}
        self._retiring: set[asyncio.Task[None]] = set()

    def _membership(self, config: Config) -> tuple[list[SLSClient], Membership | None]:
        """Membership and its own SLS clients: one for heartbeats alone, so they never queue
        behind commits or behind the reads of a big acquisition; one for those reads."""
        settings = [g.membership for g in config.groups if g.membership is not None]
        if not settings:
            return [], None
        shortest = min(m.heartbeat_interval for m in settings)
        timeouts = (min(config.commit.request_timeout, shortest), config.commit.request_timeout)
        heartbeats, reads = (
            SLSClient(
                endpoint=config.sls.endpoint,
                credentials=self.credentials,
                signature_version=config.sls.signature_version,
                region=config.sls.region,
                request_timeout=timeout,
                connection_limit=MEMBERSHIP_CONNECTIONS,
            )
            for timeout in timeouts
        )
        membership = Membership(
            config=config,
            store=self.store,
            committer=self.committer,
            api=heartbeats,
            reads=reads,
            observer=self.metrics,
        )
        self.metrics.watch_membership(membership.figures)
        return [heartbeats, reads], membership

    def _membership_timeouts(self) -> dict[str, int]:
        return {g.name: g.membership.timeout for g in self.config.groups if g.membership}

    def _member_refused(
        self, group: str, shard: int, consumer: str | None, error: SLSError
    ) -> None:
        if self.membership is not None:
            self.membership.on_refused(group, shard, consumer, error)

    def _ready_for_probes(self) -> bool:
        """/readyz: started, not draining, the journal (if any) can write, and every member
        had a successful heartbeat within half its timeout."""
        return (
            self.ready
            and (self.journal is None or self.journal.writable)
            and (self.membership is None or self.membership.healthy())
        )

    async def _render_metrics(self) -> AsyncGenerator[bytes, None]:
        async for part in self.store_collector.stream(self.registry):
            yield part
        async for part in self.lag_collector.stream_shards():
            yield part

    def _shard_lag(self, group: str, shard: int) -> dict[str, object] | None:
        lag = self.lag.shard(group, shard)
        return lag.fields() if lag is not None else None

    def _committed(self, group: str, shard: int, checkpoint: str) -> None:
        if self.journal is not None:
            self.journal.record_committed(group, shard, checkpoint)
        if self.membership is not None:
            self.membership.on_committed(group, shard, checkpoint)  # a read-only shard may end

    def _journal_dropped(self, group: str, shard: int, checkpoint: str) -> None:
        self.dropped += 1
        if self.journal is not None:
            self.journal.record_dropped(group, shard, checkpoint)

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Start in order: loop-lag probe, HTTP (not ready), journal replay, client, committer,
        socket."""
        await self.loop_lag.start()
        self._started.append(self.loop_lag.close)
        if self.web is not None:
            with _startup_step(f"HTTP {self.config.http.listen}"):
                await self.web.start()
            self._started.append(self.web.close)
        if self.journal is not None:
            self._restore(self.journal)
            await self.journal.start()
            self._started.append(self.journal.close)
        await self.credentials.start()
        self._started.append(self.credentials.close)
        await self.client.start()
        self._started.append(self.client.close)
        await self.committer.start()
        self._started.append(self.committer.close)
        for member_client in self.member_clients:
            await member_client.start()
            self._started.append(member_client.close)
        await self.lag_client.start()
        self._started.append(self.lag_client.close)
        await self.lag.start()
        self._started.append(self.lag.close)
        with _startup_step(f"socket {self.config.socket.path}"):
            await self.ingest.start()
        self._started.append(self._close_ingest)
        if self.membership is not None:
            # Stopped before the socket closes: closing connections must not start handoffs.
            self._started.append(self.membership.close)
        self.ready = True
        log.info(
            "cpmgr %s ready: socket %s, %d group(s), commit interval %gs, credentials %s",
            __version__,
            self.config.socket.path,
            len(self.config.groups),
            self.config.commit.interval,
            self.credentials.describe(),
        )

    def _restore(self, journal: Journal) -> None:
        records = journal.open()
        configured = set(self.store.groups())
        for record in records:
            if record.group in configured:
                self.store.restore(
                    record.group,
                    record.shard,
                    record.latest,
                    consumer=record.consumer,
                    committed=record.committed,
                )
            elif record.latest != record.committed:
                log.warning(
                    "journal: group %s is no longer configured; its shard %d checkpoint %s "
                    "stays in the journal uncommitted (configure the group again to commit it)",
                    record.group,
                    record.shard,
                    record.latest,
                )
        pending = sum(self.store.pending_count(g) for g in self.store.groups())
        log.info(
            "journal replayed from %s: %d shard(s), %d pending",
            self.config.state.dir,
            len(records),
            pending,
        )

    async def drain(self) -> int:
        """Stop accepting, flush within shutdown_timeout, report leftovers; the exit code."""
        self.shutting_down = True
        self.ready = False
        self.ingest.stop_accepting()
        timeout = self.config.commit.shutdown_timeout
        started = time.monotonic()
        try:
            if self.membership is not None:
                await self._hand_over_for_shutdown(self.membership, timeout)
            log.info("shutting down: flushing pending checkpoints (up to %gs)", timeout)
            deadline = started + timeout
            if self.membership is not None:
                deadline -= self.config.commit.request_timeout  # the empty heartbeats follow
            await self._flush_until(deadline)
        except Exception:
            log.exception("final flush failed")
        if self.membership is not None:
            await self.membership.close()  # every member's empty heartbeat, after the flush
        return self.report_left_behind()

    async def _hand_over_for_shutdown(self, membership: Membership, timeout: float) -> None:
        """Revoke every member's shards and wait for their releases (or deadlines)."""
        longest = membership.revoke_all(timeout)
        if longest:
            log.info("shutting down: members release their shards (up to %gs)", longest)
            deadline = time.monotonic() + longest + self.config.commit.request_timeout
            await membership.wait_released(deadline)

    async def _flush_until(self, deadline: float, *, group: str | None = None) -> None:
        """Flush again while retryable failures leave values pending and time remains: a
        short outage at shutdown should cost retries, not checkpoints."""
        while (remaining := deadline - time.monotonic()) > 0:
            result = await self.committer.flush(group=group, timeout=remaining)
            if result.ok or result.timed_out or all(f.dropped for f in result.failed):
                return

    def report_left_behind(self) -> int:
        """Log every accepted checkpoint not committed; the exit code that follows from it."""
        left = self._log_left_behind(self.store.groups())
        if not left and not self.dropped:
            log.info("every accepted checkpoint is committed")
        elif not left:
            # Nothing is pending, but a permanent failure gave values up (logged when it
            # happened): saying "every checkpoint is committed" would hide that.
            log.warning(
                "nothing is left pending, but %d accepted checkpoint(s) were dropped after a "
                "permanent failure (see the errors above and cpmgr_commit_failures_total)",
                self.dropped,
            )
        if not left:
            return EXIT_OK
        return EXIT_OK if self.journal is not None else EXIT_LEFT_BEHIND

    def _log_left_behind(self, groups: Iterable[str]) -> int:
        """Log the shards still pending, at most LEFT_BEHIND_LINES per group; how many."""
        journaled = ", journaled" if self.journal is not None else ""
        total = 0
        for group in groups:
            shards = self.store.dirty_shards(group)
            total += len(shards)
            for shard in shards[:LEFT_BEHIND_LINES]:
                self._log_left_behind_shard(group, shard, journaled)
            if len(shards) > LEFT_BEHIND_LINES:
                log.error(
                    "left behind: group %s, %d more shard(s) not listed%s",
                    group,
                    len(shards) - LEFT_BEHIND_LINES,
                    journaled,
                )
        return total

    def _log_left_behind_shard(self, group: str, shard: int, journaled: str) -> None:
        view = self.store.shard_view(group, shard)
        if view is None or view.pending is None:
            return
        error = view.last_error
        log.error(
            "left behind: group %s shard %d checkpoint %s (last error: %s)%s",
            view.group,
            view.shard,
            view.pending,
            f"{error.code}: {error.message}" if error else "none",
            journaled,
        )

    async def close(self, *, grace: float = CLOSE_GRACE) -> None:
        """Stop every started component in reverse order (idempotent); requests still being
        handled get `grace` seconds to be answered."""
        self.ready = False
        self._close_grace = grace
        for task in self._retiring:
            task.cancel()
        while self._started:
            closer = self._started.pop()
            try:
                await closer()
            except Exception:
                log.exception("error while stopping %s", closer)

    async def _close_ingest(self) -> None:
        # The committer stops first (its close is idempotent): once the drain is over, a `wait`
        # still pending can only end ShuttingDown, and answering it now lets its connection
        # close at once instead of using up the grace period.
        await self.committer.close()
        await self.ingest.close(grace=self._close_grace)

    # ------------------------------------------------------------------ reload

    def reload(self) -> bool:
        """Re-read the config file; swap in what can change live. False if it was refused."""
        if self.config_path is None:
            log.warning("SIGHUP ignored: the daemon was not started from a config file")
            return False
        try:
            fresh = load_config(self.config_path)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload refused, keeping the running config: %s", problem)
            return False
        return self._apply(fresh)

    def _apply(self, fresh: Config) -> bool:
        old = self.config
        refused = _membership_changes(old, fresh)
        if refused:
            for problem in refused:
                log.error("reload refused, keeping the running config: %s", problem)
            return False
        for setting, read in _RESTART_ONLY:
            if read(old) != read(fresh):
                log.warning("reload: %s changed; it takes effect after a restart", setting)
        removed = [g for g in old.groups if fresh.group(g.name) is None]
        for group in fresh.groups:
            self._retiring_groups.pop(group.name, None)
            self.store.add_group(group.name)
        self._retiring_groups.update((g.name, g) for g in removed)
        self.metrics.add_groups(self.store.groups())
        if self.membership is not None:
            self.membership.apply_config(fresh)
        self.credentials.update(fresh.sls)
        configure_logging(fresh.log.level, fresh.log.format)
        self.config = fresh
        self.committer.apply_config(self._committer_config())
        self.ingest.apply_config(fresh)
        self.lag.apply_config(fresh)
        for group in removed:
            self._retire_group(group.name)
        log.info("config reloaded: %d group(s)", len(fresh.groups))
        return True

    def _committer_config(self) -> Config:
        """The running config plus the removed groups whose final flush is still going on."""
        retiring = tuple(self._retiring_groups.values())
        return replace(self.config, groups=self.config.groups + retiring)

    def _retire_group(self, name: str) -> None:
        """A removed group: flush it (in the background), report what could not be
        committed, then forget it. Consumers get UnknownGroup for it at once."""

        async def retire() -> None:
            deadline = time.monotonic() + self.config.commit.shutdown_timeout
            await self._flush_until(deadline, group=name)
            if self._retiring_groups.pop(name, None) is None:
                return  # configured again meanwhile: keep its shards
            # A job still retrying must end before the group is forgotten: were the group
            # configured again, a second job for the same shard could start beside it.
            await self.committer.abandon(name)
            if self._log_left_behind([name]):
                log.error("removed group %s: not every shard could be committed", name)
            self.store.remove_group(name)
            self.committer.apply_config(self._committer_config())

        task = asyncio.create_task(retire(), name=f"retire-{name}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        """The `status` answer (also /status): never any secret."""
        return {
            "ok": True,
            "version": __version__,
            "uptime_seconds": round(time.monotonic() - self._started_at, 3),
            "ready": self.ready,
            "shutting_down": self.shutting_down,
            "credentials": self.credentials.status(),
            "groups": {name: self._group_status(name) for name in self.store.groups()},
        }

    def _group_status(self, name: str) -> dict[str, object]:
        status = self.store.group_status(name)
        reading = self.lag.reading(name)
        status["lag"] = reading.fields() if reading is not None else None
        if self.membership is not None and name in self.membership.groups:
            members, held, last = self.membership.figures().get(name, (0, 0, None))
            status["membership"] = {"members": members, "held_shards": held, "last_heartbeat": last}
        return status


def _membership_changes(old: Config, fresh: Config) -> list[str]:
    """What a reload may not do: add or remove a membership block (or such a group)."""
    problems = []
    names = {g.name for g in old.groups} | {g.name for g in fresh.groups}
    for name in sorted(names):
        before, after = old.group(name), fresh.group(name)
        had = before is not None and before.membership is not None
        has = after is not None and after.membership is not None
        if had != has:
            problems.append(f"group {name}: adding or removing membership needs a restart")
    return problems


class _Signals:
    """Records SIGTERM/SIGINT (the first asks for a drain, the second for an exit) and SIGHUP."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.force = asyncio.Event()
        self.reload = asyncio.Event()

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self.reload.set)

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)

    def _on_stop(self, sig: signal.Signals) -> None:
        if self.stop.is_set():
            self.force.set()
        else:
            self.stop.set()
        log.info("received %s", sig.name)


async def _wait_first(*events: asyncio.Event) -> None:
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for wait in waits:
            wait.cancel()


async def _serve_reloads(daemon: Daemon, signals: _Signals) -> None:
    while True:
        await signals.reload.wait()
        signals.reload.clear()
        try:
            daemon.reload()
        except Exception:
            # A bug in one reload must not end the task and silently ignore every later SIGHUP.
            log.exception("reload failed; keeping the running config")


async def run(
    config: Config,
    *,
    config_path: str | Path | None = None,
    shutdown_trigger: ShutdownTrigger | None = None,
    registry: CollectorRegistry | None = None,
    started: Callable[[Daemon], None] | None = None,
    own_process: bool = False,
) -> int:
    """Run the daemon until the shutdown trigger (default: SIGTERM/SIGINT); the exit code.

    `own_process`: the daemon is what this process is for (`cpmgr run`), so once it has
    started, what start-up built is frozen out of the garbage collector's scans
    (gcpolicy.freeze_startup), and the service manager hears READY=1 once the socket listens
    and STOPPING=1 when the drain starts (notify). Not for a daemon run inside another
    program, whose objects and readiness are not ours to decide for."""
    loop = asyncio.get_running_loop()
    signals = _Signals()
    if shutdown_trigger is None:
        signals.install(loop)
    daemon = Daemon(config, config_path=config_path, registry=registry)
    reloads = asyncio.create_task(_serve_reloads(daemon, signals), name="cpmgr-reload")
    try:
        await daemon.start()
        if own_process:
            freeze_startup()
            notify(f"READY=1\nSTATUS=serving on {config.socket.path}")
        if started is not None:
            started(daemon)
        if shutdown_trigger is not None:
            await shutdown_trigger()
        else:
            await signals.stop.wait()
        if own_process:
            notify("STOPPING=1\nSTATUS=draining: flushing pending checkpoints")
        return await _drain_unless_forced(daemon, signals)
    finally:
        reloads.cancel()
        await daemon.close(grace=0.0 if signals.force.is_set() else CLOSE_GRACE)
        if shutdown_trigger is None:
            signals.uninstall(loop)


async def _drain_unless_forced(daemon: Daemon, signals: _Signals) -> int:
    drain = asyncio.create_task(daemon.drain(), name="cpmgr-drain")
    forced = asyncio.create_task(signals.force.wait())
    await asyncio.wait([drain, forced], return_when=asyncio.FIRST_COMPLETED)
    forced.cancel()
    if drain.done():
        return drain.result()
    log.warning("second signal: exiting now without finishing the flush")
    drain.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await drain
    return daemon.report_left_behind()


def run_from_file(path: str) -> int:
    """`cpmgr run --config PATH`: load, configure logging, run; startup errors -> exit codes."""
    config = load_config(path)
    configure_logging(config.log.level, config.log.format)
    try:
        code = asyncio.run(run(config, config_path=path, own_process=True))
    except CpmgrError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_LEFT_BEHIND
    log.info("stopped (exit code %d)", code)
    return code
