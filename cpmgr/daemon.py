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
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from cpmgr import __version__
from cpmgr.committer import Committer
from cpmgr.config import Config, load_config
from cpmgr.credentials import CredentialsProvider
from cpmgr.errors import ConfigError, CpmgrError
from cpmgr.ingest import IngestServer
from cpmgr.journal import Journal
from cpmgr.logs import configure_logging
from cpmgr.metrics import Metrics
from cpmgr.sls.client import SLSClient
from cpmgr.store import CheckpointStore
from cpmgr.web import WebServer, build_app

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_LEFT_BEHIND = 1

ShutdownTrigger = Callable[[], Awaitable[object]]


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
        self.metrics.watch_store(
            self.store, self.store.groups, shard_metrics=config.http.shard_metrics
        )
        self.credentials = CredentialsProvider(config.sls)
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
            on_committed=self._journal_committed,
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
        )
        self.web = (
            WebServer(
                config.http.listen,
                build_app(self.registry, status=self.status, ready=lambda: self.ready),
            )
            if config.http.listen
            else None
        )
        self.ready = False
        self.shutting_down = False
        self._started_at = time.monotonic()
        self._started: list[Callable[[], Awaitable[None]]] = []
        self._retiring: set[asyncio.Task[None]] = set()

    def _journal_committed(self, group: str, shard: int, checkpoint: str) -> None:
        if self.journal is not None:
            self.journal.record_committed(group, shard, checkpoint)

    # ------------------------------------------------------------------ start and stop

    async def start(self) -> None:
        """Start in order: HTTP (not ready), journal replay, client, committer, socket."""
        if self.web is not None:
            await self.web.start()
            self._started.append(self.web.close)
        if self.journal is not None:
            self._restore(self.journal)
            await self.journal.start()
            self._started.append(self.journal.close)
        await self.client.start()
        self._started.append(self.client.close)
        await self.committer.start()
        self._started.append(self.committer.close)
        await self.ingest.start()
        self._started.append(self.ingest.close)
        self.ready = True
        log.info(
            "cpmgr %s ready: socket %s, %d group(s), commit interval %gs",
            __version__,
            self.config.socket.path,
            len(self.config.groups),
            self.config.commit.interval,
        )

    def _restore(self, journal: Journal) -> None:
        records = journal.open()
        for record in records:
            if record.group in self.store.groups():
                self.store.restore(
                    record.group,
                    record.shard,
                    record.latest,
                    consumer=record.consumer,
                    committed=record.committed,
                )
        pending = sum(self.store.pending_count(g) for g in self.store.groups())
        log.info("journal replayed: %d shard(s), %d pending", len(records), pending)

    async def drain(self) -> int:
        """Stop accepting, flush within shutdown_timeout, report leftovers; the exit code."""
        self.shutting_down = True
        self.ready = False
        self.ingest.stop_accepting()
        timeout = self.config.commit.shutdown_timeout
        log.info("shutting down: flushing pending checkpoints (up to %gs)", timeout)
        try:
            await self.committer.flush(timeout=timeout)
        except Exception:
            log.exception("final flush failed")
        return self.report_left_behind()

    def report_left_behind(self) -> int:
        left = [
            view
            for group in self.store.groups()
            for view in self.store.shard_views(group)
            if view.pending is not None
        ]
        for view in left:
            error = view.last_error
            log.error(
                "left behind: group %s shard %d checkpoint %s (last error: %s)%s",
                view.group,
                view.shard,
                view.pending,
                f"{error.code}: {error.message}" if error else "none",
                ", journaled" if self.journal is not None else "",
            )
        if not left:
            log.info("every accepted checkpoint is committed")
            return EXIT_OK
        return EXIT_OK if self.journal is not None else EXIT_LEFT_BEHIND

    async def close(self) -> None:
        """Stop every started component in reverse order (idempotent)."""
        self.ready = False
        while self._started:
            closer = self._started.pop()
            try:
                await closer()
            except Exception:
                log.exception("error while stopping %s", closer)

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
        self._apply(fresh)
        return True

    def _apply(self, fresh: Config) -> None:
        old = self.config
        for section in ("socket", "http", "state"):
            if getattr(old, section) != getattr(fresh, section):
                log.warning("reload: %s.* changed; it takes effect after a restart", section)
        removed = {g.name for g in old.groups} - {g.name for g in fresh.groups}
        for name in sorted(removed):
            self._retire_group(name)
        for group in fresh.groups:
            self.store.add_group(group.name)
        self.metrics.add_groups(self.store.groups())
        self.credentials.update(fresh.sls)
        self.committer.apply_config(fresh)
        configure_logging(fresh.log.level, fresh.log.format)
        self.config = fresh
        self.ingest.apply_config(fresh)
        log.info("config reloaded: %d group(s)", len(fresh.groups))

    def _retire_group(self, name: str) -> None:
        """A removed group: flush it first (in the background), then forget it."""

        async def retire() -> None:
            result = await self.committer.flush(
                group=name, timeout=self.config.commit.shutdown_timeout
            )
            if not result.ok:
                log.error("removed group %s: not every shard could be flushed", name)
            self.store.remove_group(name)

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
            "groups": {
                name: {
                    "pending": self.store.pending_count(name),
                    "tracked": self.store.tracked_count(name),
                    "failures": self.store.failure_count(name),
                    "last_success": self.store.last_success(name),
                }
                for name in self.store.groups()
            },
        }


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
        daemon.reload()


async def run(
    config: Config,
    *,
    config_path: str | Path | None = None,
    shutdown_trigger: ShutdownTrigger | None = None,
    registry: CollectorRegistry | None = None,
    started: Callable[[Daemon], None] | None = None,
) -> int:
    """Run the daemon until the shutdown trigger (default: SIGTERM/SIGINT); the exit code."""
    loop = asyncio.get_running_loop()
    signals = _Signals()
    if shutdown_trigger is None:
        signals.install(loop)
    daemon = Daemon(config, config_path=config_path, registry=registry)
    reloads = asyncio.create_task(_serve_reloads(daemon, signals), name="cpmgr-reload")
    try:
        await daemon.start()
        if started is not None:
            started(daemon)
        if shutdown_trigger is not None:
            await shutdown_trigger()
        else:
            await signals.stop.wait()
        return await _drain_unless_forced(daemon, signals)
    finally:
        reloads.cancel()
        await daemon.close()
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
        return asyncio.run(run(config, config_path=path))
    except CpmgrError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_LEFT_BEHIND
