"""`make bench`: ingest throughput, the journal's cost, the commit path and coalescing, printed
as markdown tables.

    python bench/run.py [--reps N] [--quick] [--tmp DIR] [--output FILE]

Everything runs on this machine: the server side in this process, the clients in child
processes (bench/loadgen.py), the SLS emulator in another child on 127.0.0.1. Temp dirs and
children are removed on the way out, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
import shlex
import sys
import tempfile
import time
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final

from baseline import BaselineKind, running_baseline
from harness import (
    CREDENTIALS,
    EMULATOR_SHARDS,
    BenchError,
    Emulator,
    Load,
    Neighbours,
    bench_config,
    cpu_seconds,
    emulator_process,
    emulator_state,
    load_average,
    machine_lines,
    median,
    percentile,
    remote_checkpoint,
    run_load,
    spread,
    table,
    update_calls,
)
from loadgen import cursor, last_cursors
from prometheus_client import CollectorRegistry

from cpmgr.client import AsyncCpmgrClient
from cpmgr.committer import Committer
from cpmgr.daemon import Daemon
from cpmgr.ingest import IngestServer
from cpmgr.journal import FsyncMode, Journal
from cpmgr.metrics import Metrics
from cpmgr.sls.client import SLSClient
from cpmgr.store import CheckpointStore

CLIENTS: Final = 4
SHARDS_PER_CLIENT: Final = 16
WINDOW: Final = 256


@dataclass(frozen=True)
class Settings:
    reps: int
    lines: int  # per client and ingest run
    duration: float  # cap per ingest run, seconds
    commit_shards: int
    commit_rounds: int
    in_flight: tuple[int, ...]
    coalesce: tuple[tuple[int, int], ...]  # (lines per client, shards per client)
    timer_seconds: float
    temp_root: Path


# --- ingest targets: each serves a socket for one run ---------------------------------------------


@dataclass(frozen=True)
class Served:
    """A socket being served; for cpmgr, how many checkpoints it accepted and fsyncs it did."""

    path: str
    accepted: Callable[[], float] | None = None
    fsyncs: Callable[[], int] | None = None


Target = Callable[[Path], AbstractAsyncContextManager[Served]]


def daemon_target() -> Target:
    """The real Daemon: metrics, store, an idle committer (interval 1h), no journal."""

    @asynccontextmanager
    async def serve(run_dir: Path) -> AsyncIterator[Served]:
        config = bench_config(str(run_dir / "s"))
        daemon = Daemon(config, registry=CollectorRegistry(), process_metrics=False)
        await daemon.start()
        try:
            yield Served(config.socket.path, lambda: _received(daemon.registry))
        finally:
            await daemon.close()

    return serve


def ingest_target(fsync: FsyncMode | None) -> Target:
    """The daemon's ingest path without a committer: IngestServer, store, metrics and (unless
    `fsync` is None) the journal, wired as the Daemon wires them, with fsyncs counted."""

    @asynccontextmanager
    async def serve(run_dir: Path) -> AsyncIterator[Served]:
        config = bench_config(str(run_dir / "s"))
        metrics = Metrics(CollectorRegistry(), process_metrics=False)
        fsyncs = [0]

        def counting_fsync(fd: int) -> None:
            fsyncs[0] += 1
            os.fsync(fd)

        journal = None
        if fsync is not None:
            journal = Journal(
                run_dir / "state",
                fsync=fsync,
                fsync_interval=config.state.fsync_interval,
                fsync_fn=counting_fsync,
            )
            journal.open()
            await journal.start()
        server = IngestServer(config, CheckpointStore(["bench"]), journal=journal, metrics=metrics)
        try:
            await server.start()
            counted = (lambda: fsyncs[0]) if journal is not None else None
            yield Served(config.socket.path, lambda: _received(metrics.registry), counted)
        finally:
            await server.close()
            if journal is not None:
                await journal.close()

    return serve


def _received(registry: CollectorRegistry) -> float:
    value = registry.get_sample_value("cpmgr_checkpoints_received_total", {"group": "bench"})
    return value or 0.0


def baseline_target(kind: BaselineKind) -> Target:
    @asynccontextmanager
    async def serve(run_dir: Path) -> AsyncIterator[Served]:
        path = str(run_dir / "s")
        async with running_baseline(kind, path):
            yield Served(path)

    return serve


@contextmanager
def run_dir(root: Path) -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="r", dir=root) as name:
        yield Path(name)


@dataclass(frozen=True)
class IngestRun:
    load: Load
    fsyncs: int | None  # during the load (compactions included), for a journal


async def measure_ingest(target: Target, settings: Settings) -> IngestRun:
    """One run: 4 pipelining client processes against a fresh server."""
    with run_dir(settings.temp_root) as directory:
        async with target(directory) as served:
            fsyncs_before = served.fsyncs() if served.fsyncs else 0
            load = await run_load(
                served.path,
                clients=CLIENTS,
                lines=settings.lines,
                shards=SHARDS_PER_CLIENT,
                window=WINDOW,
                duration=settings.duration,
            )
            fsyncs = served.fsyncs() - fsyncs_before if served.fsyncs else None
            load.check()
            if served.accepted is not None and served.accepted() != load.ok:
                raise BenchError(f"the server counted {served.accepted()} of {load.ok} commits")
    return IngestRun(load, fsyncs)


async def compare_ingest(targets: dict[str, Target], settings: Settings, *, reference: str) -> str:
    """Every target once per repetition (interleaved, so a disturbance hits all alike)."""
    runs: dict[str, list[IngestRun]] = {name: [] for name in targets}
    for rep in range(settings.reps):
        for name, target in targets.items():
            run = await measure_ingest(target, settings)
            runs[name].append(run)
            progress(f"  rep {rep + 1}: {name}: {run.load.rate:,.0f} commits/s")
    ref = median([run.load.rate for run in runs[reference]])
    rows = [_ingest_row(name, results, ref) for name, results in runs.items()]
    header = ["server", "commits/s (median)", "min-max", f"vs {reference}"]
    header += ["server CPU µs/commit", "commits/run", "commits per fsync (compactions too)"]
    if all(row[-1] == "-" for row in rows):  # no journal anywhere
        header, rows = header[:-1], [row[:-1] for row in rows]
    return table(header, rows)


def _ingest_row(name: str, runs: list[IngestRun], reference: float) -> list[str]:
    rates = [run.load.rate for run in runs]
    return [
        name,
        f"{median(rates):,.0f}",
        spread(rates),
        f"{median(rates) / reference:.2f}",
        f"{median([run.load.cpu_us_per_line for run in runs]):.1f}",
        f"{median([float(run.load.ok) for run in runs]):,.0f}",
        _per_fsync(runs),
    ]


def _per_fsync(runs: list[IngestRun]) -> str:
    if any(run.fsyncs is None for run in runs):
        return "-"
    ratios = [run.load.ok / run.fsyncs if run.fsyncs else math.inf for run in runs]
    return "no fsync" if median(ratios) == math.inf else f"{median(ratios):,.1f}"


async def ingest_vs_baseline(settings: Settings) -> str:
    targets = {
        "cpmgr Daemon (no journal)": daemon_target(),
        "bare asyncio streams (write per answer)": baseline_target("streams"),
        "bare asyncio Protocol (one write per chunk)": baseline_target("protocol"),
    }
    return await compare_ingest(targets, settings, reference="cpmgr Daemon (no journal)")


async def ingest_with_journal(settings: Settings) -> str:
    targets = {
        "no journal": ingest_target(None),
        "fsync never": ingest_target("never"),
        "fsync batch (100ms)": ingest_target("batch"),
        "fsync always": ingest_target("always"),
    }
    return await compare_ingest(targets, settings, reference="no journal")


# --- the commit path ------------------------------------------------------------------------------


class RecordingMetrics(Metrics):
    """The daemon's metrics, plus every sample kept for exact percentiles."""

    def __init__(self) -> None:
        super().__init__(CollectorRegistry(), process_metrics=False)
        self.attempts: list[float] = []
        self.commits: list[float] = []
        self.codes: Counter[str] = Counter()

    def attempt_finished(self, group: str, code: str, seconds: float) -> None:
        super().attempt_finished(group, code, seconds)
        self.attempts.append(seconds)
        self.codes[code] += 1

    def commit_finished(self, group: str, code: str, seconds: float, *, ok: bool) -> None:
        super().commit_finished(group, code, seconds, ok=ok)
        self.commits.append(seconds)

    def reset(self) -> None:
        self.attempts.clear()
        self.commits.clear()


