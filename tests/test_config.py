"""Config: every rule of docs/configuration.md, good and bad, and the shipped files."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from cpmgr.config import (
    Config,
    load_config,
    load_credentials_file,
    parse_config,
    parse_duration,
    parse_mode,
    render_effective,
)
from cpmgr.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
KEYS = {"ALIBABA_CLOUD_ACCESS_KEY_ID": "env-id", "ALIBABA_CLOUD_ACCESS_KEY_SECRET": "env-secret"}
NASTY_SECRET = "a#b: c 'd\" ${NOT_A_VAR} e"


def minimal(**overrides: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sls": {"endpoint": "cn-hangzhou.log.aliyuncs.com", "access_key_id": "id"},
        "groups": [{"name": "orders", "project": "p", "logstore": "l", "consumer_group": "cg"}],
    }
    data["sls"]["access_key_secret"] = "secret"
    data.update(overrides)
    return data


def problems_of(data: object, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, env or {})
    return info.value.problems


def test_defaults_follow_the_contract() -> None:
    cfg = parse_config(minimal(), {})
    assert cfg.socket.path == "/run/cpmgr/cpmgr.sock"
    assert cfg.socket.mode == 0o660
    assert cfg.socket.max_line_bytes == 1_048_576
    assert cfg.http.listen == "127.0.0.1:9464"
    assert cfg.commit.interval == 5.0
    assert cfg.commit.max_in_flight == 32
    assert cfg.commit.retry.max_attempts == 5
    assert cfg.commit.retry.initial_backoff == pytest.approx(0.2)
    assert cfg.commit.shutdown_timeout == 20.0
    assert cfg.commit.wait_timeout == 30.0
    assert cfg.commit.spread == 0.4
    assert cfg.state.fsync == "batch"
    assert cfg.state.fsync_interval == pytest.approx(0.1)
    assert cfg.sls.signature_version == "v1"
    assert cfg.groups[0].force_success is True
    assert cfg.log.level == "info" and cfg.log.format == "text"
    assert cfg.socket.max_connections == 1024
    assert cfg.socket.idle_timeout == 60.0
    assert cfg.socket.max_buffered_bytes == 64 * 1024 * 1024
    assert cfg.sls.allow_insecure_http is False
    assert cfg.groups[0].allowed_uids == ()
    assert cfg.groups[0].max_shards == 100_000


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (5, 5.0),
        (1.5, 1.5),
        ("250ms", 0.25),
        ("1.5s", 1.5),
        ("2m", 120.0),
        ("1h", 3600.0),
        ("7", 7.0),
    ],
)
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad", [0, "0s", -1, "5 minutes", "", True, "1d", [1], "nan", 10**400, "1" * 400 + "s"]
)
def test_bad_durations(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


def test_bad_duration_is_reported_with_its_path() -> None:
    assert problems_of(minimal(commit={"interval": "0ms"})) == [
        "commit.interval: must be greater than 0"
    ]


@pytest.mark.parametrize(("value", "mode"), [("0660", 0o660), ("0600", 0o600), (0o640, 0o640)])
def test_modes(value: object, mode: int) -> None:
    assert parse_mode(value) == mode


def test_unquoted_yaml_octal_mode() -> None:
    data = yaml.safe_load("mode: 0660")
    assert parse_mode(data["mode"]) == 0o660


@pytest.mark.parametrize("bad", ["rw-rw----", "0999", 0o7777, True, "8"])
def test_bad_modes(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_mode(bad)


def test_env_substitution_after_parsing_keeps_any_character() -> None:
    data = minimal()
    data["sls"]["access_key_secret"] = "${MY_SECRET}"
    data["sls"]["region"] = "${REGION:-cn-shanghai}"
    cfg = parse_config(data, {"MY_SECRET": NASTY_SECRET})
    assert cfg.sls.access_key_secret == NASTY_SECRET
    assert cfg.sls.region == "cn-shanghai"


def test_secret_with_yaml_special_characters_in_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            sls:
              endpoint: example.com
              access_key_id: id
              access_key_secret: ${SECRET}
            groups:
              - {name: g, project: p, logstore: l, consumer_group: c}
            """
        )
    )
    cfg = load_config(path, {"SECRET": NASTY_SECRET})
    assert cfg.sls.access_key_secret == NASTY_SECRET
    path.write_text(path.read_text().replace("${SECRET}", "'x#y: \"z'"))
    assert load_config(path, {}).sls.access_key_secret == 'x#y: "z'


def test_unset_variable_without_default_is_a_problem() -> None:
    data = minimal()
    data["groups"][0]["project"] = "${PROJECT}"
    assert "groups[0].project: environment variable PROJECT is not set" in problems_of(data)


