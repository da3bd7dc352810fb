"""Metrics, health endpoints, status and logs of a running daemon, checked against the emulator."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from tools import tool

from cpmgr.client import AsyncCpmgrClient, CpmgrProtocolError
from cpmgr.config import Config, parse_config
from cpmgr.daemon import Daemon, run
from cpmgr.emulator import EmulatorHandle, running_emulator
from cpmgr.logs import JsonFormatter, configure_logging

PROJECT = "obs-project"
KEY_ID = "obs-key-id"
SECRET = "S3cr3t#value: 'with' \"quotes\""
TOKEN = "sts-token-do-not-print"
GROUPS = {"orders": "orders-ls/orders-cg", "audit": "audit-ls/audit-cg"}


def cursor(number: int) -> str:
    return base64.b64encode(str(number).encode()).decode()


# A membership group, for the tests that need members and handoffs (members=True).
MEMBERS = {"name": "clicks", "logstore": "clicks-ls", "consumer_group": "clicks-cg"}


def config_data(
    endpoint: str,
    sock: str,
    *,
    shard_metrics: bool = False,
    lag: dict[str, Any] | None = None,
    members: bool = False,
    **commit: Any,
) -> dict[str, Any]:
    membership = {"heartbeat_interval": "200ms", "timeout": "12s", "create": True}
    extra = [{**MEMBERS, "project": PROJECT, "membership": membership}] if members else []
    return {
        # Lag reading off unless asked for: these daemons are about commits (and a forced
        # error would fail the lag reader's GetCheckPoint too).
        "lag": lag or {"interval": 0},
        "socket": {"path": sock},
        "http": {"listen": "127.0.0.1:0", "shard_metrics": shard_metrics},
        "sls": {
            "endpoint": endpoint,
            "access_key_id": KEY_ID,
            "access_key_secret": SECRET,
            "security_token": TOKEN,
        },
        "commit": {
            "interval": "1h",
            "shutdown_timeout": "5s",
            "retry": {"max_attempts": 2, "initial_backoff": "1ms", "max_backoff": "5ms"},
            **commit,
        },
        "groups": [
            {
                "name": name,
                "project": PROJECT,
                "logstore": where.split("/")[0],
                "consumer_group": where.split("/")[1],
            }
            for name, where in GROUPS.items()
        ]
        + extra,
    }


Scraped = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_scrape(text: str) -> Scraped:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@dataclass
class Running:
    daemon: Daemon
    emulator: EmulatorHandle
    registry: CollectorRegistry
    client: AsyncCpmgrClient
    http: aiohttp.ClientSession
    stop: asyncio.Event

    @property
    def base(self) -> str:
        assert self.daemon.web is not None
        return f"http://127.0.0.1:{self.daemon.web.port}"

    def sample(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    async def scrape_text(self) -> str:
        async with self.http.get(f"{self.base}/metrics") as response:
            assert response.status == 200
            return await response.text()

    async def scrape(self) -> Scraped:
        return parse_scrape(await self.scrape_text())

    def emulator_requests(self, code: str) -> int:
        requests = self.emulator.state.snapshot()["requests"].get("UpdateCheckPoint", {})
        return int(requests.get(code, 0))

    def force(self, group: str, answer: tuple[int, str] | None) -> None:
        key = f"{PROJECT}/{GROUPS[group]}"
        self.emulator.faults.update({"force": {key: list(answer) if answer else None}})


@asynccontextmanager
async def running_daemon(
    emulator_key: str = SECRET,
    *,
    shard_metrics: bool = False,
    lag: dict[str, Any] | None = None,
    members: bool = False,
    **commit: Any,
) -> AsyncIterator[Running]:
    sock_dir = tempfile.mkdtemp(prefix="cp", dir="/tmp")
    logstores = [f"{PROJECT}/{where.split('/')[0]}:4" for where in GROUPS.values()]
    logstores += [f"{PROJECT}/{MEMBERS['logstore']}:2"] if members else []
    groups = [f"{PROJECT}/{where}" for where in GROUPS.values()]
    async with running_emulator(
        logstores=logstores,
        consumer_groups=groups,
        access_key_id=KEY_ID,
        access_key_secret=emulator_key,
    ) as emulator:
        config: Config = parse_config(
            config_data(
                emulator.url,
                f"{sock_dir}/c.sock",
                shard_metrics=shard_metrics,
                lag=lag,
                members=members,
                **commit,
            )
        )
        registry = CollectorRegistry()
        stop = asyncio.Event()
        started: asyncio.Future[Daemon] = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(
            run(config, shutdown_trigger=stop.wait, registry=registry, started=started.set_result)
        )
        daemon = await started
        async with AsyncCpmgrClient(config.socket.path) as client, aiohttp.ClientSession() as http:
            try:
                yield Running(daemon, emulator, registry, client, http, stop)
            finally:
                stop.set()
                await task


async def test_every_contract_metric_matches_what_the_emulator_saw() -> None:
    async with running_daemon() as r:
        # Series for every configured group exist before any traffic.
        scraped = await r.scrape()
        for group in GROUPS:
            assert scraped[("cpmgr_checkpoints_received_total", (("group", group),))] == 0
            assert scraped[("cpmgr_pending_shards", (("group", group),))] == 0
            assert scraped[("cpmgr_last_success_timestamp_seconds", (("group", group),))] == 0
            assert ("cpmgr_commit_duration_seconds_count", (("group", group),)) in scraped
        assert scraped[("cpmgr_commit_concurrency_limit", ())] == 32  # commit.max_in_flight

        received = 0
        for n in range(50):
            await r.client.commit_many("orders", {shard: cursor(100 + n) for shard in range(4)})
            received += 4
        await r.client.commit("audit", 0, cursor(5))
        received += 1
        assert await r.client.flush() == 5

        assert r.sample("cpmgr_checkpoints_received_total", group="orders") == 200
        assert r.sample("cpmgr_checkpoints_received_total", group="audit") == 1
        ok = r.emulator_requests("OK")
        assert ok == 5
        total_ok = sum(
            r.sample("cpmgr_commit_requests_total", group=g, code="OK") or 0 for g in GROUPS
        )
        assert total_ok == ok
        assert r.sample("cpmgr_commit_duration_seconds_count", group="orders") == 4
        last_success = r.sample("cpmgr_last_success_timestamp_seconds", group="orders")
        assert last_success is not None and last_success > 1.7e9

        scraped = await r.scrape()
        assert scraped[("cpmgr_checkpoints_received_total", (("group", "orders"),))] == 200
        assert scraped[("cpmgr_commit_requests_total", (("code", "OK"), ("group", "orders")))] == 4
        assert scraped[("cpmgr_build_info", (("version", r.daemon.status()["version"]),))] == 1
        assert received == 201


async def test_failures_by_code_after_permanent_error_and_exhausted_retries() -> None:
    async with running_daemon() as r:
        r.force("orders", (404, "ConsumerGroupNotExist"))
        await r.client.commit("orders", 0, cursor(1))
        with pytest.raises(CpmgrProtocolError) as info:
            await r.client.flush()
        assert info.value.code == "CommitFailed"
        assert (
            r.sample("cpmgr_commit_failures_total", group="orders", code="ConsumerGroupNotExist")
            == 1
        )
        assert (
            r.sample("cpmgr_commit_requests_total", group="orders", code="ConsumerGroupNotExist")
            == 1
        )

        r.force("orders", (500, "InternalServerError"))
        await r.client.commit("orders", 1, cursor(1))
        with pytest.raises(CpmgrProtocolError):
            await r.client.flush()
        # Two attempts (max_attempts), one failed commit whose value stays pending.
        assert (
            r.sample("cpmgr_commit_requests_total", group="orders", code="InternalServerError") == 2
        )
        assert (
            r.sample("cpmgr_commit_failures_total", group="orders", code="InternalServerError") == 1
        )
        assert r.sample("cpmgr_commit_retries_total", group="orders") == 1
        assert r.emulator_requests("InternalServerError") == 2
        assert r.sample("cpmgr_pending_shards", group="orders") == 1
        r.force("orders", None)
        assert await r.client.flush() == 1


async def test_the_exposition_has_no_created_series() -> None:
    """One series per counter and histogram child, not a second `*_created` beside each."""
    async with running_daemon() as r:
        await r.client.commit("orders", 0, cursor(1))
        await r.client.flush()
        text = await r.scrape_text()
    assert 'cpmgr_commit_requests_total{code="OK",group="orders"} 1.0' in text
    assert "cpmgr_commit_duration_seconds_count" in text
    assert [line for line in text.splitlines() if "_created" in line] == []


async def test_pending_and_oldest_age_during_an_outage_and_after_recovery() -> None:
    async with running_daemon() as r:
        r.force("orders", (503, "ServerBusy"))
        for shard in range(3):
            await r.client.commit("orders", shard, cursor(10))
        with pytest.raises(CpmgrProtocolError):
            await r.client.flush(timeout=5)
        assert r.sample("cpmgr_pending_shards", group="orders") == 3
        first_age = r.sample("cpmgr_oldest_pending_age_seconds", group="orders")
        assert first_age is not None and first_age > 0
        await r.client.commit("orders", 0, cursor(11))  # a newer value keeps the age growing
        later_age = r.sample("cpmgr_oldest_pending_age_seconds", group="orders")
        assert later_age is not None and later_age >= first_age
        assert r.sample("cpmgr_pending_shards", group="audit") == 0

        r.force("orders", None)
        assert await r.client.flush() == 3
        assert r.sample("cpmgr_pending_shards", group="orders") == 0
        assert r.sample("cpmgr_oldest_pending_age_seconds", group="orders") == 0
        scraped = await r.scrape()
        assert scraped[("cpmgr_pending_shards", (("group", "orders"),))] == 0


async def test_readyz_flips_to_503_while_shutting_down() -> None:
    async with running_daemon(shutdown_timeout="30s") as r:
        async with r.http.get(f"{r.base}/readyz") as response:
            assert response.status == 200
        async with r.http.get(f"{r.base}/healthz") as response:
            assert response.status == 200
        r.force("orders", (500, "InternalServerError"))
        await r.client.commit("orders", 0, cursor(1))
        r.stop.set()  # the drain now retries against a failing server
        await _until_shutting_down(r.client)
        async with r.http.get(f"{r.base}/readyz") as response:
            assert response.status == 503
        async with r.http.get(f"{r.base}/healthz") as response:
            assert response.status == 200
        r.force("orders", None)  # let the drain finish


async def _until_shutting_down(client: AsyncCpmgrClient) -> None:
    """Repeat an idempotent commit until the daemon answers ShuttingDown."""
    for _ in range(10_000):
        try:
            await client.commit("orders", 0, cursor(1))
        except CpmgrProtocolError as exc:
            assert exc.code == "ShuttingDown"
            return
    raise AssertionError("the daemon never started shutting down")


async def test_status_endpoint_matches_socket_status() -> None:
    async with running_daemon() as r:
        await r.client.commit("audit", 2, cursor(3))
        async with r.http.get(f"{r.base}/status") as response:
            page = await response.json()
        answer = await r.client.status()
        assert page["groups"] == answer["groups"]
        assert page["groups"]["audit"]["pending"] == 1
        assert page["groups"]["audit"]["tracked"] == 1


async def test_secrets_never_appear_in_logs_status_or_errors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with running_daemon(emulator_key="another-secret", shutdown_timeout="200ms") as r:
        await r.client.commit("orders", 0, cursor(1))
        with pytest.raises(CpmgrProtocolError) as info:
            await r.client.flush()
        failures = json.dumps(info.value.answer)
        status = json.dumps(await r.client.status())
        gets = json.dumps(await r.client.get("orders"))
        async with r.http.get(f"{r.base}/status") as response:
            page = await response.text()
        async with r.http.get(f"{r.base}/metrics") as response:
            metrics = await response.text()
    assert "SignatureNotMatch" in failures
    logs = caplog.text
    for text in (logs, failures, status, gets, page, metrics):
        assert SECRET not in text
        assert TOKEN not in text


def test_check_config_output_hides_secrets(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config_data("http://127.0.0.1:1", "/tmp/x.sock")))
    result = subprocess.run(
        [sys.executable, "-m", "cpmgr", "check-config", "-c", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert SECRET not in result.stdout + result.stderr
    assert TOKEN not in result.stdout + result.stderr


async def test_one_log_line_per_state_change_not_per_commit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="cpmgr")
    async with running_daemon() as r:
        r.force("orders", (500, "InternalServerError"))
        for n in range(5):
            for shard in range(4):
                await r.client.commit("orders", shard, cursor(10 + n))
            with pytest.raises(CpmgrProtocolError):
                await r.client.flush()
        r.force("orders", None)
        assert await r.client.flush() == 4
        for n in range(5):
            await r.client.commit("orders", 0, cursor(100 + n), wait=True)
    messages = [rec.getMessage() for rec in caplog.records if rec.name.startswith("cpmgr")]
    failing = [m for m in messages if "InternalServerError" in m and "orders" in m]
    recovering = [m for m in messages if "succeed again" in m]
    assert len(failing) == 1, failing
    assert len(recovering) == 1, recovering
    assert not [m for m in messages if "committed" in m and "shard" in m]


def test_json_log_format_is_one_object_per_line() -> None:
    record = logging.LogRecord("cpmgr.test", logging.WARNING, __file__, 1, "a %s\nb", ("x",), None)
    line = JsonFormatter().format(record)
    assert "\n" not in line
    entry = json.loads(line)
    assert entry["level"] == "warning"
    assert entry["message"] == "a x\nb"
    assert entry["logger"] == "cpmgr.test"


def test_configure_logging_swaps_level_and_format() -> None:
    root = logging.getLogger()
    before = (root.level, list(root.handlers))
    try:
        configure_logging("debug", "json")
        configure_logging("warning", "text")
        handlers = [h for h in root.handlers if h.get_name() == "cpmgr"]
        assert len(handlers) == 1
        assert root.level == logging.WARNING
        assert not isinstance(handlers[0].formatter, JsonFormatter)
    finally:
        for handler in [h for h in root.handlers if h.get_name() == "cpmgr"]:
            root.removeHandler(handler)
        root.setLevel(before[0])


@pytest.mark.parametrize("shard_metrics", [False, True])
async def test_promtool_accepts_the_exposition(shard_metrics: bool) -> None:
    """Prometheus' own linter reads a live scrape (names, help, types, units)."""
    promtool = tool("promtool")
    async with running_daemon(shard_metrics=shard_metrics) as r:
        await r.client.commit("orders", 0, cursor(1))
        await r.client.flush()
        await r.client.commit("orders", 1, cursor(1))
        async with r.http.get(f"{r.base}/metrics") as response:
            text = await response.read()
        if shard_metrics:
            scraped = parse_scrape(text.decode())
            assert (
                scraped[("cpmgr_shard_pending_age_seconds", (("group", "orders"), ("shard", "0")))]
                == 0
            )
            assert (
                scraped[("cpmgr_shard_pending_age_seconds", (("group", "orders"), ("shard", "1")))]
                >= 0
            )
            committed = (
                "cpmgr_shard_last_commit_timestamp_seconds",
                (("group", "orders"), ("shard", "0")),
            )
            assert scraped[committed] > 1.7e9
    proc = await asyncio.create_subprocess_exec(
        promtool,
        "check",
        "metrics",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await proc.communicate(text)
    assert proc.returncode == 0, output.decode()
    assert output.decode().strip() == "", output.decode()


async def test_event_loop_lag_is_exported_from_a_probe() -> None:
    async with running_daemon() as r:
        deadline = asyncio.get_running_loop().time() + 10
        while not r.sample("cpmgr_event_loop_lag_seconds_count"):
            assert asyncio.get_running_loop().time() < deadline, "the probe never reported"
            await asyncio.sleep(0.01)
        scraped = await r.scrape()
        assert scraped[("cpmgr_event_loop_lag_seconds_count", ())] >= 1
        assert ("cpmgr_event_loop_lag_seconds_bucket", (("le", "0.02"),)) in scraped


async def test_a_scrape_of_50k_shard_series_leaves_the_loop_serving() -> None:
    async with running_daemon(shard_metrics=True, shutdown_timeout="100ms") as r:
        for shard in range(50_000):
            r.daemon.store.accept("orders", shard, cursor(shard + 1))
        scrape = asyncio.create_task(r.scrape_text())
        answered_during_scrape = 0
        slowest = 0.0
        loop = asyncio.get_running_loop()
        while not scrape.done():
            started = loop.time()
            async with r.http.get(f"{r.base}/healthz") as response:
                assert response.status == 200
            slowest = max(slowest, loop.time() - started)
            answered_during_scrape += not scrape.done()
        scraped = parse_scrape(await scrape)  # the test's own parsing, after the measurement
        ages = [k for k in scraped if k[0] == "cpmgr_shard_pending_age_seconds"]
        assert len(ages) == 50_000
        assert scraped[("cpmgr_pending_shards", (("group", "orders"),))] == 50_000
        # Before, the scrape held the loop for seconds and /healthz waited behind it.
        assert answered_during_scrape >= 3
        assert slowest < 0.5, f"/healthz took {slowest:.2f}s during the scrape"