@dataclass
class CommitRuns:
    """Measured cycles of one max_in_flight setting."""

    rates: list[float] = field(default_factory=list)
    attempts: list[float] = field(default_factory=list)
    commits: list[float] = field(default_factory=list)
    codes: Counter[str] = field(default_factory=Counter)
    daemon_cpu: float = 0.0  # seconds over the measured cycles
    emulator_cpu: float = 0.0

    @property
    def measured(self) -> int:
        return len(self.commits)


async def commit_cycles(emulator: Emulator, max_in_flight: int, settings: Settings) -> CommitRuns:
    """One warm-up cycle, then `commit_rounds` cycles of `commit_shards` dirty shards each,
    through the real Committer and SLSClient (connection limit = max_in_flight, as the daemon)."""
    url = emulator.url
    config = bench_config("/unused", endpoint=url, max_in_flight=max_in_flight)
    store = CheckpointStore(["bench"])
    metrics = RecordingMetrics()
    client = SLSClient(
        endpoint=url,
        credentials=lambda: CREDENTIALS,
        request_timeout=config.commit.request_timeout,
        connection_limit=max_in_flight,
    )
    committer = Committer(config=config, store=store, client=client, observer=metrics)
    runs = CommitRuns()
    async with client:
        try:
            for round_number in range(settings.commit_rounds + 1):
                for shard in range(settings.commit_shards):
                    store.accept("bench", shard, cursor(round_number))
                metrics.reset()
                cpu, emulator_cpu = cpu_seconds(), emulator.cpu_seconds()
                started = time.perf_counter()
                await asyncio.gather(*committer.commit_now(group="bench"))
                elapsed = time.perf_counter() - started
                cpu, emulator_cpu = cpu_seconds() - cpu, emulator.cpu_seconds() - emulator_cpu
                if store.pending_count("bench"):
                    raise BenchError(f"{store.pending_count('bench')} shards left pending")
                if round_number == 0:
                    continue  # warm-up: opens the keep-alive connections
                runs.rates.append(settings.commit_shards / elapsed)
                runs.daemon_cpu += cpu
                runs.emulator_cpu += emulator_cpu
                runs.attempts += metrics.attempts
                runs.commits += metrics.commits
        finally:
            await committer.close()
    runs.codes = metrics.codes
    return runs


