"""A real Prometheus server scrapes a running daemon: it evaluates deploy/prometheus/alerts.yml,
every query of the Grafana dashboard, and the Kubernetes scrape job of docs/operations.md."""

from __future__ import annotations

import asyncio
import json
import math
import re
import shutil
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest
import yaml
from membership_helpers import consumer
from test_deploy import _exported_names
from test_observability import MEMBERS, PROJECT, Running, cursor, running_daemon
from tools import tool

from cpmgr.client import CpmgrProtocolError

ROOT = Path(__file__).resolve().parents[1]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "cpmgr.json"
OPERATIONS = ROOT / "docs" / "operations.md"
# Prometheus is a separate process: it can only be watched through its HTTP API, so each step
# polls that API until a deadline. With 1s scrape and evaluation intervals every step takes a
# second or two, except the first scrape: Prometheus applies discovered targets at most every
# 5 seconds (not configurable in 2.42). The deadline only bounds a broken run.
STEP_TIMEOUT = 15.0
POLL_INTERVAL = 0.2
STOP_TIMEOUT = 10.0

T = TypeVar("T")


@dataclass
class Prometheus:
    """A running Prometheus process and the session that reads its HTTP API."""

    process: asyncio.subprocess.Process
    base: str
    http: aiohttp.ClientSession
    log: Path

    async def api(self, path: str, **params: str) -> Any:
        """The `data` of a successful answer from /api/v1/<path>."""
        async with self.http.get(f"{self.base}/api/v1/{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> dict[str, float]:
        """An instant query: the value of each series, keyed by its `group` label (or "")."""
        data = await self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return {s["metric"].get("group", ""): float(s["value"][1]) for s in data["result"]}

    async def eventually(self, what: str, probe: Callable[[], Awaitable[T | None]]) -> T:
        """The first non-None result of `probe`, or a failure naming `what` and the server log."""
        deadline = time.monotonic() + STEP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.returncode is not None:
                pytest.fail(f"prometheus exited while waiting for {what}:\n{self.tail()}")
            found = await probe()
            if found is not None:
                return found
            await asyncio.sleep(POLL_INTERVAL)
        pytest.fail(f"prometheus did not show {what} in {STEP_TIMEOUT}s:\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])


def _free_port() -> int:
    # Prometheus does not report the port it bound for ":0", so pick one first; another
    # process could take it in between, which would show as a clear startup failure.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _write_config(
    directory: Path,
    target: str,
    *,
    at_once: frozenset[str],
    scrape_configs: list[dict[str, Any]] | None = None,
) -> Path:
    """prometheus.yml scraping `target` as job cpmgr (or `scrape_configs`), with a copy of the
    project's alert rules.

    The rules are copied unchanged, but for the `for:` of the alerts named in `at_once`, which
    is dropped so the test need not wait minutes (their expressions are the shipped ones)."""
    rules = directory / "alerts.yml"
    shutil.copyfile(ALERTS, rules)
    if at_once:
        document = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
        for rule in document["groups"][0]["rules"]:
            if rule.get("alert") in at_once:
                rule.pop("for", None)
        rules.write_text(yaml.safe_dump(document), encoding="utf-8")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules)],
        "scrape_configs": scrape_configs
        or [{"job_name": "cpmgr", "static_configs": [{"targets": [target]}]}],
    }
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config), encoding="utf-8")
    return path


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is not None:
        return
    process.terminate()
    try:
        await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
    except TimeoutError:
        process.kill()
        await process.wait()


@asynccontextmanager
async def running_prometheus(
    tmp_path: Path,
    r: Running,
    *,
    at_once: frozenset[str] = frozenset(),
    scrape_configs: list[dict[str, Any]] | None = None,
) -> AsyncIterator[Prometheus]:
    """Prometheus on a loopback port scraping the daemon of `r`, stopped on exit."""
    binary = tool("prometheus")
    assert r.daemon.web is not None
    config = _write_config(
        tmp_path,
        f"127.0.0.1:{r.daemon.web.port}",
        at_once=at_once,
        scrape_configs=scrape_configs,
    )
    listen = f"127.0.0.1:{_free_port()}"
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        process = await asyncio.create_subprocess_exec(
            binary,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address={listen}",
            "--storage.tsdb.retention.time=1h",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=out,
            stderr=asyncio.subprocess.STDOUT,
        )
    try:
        yield Prometheus(process, f"http://{listen}", r.http, log)
    finally:
        await _stop(process)