def test_set_but_empty_variable_is_used() -> None:
    data = minimal()
    data["groups"][0]["consumer"] = "${WHO}"
    assert parse_config(data, {"WHO": ""}).groups[0].consumer is None


def test_credentials_from_the_environment_when_absent() -> None:
    data = minimal()
    del data["sls"]["access_key_id"], data["sls"]["access_key_secret"]
    cfg = parse_config(data, {**KEYS, "ALIBABA_CLOUD_SECURITY_TOKEN": "tok"})
    assert (cfg.sls.access_key_id, cfg.sls.access_key_secret) == ("env-id", "env-secret")
    assert cfg.sls.security_token == "tok"


def test_no_credentials_at_all_is_a_problem_for_static_keys() -> None:
    data = minimal()
    del data["sls"]["access_key_id"], data["sls"]["access_key_secret"]
    data["sls"]["credentials"] = "static"
    [problem] = problems_of(data)
    assert problem.startswith("sls.access_key_id: no credentials")


def test_no_keys_is_valid_with_auto_a_platform_may_provide_them() -> None:
    data = minimal()
    del data["sls"]["access_key_id"], data["sls"]["access_key_secret"]
    assert parse_config(data, {}).sls.credentials == "auto"


def test_credentials_file_replaces_keys(tmp_path: Path) -> None:
    creds = tmp_path / "sts.json"
    creds.write_text(json.dumps({"AccessKeyId": "i", "AccessKeySecret": "s", "SecurityToken": "t"}))
    data = minimal(sls={"endpoint": "e.com", "credentials_file": str(creds)})
    assert parse_config(data, {}).sls.credentials_file == str(creds)
    assert load_credentials_file(creds).security_token == "t"
    creds.write_text(json.dumps({"access_key_id": "i2", "access_key_secret": "s2"}))
    assert load_credentials_file(creds).access_key_id == "i2"


def test_broken_credentials_file_is_a_problem_without_secrets(tmp_path: Path) -> None:
    creds = tmp_path / "sts.json"
    creds.write_text('{"AccessKeyId": "i", "AccessKeySecret": "hunter2"')
    [problem] = problems_of(minimal(sls={"endpoint": "e.com", "credentials_file": str(creds)}))
    assert problem.startswith("sls.credentials_file:") and "hunter2" not in problem
    missing = str(tmp_path / "nope.json")
    [problem] = problems_of(minimal(sls={"endpoint": "e.com", "credentials_file": missing}))
    assert "cannot read" in problem


def test_unknown_keys_everywhere_reported_together() -> None:
    data = minimal(extra=1, commit={"retry": {"tries": 3}})
    data["groups"][0]["colour"] = "red"
    data["sls"]["endpiont"] = "x"
    assert sorted(problems_of(data)) == [
        "commit.retry.tries: unknown key",
        "extra: unknown key",
        "groups[0].colour: unknown key",
        "sls.endpiont: unknown key",
    ]


def test_required_group_fields_with_dotted_paths() -> None:
    data = minimal(groups=[{"project": "p"}, {"name": "b", "project": "", "logstore": 3}])
    problems = problems_of(data)
    assert "groups[0].name: required" in problems
    assert "groups[0].consumer_group: required" in problems
    assert "groups[1].project: must be a non-empty string" in problems
    assert "groups[1].logstore: must be a non-empty string" in problems


def test_groups_required_and_unique() -> None:
    assert problems_of(minimal(groups=[])) == [
        "groups: required: a non-empty list of consumer groups"
    ]
    group = {"name": "g", "project": "p", "logstore": "l", "consumer_group": "c"}
    assert problems_of(minimal(groups=[group, group])) == [
        "groups[1].name: duplicate group name 'g'"
    ]


def test_force_success_false_needs_a_consumer() -> None:
    data = minimal()
    data["groups"][0]["force_success"] = False
    assert problems_of(data) == [
        "groups[0].force_success: false needs a consumer (SLS refuses it otherwise)"
    ]
    data["groups"][0]["consumer"] = "c1"
    assert parse_config(data, {}).groups[0].force_success is False


def test_per_group_overrides() -> None:
    data = minimal()
    data["groups"][0].update(interval="250ms", endpoint="https://other:8443", region="cn-beijing")
    cfg = parse_config(data, {})
    group = cfg.groups[0]
    assert cfg.interval_for(group) == pytest.approx(0.25)
    assert (group.endpoint, group.region) == ("https://other:8443", "cn-beijing")