async def commit_path(emulator: Emulator, settings: Settings) -> str:
    rows = []
    for max_in_flight in settings.in_flight:
        before = update_calls(await emulator_state(emulator.url))
        runs = await commit_cycles(emulator, max_in_flight, settings)
        calls = update_calls(await emulator_state(emulator.url)) - before
        expected = settings.commit_shards * (settings.commit_rounds + 1)
        if calls != expected or set(runs.codes) != {"OK"}:
            raise BenchError(f"expected {expected} OK calls, got {calls}: {dict(runs.codes)}")
        progress(f"  max_in_flight {max_in_flight}: {median(runs.rates):,.0f} commits/s")
        rows.append(
            [
                str(max_in_flight),
                f"{median(runs.rates):,.0f}",
                spread(runs.rates),
                f"{percentile(runs.attempts, 50) * 1e3:.2f}",
                f"{percentile(runs.attempts, 99) * 1e3:.2f}",
                f"{percentile(runs.commits, 50) * 1e3:.1f}",
                f"{percentile(runs.commits, 99) * 1e3:.1f}",
                f"{settings.commit_shards / median(runs.rates) * 1e3:.0f}",
                f"{runs.daemon_cpu / runs.measured * 1e6:.0f}",
                f"{runs.emulator_cpu / runs.measured * 1e6:.0f}",
            ]
        )
    header = ["max_in_flight", "UpdateCheckPoint/s (median)", "min-max"]
    header += ["request p50 ms", "request p99 ms", "commit p50 ms", "commit p99 ms"]
    header += [f"cycle of {settings.commit_shards} ms", "committer CPU µs/call"]
    header += ["emulator CPU µs/call"]
    return table(header, rows)