async def _ready(prom: Prometheus) -> bool | None:
    try:
        async with prom.http.get(f"{prom.base}/-/ready") as response:
            return True if response.status == 200 else None  # 503 while the TSDB opens
    except aiohttp.ClientConnectionError:
        return None  # not listening yet


async def _target_up(prom: Prometheus) -> dict[str, Any] | None:
    targets = await prom.api("targets")
    for target in targets["activeTargets"]:
        if target["labels"]["job"] == "cpmgr" and target["health"] == "up":
            return dict(target)
    return None


async def _value(prom: Prometheus, expr: str, group: str, expected: float) -> float | None:
    seen = (await prom.query(expr)).get(group)
    return seen if seen == expected else None


async def _firing(prom: Prometheus, name: str) -> list[dict[str, Any]] | None:
    alerts = [a for a in (await prom.api("alerts"))["alerts"] if a["labels"]["alertname"] == name]
    return alerts or None


async def test_prometheus_scrapes_the_daemon_and_alerts_on_failing_commits(
    tmp_path: Path,
) -> None:
    async with running_daemon() as r, running_prometheus(tmp_path, r) as prom:
        await prom.eventually("readiness", lambda: _ready(prom))
        target = await prom.eventually("the cpmgr target up", lambda: _target_up(prom))
        assert target["scrapeUrl"] == f"{r.base}/metrics"
        assert await prom.query('up{job="cpmgr"}') == {"": 1.0}

        for n in range(3):
            await r.client.commit_many("orders", {shard: cursor(10 + n) for shard in range(4)})
        await r.client.commit("audit", 0, cursor(1))
        assert await r.client.flush() == 5
        received = 'cpmgr_checkpoints_received_total{job="cpmgr"}'
        await prom.eventually("12 checkpoints", lambda: _value(prom, received, "orders", 12))
        assert await prom.query(received) == {"orders": 12.0, "audit": 1.0}
        ok = 'cpmgr_commit_requests_total{code="OK"}'
        assert await prom.query(ok) == {"orders": 4.0, "audit": 1.0}

        r.force("orders", (500, "InternalServerError"))
        await r.client.commit("orders", 0, cursor(20))
        with pytest.raises(CpmgrProtocolError):
            await r.client.flush()
        alerts = await prom.eventually(
            "CpmgrCommitsFailing", lambda: _firing(prom, "CpmgrCommitsFailing")
        )

        # No `for:`: the first evaluation that sees the failure fires it, for orders only.
        assert [(a["state"], a["labels"]["group"], a["labels"]["code"]) for a in alerts] == [
            ("firing", "orders", "InternalServerError")
        ]
        assert alerts[0]["labels"]["severity"] == "warning"
        assert alerts[0]["labels"]["instance"] == target["labels"]["instance"]
        assert alerts[0]["annotations"]["summary"] == (
            "cpmgr commits for group orders fail with InternalServerError"
        )
        assert await prom.query('cpmgr_pending_shards{job="cpmgr"}') == {
            "orders": 1.0,
            "audit": 0.0,
        }
        # Every rule of the project evaluates without error on live data, and nothing else
        # alerts: a healthy group and one fresh failure are not an outage.
        (group,) = (await prom.api("rules"))["groups"]
        assert len(group["rules"]) == len(yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"])
        assert {
            (rule["name"], rule["health"], rule.get("lastError", "")) for rule in group["rules"]
        } == {(rule["name"], "ok", "") for rule in group["rules"]}
        active = {a["labels"]["alertname"] for a in (await prom.api("alerts"))["alerts"]}
        assert active == {"CpmgrCommitsFailing"}
        r.force("orders", None)  # so the daemon's final drain commits at once, not for 5s


async def test_prometheus_alerts_on_a_consumer_that_falls_behind(tmp_path: Path) -> None:
    lag = {"interval": "200ms", "lagging_after": "30s", "stall_after": "1h"}
    at_once = frozenset({"CpmgrConsumerLagHigh"})
    async with (
        running_daemon(lag=lag) as r,
        running_prometheus(tmp_path, r, at_once=at_once) as prom,
    ):
        await prom.eventually("readiness", lambda: _ready(prom))
        await prom.eventually("the cpmgr target up", lambda: _target_up(prom))
        shard = r.emulator.state.logstore(PROJECT, "orders-ls").shards[2]
        start = int(time.time())
        shard.append(40, start - 120)
        # The consumer keeps up at first: no lag, no alert.
        await r.client.commit("orders", 2, cursor(shard.end), wait=True)
        seconds = 'max by (group) (cpmgr_consumer_lag_seconds{job="cpmgr"})'
        behind = 'max by (group) (cpmgr_consumer_lag_log_groups{job="cpmgr"})'
        await prom.eventually("lag 0 for orders", lambda: _value(prom, behind, "orders", 0))
        assert await _firing(prom, "CpmgrConsumerLagHigh") is None
        # Then data keeps arriving for two minutes that it does not read.
        for second in range(0, 120, 10):
            shard.append(5, start - 120 + second)
        await prom.eventually("120 s of lag", lambda: _value(prom, seconds, "orders", 110.0))
        assert await prom.query(behind) == {"orders": 60.0, "audit": 0.0}
        alerts = await prom.eventually(
            "CpmgrConsumerLagHigh", lambda: _firing(prom, "CpmgrConsumerLagHigh")
        )
        assert [(a["state"], a["labels"]) for a in alerts] == [
            (
                "firing",
                {"alertname": "CpmgrConsumerLagHigh", "group": "orders", "severity": "warning"},
            )
        ]
        assert alerts[0]["annotations"]["summary"] == "consumer group orders is falling behind"
        assert await _firing(prom, "CpmgrShardStalled") is None


# ------------------------------------------------------------------------------- dashboard

# What Grafana puts in for the dashboard's variables: "All" (their allValue), and a rate
# window that holds everything this test did (Grafana's is at least four scrape intervals; on
# a loaded machine the last commit may be more than 4s old when a panel is evaluated).
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$group": ".*"}


def _grafana(expr: str) -> str:
    for name, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a dashboard variable this test does not know: {expr}"
    return expr


def _dashboard() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    return loaded


def _panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel."""
    return [
        (panel["title"], target["expr"])
        for panel in _dashboard()["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]


async def _has_data(prom: Prometheus, expr: str) -> list[dict[str, Any]] | None:
    data = await prom.api("query", query=_grafana(expr))
    series = [s for s in data["result"] if not math.isnan(float(s["value"][1]))]
    return series or None


async def _label_values(prom: Prometheus, query: str) -> list[str] | None:
    """A Grafana `label_values(SELECTOR, LABEL)` variable query, through the series API."""
    match = re.fullmatch(r"label_values\((.+), (\w+)\)", query)
    assert match, query
    selector, label = _grafana(match.group(1)), match.group(2)
    values = await prom.api(f"label/{label}/values", **{"match[]": selector})
    return list(values) or None


async def _join_and_hand_a_shard_back(r: Running, stack: AsyncExitStack) -> None:
    """A member of the membership group that stays joined, after one handoff."""
    peer = await stack.enter_async_context(consumer(r.daemon.config.socket.path))
    group = MEMBERS["name"]
    joined = await peer.ask({"op": "join", "group": group, "consumer": "dashboard-1"})
    assert joined["ok"], joined
    shard = (await peer.event("assigned"))["shard"]
    released = await peer.ask({"op": "release", "group": group, "shard": shard})
    assert released["ok"], released


def test_the_dashboard_is_a_grafana_dashboard_on_job_cpmgr() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    queries = _panel_queries()
    assert all('job="cpmgr"' in expr for _, expr in queries), "the alerts select job=cpmgr"
    # Every runbook a panel points to is a section of the operations guide.
    headings = re.findall(r"^#+\s+(.+)$", OPERATIONS.read_text(encoding="utf-8"), re.M)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    links = re.findall(r"docs/operations\.md#([a-z0-9-]+)", json.dumps(dashboard))
    assert links and sorted(set(links) - anchors) == []
    exported = {name.removesuffix("_bucket").removesuffix("_total") for name in _exported_names()}
    used = {m for _, expr in queries for m in re.findall(r"\bcpmgr_[a-z_]+", expr)}
    assert (
        sorted(u for u in used if u.removesuffix("_bucket").removesuffix("_total") not in exported)
        == []
    )


async def test_every_dashboard_query_returns_data_from_a_real_daemon(tmp_path: Path) -> None:
    lag = {"interval": "200ms", "lagging_after": "30s", "stall_after": "1h"}
    async with (
        running_daemon(members=True, lag=lag) as r,
        running_prometheus(tmp_path, r) as prom,
        AsyncExitStack() as stack,
    ):
        await prom.eventually("readiness", lambda: _ready(prom))
        await prom.eventually("the cpmgr target up", lambda: _target_up(prom))
        await _join_and_hand_a_shard_back(r, stack)
        for n in range(3):
            await r.client.commit_many("orders", {shard: cursor(10 + n) for shard in range(4)})
            assert await r.client.flush() == 4
        r.force("audit", (404, "ConsumerGroupNotExist"))  # a failure, by code
        await r.client.commit("audit", 0, cursor(1))
        with pytest.raises(CpmgrProtocolError):
            await r.client.flush()
        await r.client.commit("orders", 0, cursor(99))  # and one left pending
        r.force("audit", None)

        for variable in _dashboard()["templating"]["list"]:
            if variable["type"] == "query":
                await prom.eventually(
                    f"values for ${variable['name']}",
                    lambda v=variable: _label_values(prom, v["query"]["query"]),
                )
        for title, expr in _panel_queries():
            await prom.eventually(f"{title!r}: {expr}", lambda e=expr: _has_data(prom, e))
        assert (await prom.query('cpmgr_members{job="cpmgr"}'))[MEMBERS["name"]] == 1.0


# ------------------------------------------------------------- the Kubernetes scrape job


def _documented_scrape_job() -> dict[str, Any]:
    """The scrape job of docs/operations.md ("Scrape job without the operator")."""
    text = OPERATIONS.read_text(encoding="utf-8")
    section = text.split("### Scrape job without the operator", 1)[1]
    block = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    (job,) = yaml.safe_load(block)["scrape_configs"]
    assert isinstance(job, dict)
    return job


def _pod_target(address: str, port_name: str, phase: str) -> dict[str, Any]:
    """A target as Prometheus' pod discovery describes one container port of a pod."""
    return {
        "targets": [address],
        "labels": {
            "__meta_kubernetes_namespace": "shop",
            "__meta_kubernetes_pod_name": f"orders-consumer-{phase.lower()}",
            "__meta_kubernetes_pod_phase": phase,
            "__meta_kubernetes_pod_container_port_name": port_name,
        },
    }


async def _targets(prom: Prometheus) -> dict[str, Any] | None:
    targets: dict[str, Any] = await prom.api("targets")
    return targets if targets["activeTargets"] and targets["droppedTargets"] else None


def test_the_documented_scrape_job_is_the_one_in_prometheus_yml() -> None:
    shipped = (ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text(encoding="utf-8")
    commented = "\n".join(
        line.removeprefix("  # ") for line in shipped.splitlines() if line.startswith("  # ")
    )
    start = commented.index("- job_name: cpmgr-kubernetes-pods")
    (job,) = yaml.safe_load(commented[start:])
    assert job == _documented_scrape_job()


async def test_the_documented_kubernetes_scrape_job_keeps_only_cpmgr_as_job_cpmgr(
    tmp_path: Path,
) -> None:
    job = _documented_scrape_job()
    assert job.pop("kubernetes_sd_configs") == [{"role": "pod"}]
    async with running_daemon() as r:
        assert r.daemon.web is not None
        cpmgr = f"127.0.0.1:{r.daemon.web.port}"
        # The pod discovery's view of a running pod (cpmgr's port and the app's) and of a
        # pending one, given to Prometheus as static targets with the same meta labels.
        job["static_configs"] = [
            _pod_target(cpmgr, "cpmgr-http", "Running"),
            _pod_target("127.0.0.1:1", "app-metrics", "Running"),
            _pod_target(cpmgr, "cpmgr-http", "Pending"),
        ]
        async with running_prometheus(tmp_path, r, scrape_configs=[job]) as prom:
            await prom.eventually("readiness", lambda: _ready(prom))
            targets = await prom.eventually("the targets", lambda: _targets(prom))
            (active,) = targets["activeTargets"]
            assert active["labels"] == {
                "instance": cpmgr,
                "job": "cpmgr",
                "namespace": "shop",
                "pod": "orders-consumer-running",
            }
            assert len(targets["droppedTargets"]) == 2
            await prom.eventually("the cpmgr target up", lambda: _target_up(prom))