def test_v4_needs_a_region() -> None:
    data = minimal()
    data["sls"]["signature_version"] = "v4"
    assert problems_of(data) == [
        "groups[0].region: signature v4 needs sls.region or a group region"
    ]
    data["sls"]["region"] = "cn-hangzhou"
    assert parse_config(data, {}).sls.signature_version == "v4"


@pytest.mark.parametrize(
    ("section", "key", "value", "message"),
    [
        ("sls", "endpoint", "ftp://host", "sls.endpoint: scheme must be http or https"),
        ("sls", "endpoint", "http://[::1]:80", "sls.endpoint: bad host name"),
        ("sls", "endpoint", "host/path", "sls.endpoint: only scheme, host and port"),
        ("sls", "signature_version", "v2", "sls.signature_version: must be one of v1, v4"),
        ("http", "listen", "9464", 'http.listen: must be host:port (port 0-65535) or ""'),
        ("http", "shard_metrics", "yes", "http.shard_metrics: must be true or false"),
        ("socket", "allowed_uids", [0, "x"], "socket.allowed_uids: must be a list of user ids"),
        ("socket", "max_line_bytes", 10, "socket.max_line_bytes: must be an integer >= 256"),
        ("socket", "max_connections", 0, "socket.max_connections: must be an integer >= 1"),
        ("socket", "idle_timeout", "0s", "socket.idle_timeout: must be greater than 0"),
        ("socket", "max_buffered_bytes", True, "socket.max_buffered_bytes: must be an integer"),
        ("socket", "max_buffered_bytes", 1000, "socket.max_buffered_bytes: must be at least"),
        ("sls", "allow_insecure_http", "yes", "sls.allow_insecure_http: must be true or false"),
        ("commit", "max_in_flight", 0, "commit.max_in_flight: must be an integer >= 1"),
        ("commit", "spread", 1.5, "commit.spread: must be a number from 0 to 1"),
        ("commit", "spread", "half", "commit.spread: must be a number from 0 to 1"),
        ("commit", "spread", True, "commit.spread: must be a number from 0 to 1"),
        ("state", "fsync", "sometimes", "state.fsync: must be one of always, batch, never"),
        ("log", "format", "xml", "log.format: must be one of text, json"),
        ("log", "level", "loud", "log.level: must be one of debug, info, warning, error"),
    ],
)
def test_bad_values(section: str, key: str, value: object, message: str) -> None:
    data = minimal()
    data.setdefault(section, {})[key] = value
    [problem] = problems_of(data)
    assert problem.startswith(message)


def test_socket_limits_are_read() -> None:
    socket = {"max_connections": 50, "idle_timeout": "250ms", "max_buffered_bytes": 2**20}
    cfg = parse_config(minimal(socket=socket), {})
    assert cfg.socket.max_connections == 50
    assert cfg.socket.idle_timeout == pytest.approx(0.25)
    assert cfg.socket.max_buffered_bytes == 2**20


def test_group_access_and_shard_limit() -> None:
    data = minimal()
    data["groups"][0].update(allowed_uids=[1000, 0], max_shards=64)
    group = parse_config(data, {}).groups[0]
    assert (group.allowed_uids, group.max_shards) == ((1000, 0), 64)
    assert group.allows(1000) and group.allows(0)
    assert not group.allows(1001) and not group.allows(None)
    assert parse_config(minimal(), {}).groups[0].allows(None)  # empty list: everyone


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (
            "allowed_uids",
            [-1],
            "groups[0].allowed_uids: must be a list of user ids (integers >= 0)",
        ),
        (
            "allowed_uids",
            1000,
            "groups[0].allowed_uids: must be a list of user ids (integers >= 0)",
        ),
        ("max_shards", 0, "groups[0].max_shards: must be an integer >= 1"),
        ("max_shards", "10", "groups[0].max_shards: must be an integer >= 1"),
    ],
)
def test_bad_group_access_and_shard_limit(key: str, value: object, message: str) -> None:
    data = minimal()
    data["groups"][0][key] = value
    assert problems_of(data) == [message]


@pytest.mark.parametrize("name", ["pod-a-1", "a", "x" * 128, "svc.ns@node:7_b", "A-Z.a_z@0:9"])
def test_group_consumer_names_that_follow_the_rule(name: str) -> None:
    data = minimal()
    data["groups"][0]["consumer"] = name
    assert parse_config(data, {}).groups[0].consumer == name


@pytest.mark.parametrize("name", ["x" * 129, "pod a", "pod/1", "naïve", "a\nb", "c#1"])
def test_group_consumer_names_that_break_the_rule(name: str) -> None:
    data = minimal()
    data["groups"][0]["consumer"] = name
    [problem] = problems_of(data)
    assert problem.startswith("groups[0].consumer: must be 1-128 characters")