# --- coalescing -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoalesceResult:
    commits: int
    shards: int
    calls: int
    cycles: float
    wrong: int  # shards whose server-side checkpoint is not the last one sent


async def coalesce_run(
    url: str,
    settings: Settings,
    *,
    lines: int,
    shards: int,
    interval: str = "1h",
    duration: float | None = None,
) -> CoalesceResult:
    """Commits from 4 clients into a Daemon talking to the emulator, then one `flush`; counts
    the UpdateCheckPoint calls the emulator answered and checks the latest value won."""
    with run_dir(settings.temp_root) as directory:
        config = bench_config(str(directory / "s"), endpoint=url, interval=interval)
        daemon = Daemon(config, registry=CollectorRegistry(), process_metrics=False)
        before = update_calls(await emulator_state(url))
        await daemon.start()
        try:
            load = await run_load(
                config.socket.path,
                clients=CLIENTS,
                lines=lines,
                shards=shards,
                window=WINDOW,
                duration=duration or settings.duration * 4,
            )
            load.check()
            async with AsyncCpmgrClient(config.socket.path) as client:
                await client.flush(timeout=60)
            cycles = daemon.registry.get_sample_value("cpmgr_commit_cycle_duration_seconds_count")
        finally:
            await daemon.close()
    state = await emulator_state(url)
    expected: dict[int, str] = {}
    for result in load.clients:
        expected.update(last_cursors(result.index, result.sent, shards))
    wrong = sum(1 for s, value in expected.items() if remote_checkpoint(state, s) != value)
    return CoalesceResult(
        load.ok, len(expected), update_calls(state) - before, cycles or 0.0, wrong
    )


async def coalescing(url: str, settings: Settings) -> str:
    rows = []
    for lines, shards in settings.coalesce:
        result = await coalesce_run(url, settings, lines=lines, shards=shards)
        progress(f"  {result.commits:,} commits over {result.shards} shards: {result.calls} calls")
        rows.append(_coalesce_row("one interval, then `flush`", result))
    timed = await coalesce_run(
        url,
        settings,
        lines=10**6,
        shards=SHARDS_PER_CLIENT,
        interval="500ms",
        duration=settings.timer_seconds,
    )
    progress(f"  timer: {timed.commits:,} commits, {timed.calls} calls, {timed.cycles:.0f} cycles")
    rows.append(_coalesce_row(f"{settings.timer_seconds:g} s at full speed, interval 500ms", timed))
    header = ["commits sent within", "commits (N)", "shards (M)", "timer cycles"]
    header += ["UpdateCheckPoint calls", "commits per call", "latest value on server"]
    return table(header, rows)


def _coalesce_row(label: str, result: CoalesceResult) -> list[str]:
    right = result.shards - result.wrong
    return [
        label,
        f"{result.commits:,}",
        f"{result.shards:,}",
        f"{result.cycles:.0f}",
        f"{result.calls:,}",
        f"{result.commits / max(1, result.calls):,.0f}",
        f"{right:,} / {result.shards:,} shards",
    ]