@pytest.mark.parametrize(
    "endpoint",
    ["http://127.0.0.1:8080", "http://localhost", "http://127.5.6.7", "https://example.com", "a.b"],
)
def test_loopback_or_https_endpoints_need_no_opt_in(endpoint: str) -> None:
    assert parse_config(minimal(sls={**minimal()["sls"], "endpoint": endpoint}), {})


def test_http_to_a_remote_host_is_a_problem_unless_allowed() -> None:
    data = minimal()
    data["sls"]["endpoint"] = "http://cn-hangzhou.log.aliyuncs.com"
    data["groups"][0]["endpoint"] = "http://10.0.0.7:80"
    problems = problems_of(data)
    assert [p.split(":")[0] for p in problems] == ["sls.endpoint", "groups[0].endpoint"]
    assert all("sends credentials in clear text" in p for p in problems)
    assert all("allow_insecure_http" in p for p in problems)
    data["sls"]["allow_insecure_http"] = True
    assert parse_config(data, {}).sls.allow_insecure_http is True


def test_http_listen_can_be_disabled_and_ipv6() -> None:
    assert parse_config(minimal(http={"listen": ""}), {}).http.listen == ""
    assert parse_config(minimal(http={"listen": "[::1]:9000"}), {}).http.listen == "[::1]:9000"


def test_backoff_bounds() -> None:
    data = minimal(commit={"retry": {"initial_backoff": "20s", "max_backoff": "1s"}})
    assert problems_of(data) == ["commit.retry.initial_backoff: must not exceed max_backoff"]


def test_not_a_mapping() -> None:
    assert "<top>: must be a mapping" in problems_of(["a"])


def test_invalid_yaml_does_not_echo_the_line(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("sls:\n  access_key_secret: 'hunter2\n  x: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, {})
    [problem] = info.value.problems
    assert "invalid YAML" in problem and "hunter2" not in problem


def test_shipped_example_covers_every_key() -> None:
    cfg = load_config(REPO / "config" / "cpmgr.example.yaml", KEYS)
    text = (REPO / "config" / "cpmgr.example.yaml").read_text()
    for key in _all_keys(yaml.safe_load(render_effective(cfg))):
        assert f"{key}:" in text, f"{key} missing from cpmgr.example.yaml"


def _all_keys(node: object) -> set[str]:
    if isinstance(node, dict):
        return set(node) | {k for v in node.values() for k in _all_keys(v)}
    if isinstance(node, list):
        return {k for v in node for k in _all_keys(v)}
    return set()


def test_shipped_local_config_loads() -> None:
    cfg: Config = load_config(REPO / "config" / "local.yaml", {})
    assert cfg.sls.endpoint.startswith("http://127.0.0.1:")
    assert {g.name for g in cfg.groups} == {"orders", "payments", "clicks"}
    assert [g.name for g in cfg.groups if g.membership is not None] == ["clicks"]  # make run's


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cpmgr", *args],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", **(env or {})},
        check=False,
        cwd=REPO,
    )


def test_check_config_prints_effective_config_with_secrets_masked(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    data = minimal()
    data["sls"]["access_key_secret"] = "${SECRET}"
    data["sls"]["security_token"] = "tok-en"
    path.write_text(yaml.safe_dump(data))
    result = _cli("check-config", "--config", str(path), env={"SECRET": NASTY_SECRET})
    assert result.returncode == 0, result.stderr
    effective = yaml.safe_load(result.stdout)
    assert effective["sls"]["access_key_secret"] == "***"
    assert effective["sls"]["security_token"] == "***"
    assert NASTY_SECRET not in result.stdout and "tok-en" not in result.stdout
    assert effective["commit"]["interval"] == 5.0
    assert effective["socket"]["max_connections"] == 1024
    assert effective["socket"]["idle_timeout"] == 60.0
    assert effective["socket"]["max_buffered_bytes"] == 64 * 1024 * 1024
    assert effective["sls"]["allow_insecure_http"] is False
    assert effective["groups"][0]["allowed_uids"] == []
    assert effective["groups"][0]["max_shards"] == 100_000


def test_check_config_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(minimal(extra=1, commit={"interval": "-1s"})))
    result = _cli("check-config", "-c", str(path))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == [
        "commit.interval: must be a duration like 5s, 250ms or 2m",
        "extra: unknown key",
    ]
    assert "Traceback" not in result.stderr


def test_check_config_missing_file_is_one_line() -> None:
    result = _cli("check-config", "-c", "/nonexistent/cpmgr.yaml")
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1


def test_version() -> None:
    result = _cli("--version")
    assert result.returncode == 0 and result.stdout.startswith("cpmgr ")