# --- the report -----------------------------------------------------------------------------------


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def command_line() -> str:
    args = shlex.join(sys.argv[1:])
    return f"python bench/run.py {args}".strip()


async def report(settings: Settings) -> str:
    load_before = load_average()
    whole = Neighbours()
    started = time.monotonic()
    progress("1/4 ingest: cpmgr vs bare asyncio servers")
    ingest = await _section(ingest_vs_baseline(settings))
    progress("2/4 ingest with the journal")
    journal = await _section(ingest_with_journal(settings))
    async with emulator_process(settings.temp_root / "emulator.log") as emulator:
        progress(f"3/4 commit path against the emulator at {emulator.url}")
        commits = await _section(commit_path(emulator, settings), emulator.cpu_seconds)
        progress("4/4 coalescing")
        coalesced = await _section(coalescing(emulator.url, settings), emulator.cpu_seconds)
    parts = [
        "## Results",
        "",
        f"- command: `{command_line()}` (`make bench` runs it without arguments)",
        *machine_lines(settings.temp_root),
        f"- load average (1/5/15 min) before: {load_before}, after: {load_average()}; other "
        f"processes used {whole.seconds():.0f} CPU-seconds during the run "
        f"({whole.share():.0%} of the machine)",
        f"- wall time: {time.monotonic() - started:.0f} s; medians of {settings.reps} "
        f"repetitions unless said otherwise",
        "",
        f"### 1. Ingest: {CLIENTS} client processes, pipelined windows of {WINDOW}, "
        f"{CLIENTS * SHARDS_PER_CLIENT} shards",
        "",
        ingest,
        "",
        "### 2. Ingest with the journal (`state.fsync`), same load",
        "",
        journal,
        "",
        f"### 3. Commit path: {settings.commit_shards} dirty shards per cycle, "
        f"median of {settings.commit_rounds} cycles after a warm-up",
        "",
        commits,
        "",
        "### 4. Coalescing: many commits, few UpdateCheckPoint calls",
        "",
        coalesced,
        "",
    ]
    return "\n".join(parts)


async def _section(body: Awaitable[str], extra_cpu: Callable[[], float] | None = None) -> str:
    """A section's table, then how much of the machine other processes took meanwhile
    (`extra_cpu`: the CPU time of a child still running, which is not another process)."""
    neighbours = Neighbours(extra_cpu)
    text = await body
    return f"{text}\n\nOther processes used {neighbours.share():.0%} of the machine meanwhile."


def parse_args(argv: list[str] | None = None) -> tuple[Settings, Path | None]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reps", type=int, default=3, help="repetitions of each ingest run (default 3)"
    )
    parser.add_argument("--quick", action="store_true", help="tiny runs, to check it works")
    parser.add_argument("--tmp", type=Path, default=Path("/tmp"), help="parent of the temp dir")
    parser.add_argument("--output", type=Path, default=None, help="also write the report here")
    args = parser.parse_args(argv)
    quick = args.quick
    return Settings(
        reps=1 if quick else args.reps,
        lines=2_000 if quick else 25_000,
        duration=2.0 if quick else 5.0,
        commit_shards=100 if quick else EMULATOR_SHARDS,
        commit_rounds=2 if quick else 5,
        in_flight=(8, 32, 64),
        coalesce=((500, 4), (2_000, 64)) if quick else ((2_500, 1), (25_000, 16), (25_000, 250)),
        timer_seconds=1.0 if quick else 3.0,
        temp_root=args.tmp,
    ), args.output


async def main() -> int:
    settings, output = parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="cpb", dir=settings.temp_root) as root:
        settings = replace(settings, temp_root=Path(root))
        try:
            text = await report(settings)
        except BenchError as exc:
            progress(f"benchmark failed: {exc}")
            return 1
    print(text)
    if output is not None:
        output.write_text(text)
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(asyncio.run(main()))
    except KeyboardInterrupt:
        # Children and temp dirs are already gone: the context managers ran on the way out.
        raise SystemExit(130) from None
