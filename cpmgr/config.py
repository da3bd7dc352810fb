"""Configuration: YAML in, frozen dataclasses out; every problem named by its dotted path."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, TypeVar, cast
from urllib.parse import urlsplit

import yaml

from cpmgr.errors import ConfigError
from cpmgr.sls import endpoint as sls_endpoint
from cpmgr.sls.credentials import file as credentials_file
from cpmgr.sls.credentials.keys import CredentialsFetchError
from cpmgr.sls.signer import Credentials

SignatureVersion = Literal["v1", "v4"]
FsyncPolicy = Literal["always", "batch", "never"]
LogFormat = Literal["text", "json"]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

DEFAULT_SOCKET_PATH = "/run/cpmgr/cpmgr.sock"
SECRET_MASK = "***"
ENV_KEY_ID = "ALIBABA_CLOUD_ACCESS_KEY_ID"
ENV_KEY_SECRET = "ALIBABA_CLOUD_ACCESS_KEY_SECRET"
ENV_TOKEN = "ALIBABA_CLOUD_SECURITY_TOKEN"
# Set by ACK's pod identity webhook (RRSA) and read by Alibaba Cloud's credential SDKs.
ENV_ROLE_ARN = "ALIBABA_CLOUD_ROLE_ARN"
ENV_OIDC_PROVIDER_ARN = "ALIBABA_CLOUD_OIDC_PROVIDER_ARN"
ENV_OIDC_TOKEN_FILE = "ALIBABA_CLOUD_OIDC_TOKEN_FILE"
ENV_ROLE_SESSION_NAME = "ALIBABA_CLOUD_ROLE_SESSION_NAME"
ENV_STS_ENDPOINT = "ALIBABA_CLOUD_STS_ENDPOINT"
ENV_STS_REGION = "ALIBABA_CLOUD_STS_REGION"
ENV_VPC_ENDPOINT_ENABLED = "ALIBABA_CLOUD_VPC_ENDPOINT_ENABLED"
ENV_ECS_ROLE_NAME = "ALIBABA_CLOUD_ECS_METADATA"
ENV_CREDENTIALS_URI = "ALIBABA_CLOUD_CREDENTIALS_URI"

CredentialsSource = Literal["auto", "static", "file", "oidc", "ecs_ram_role", "uri"]
CREDENTIALS_SOURCES: tuple[str, ...] = ("auto", "static", "file", "oidc", "ecs_ram_role", "uri")
DEFAULT_STS_ENDPOINT = "sts.aliyuncs.com"
DEFAULT_METADATA_ENDPOINT = "http://100.100.100.200"
# STS refuses DurationSeconds outside this range.
OIDC_DURATION_RANGE = (900.0, 43200.0)


@dataclass(frozen=True)
class SocketConfig:
    path: str = DEFAULT_SOCKET_PATH
    mode: int = 0o660
    allowed_uids: tuple[int, ...] = ()
    max_line_bytes: int = 1_048_576
    max_connections: int = 1024
    idle_timeout: float = 60.0
    max_buffered_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True)
class HttpConfig:
    listen: str = "127.0.0.1:9464"
    shard_metrics: bool = False


@dataclass(frozen=True)
class OIDCConfig:
    """`sls.oidc`: AssumeRoleWithOIDC (ACK RRSA); unset fields come from the webhook's variables."""

    role_arn: str | None = None
    provider_arn: str | None = None
    token_file: str | None = None
    session_name: str = "cpmgr"
    duration: float = 3600.0
    sts_endpoint: str = DEFAULT_STS_ENDPOINT

    @property
    def complete(self) -> bool:
        return bool(self.role_arn and self.provider_arn and self.token_file)


@dataclass(frozen=True)
class EcsRamRoleConfig:
    """`sls.ecs_ram_role`: the ECS instance RAM role through the metadata service."""

    role_name: str | None = None
    metadata_endpoint: str = DEFAULT_METADATA_ENDPOINT


@dataclass(frozen=True)
class SLSConfig:
    endpoint: str
    access_key_id: str = ""
    access_key_secret: str = field(default="", repr=False)
    security_token: str = field(default="", repr=False)
    credentials_file: str | None = None
    signature_version: SignatureVersion = "v1"
    allow_insecure_http: bool = False
    region: str | None = None
    credentials: CredentialsSource = "auto"
    oidc: OIDCConfig = OIDCConfig()
    ecs_ram_role: EcsRamRoleConfig = EcsRamRoleConfig()
    credentials_uri: str | None = None

    @property
    def static_credentials(self) -> Credentials:
        return Credentials(self.access_key_id, self.access_key_secret, self.security_token)

    @property
    def has_static_keys(self) -> bool:
        return bool(self.access_key_id and self.access_key_secret)

    @property
    def credentials_settings(self) -> tuple[object, ...]:
        """Everything that decides where keys come from: a reload that changes none of it keeps
        the running keys."""
        return (
            self.credentials,
            self.static_credentials,
            self.credentials_file,
            self.oidc,
            self.ecs_ram_role,
            self.credentials_uri,
            self.allow_insecure_http,
        )


@dataclass(frozen=True)
class RetryConfig:
    max_attempts: int = 5
    initial_backoff: float = 0.2
    max_backoff: float = 10.0


@dataclass(frozen=True)
class CommitConfig:
    interval: float = 5.0
    max_in_flight: int = 32
    request_timeout: float = 5.0
    retry: RetryConfig = RetryConfig()
    shutdown_timeout: float = 20.0
    wait_timeout: float = 30.0
    spread: float = 0.4
    """A timer cycle of more shards than `max_in_flight` starts them evenly over this share of
    the interval; 0 sends them as fast as `max_in_flight` allows."""


@dataclass(frozen=True)
class StateConfig:
    dir: str | None = None
    fsync: FsyncPolicy = "batch"
    fsync_interval: float = 0.1


@dataclass(frozen=True)
class LogConfig:
    level: LogLevel = "info"
    format: LogFormat = "text"


@dataclass(frozen=True)
class LagConfig:
    """The `lag:` block (docs/configuration.md); `interval` 0 disables lag reading."""

    interval: float = 30.0
    lagging_after: float = 60.0
    stall_after: float = 300.0


START_POSITIONS: tuple[str, ...] = ("begin", "end")


@dataclass(frozen=True)
class MembershipConfig:
    """A `membership:` block: cpmgr heartbeats, assigns and hands over shards for its members."""

    heartbeat_interval: float = 5.0
    timeout: int = 60
    create: bool = False
    order: bool = False
    release_timeout: float = 10.0
    # "begin", "end", or an RFC 3339 time as written (see `start_time`).
    start: str = "begin"

    @property
    def start_from(self) -> Literal["begin", "end"] | int:
        """GetCursor's `from`: begin, end, or the start time in unix seconds."""
        if self.start == "begin":
            return "begin"
        if self.start == "end":
            return "end"
        return int(parse_time(self.start))


@dataclass(frozen=True)
class GroupConfig:
    name: str
    project: str
    logstore: str
    consumer_group: str
    consumer: str | None = None
    force_success: bool = True
    interval: float | None = None
    endpoint: str | None = None
    region: str | None = None
    allowed_uids: tuple[int, ...] = ()
    max_shards: int = 100_000
    membership: MembershipConfig | None = None

    def allows(self, uid: int | None) -> bool:
        """Whether a peer with this uid (None: unknown) may use the group."""
        return not self.allowed_uids or (uid is not None and uid in self.allowed_uids)


@dataclass(frozen=True, kw_only=True)
class Config:
    socket: SocketConfig = SocketConfig()
    http: HttpConfig = HttpConfig()
    sls: SLSConfig
    commit: CommitConfig = CommitConfig()
    state: StateConfig = StateConfig()
    log: LogConfig = LogConfig()
    lag: LagConfig = LagConfig()
    groups: tuple[GroupConfig, ...]

    def group(self, name: str) -> GroupConfig | None:
        return next((g for g in self.groups if g.name == name), None)

    def interval_for(self, group: GroupConfig) -> float:
        return group.interval if group.interval is not None else self.commit.interval


# --------------------------------------------------------------------------------------------
# ${VAR} and ${VAR:-default}, applied to string values after YAML parsing.

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def _substitute(value: str, env: Mapping[str, str], path: str, problems: list[str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(f"{path}: environment variable {name} is not set")
        return ""

    return _ENV_REF.sub(replace, value)


def _expand(node: object, env: Mapping[str, str], path: str, problems: list[str]) -> object:
    if isinstance(node, str):
        return _substitute(node, env, path, problems)
    if isinstance(node, dict):
        return {k: _expand(v, env, _join(path, str(k)), problems) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand(v, env, f"{path}[{i}]", problems) for i, v in enumerate(node)]
    return node


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------------------------
# Scalar parsers: each returns the value or raises ValueError with a short reason.

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?|\.\d+)\s*(ms|s|m|h)?\s*$")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


def parse_duration(value: object) -> float:
    """Seconds from a number or `<number><unit>` (ms, s, m, h); must be > 0."""
    if isinstance(value, bool):
        raise ValueError("must be a duration like 5s, 250ms or 2m")
    try:
        if isinstance(value, int | float):
            seconds = float(value)
        elif isinstance(value, str) and (match := _DURATION.match(value)):
            seconds = float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        else:
            raise ValueError("must be a duration like 5s, 250ms or 2m")
    except OverflowError:
        raise ValueError("is too large") from None
    if math.isnan(seconds) or seconds <= 0:
        raise ValueError("must be greater than 0")
    if math.isinf(seconds):
        raise ValueError("is too large")
    return seconds


def parse_duration_or_zero(value: object) -> float:
    """A duration as `parse_duration`, or zero (`0`, `0s`, `0ms`...): `lag.interval` 0 disables."""
    try:
        return parse_duration(value)
    except ValueError as exc:
        zero = isinstance(value, str) or (isinstance(value, int | float) and value == 0)
        if str(exc) != "must be greater than 0" or not zero:
            raise
        return 0.0


def parse_mode(value: object) -> int:
    """A permission mode: an octal string ("0660") or an int (YAML reads 0660 as octal)."""
    if isinstance(value, bool):
        raise ValueError('must be an octal mode like "0660"')
    if isinstance(value, int):
        mode = value
    elif isinstance(value, str) and re.fullmatch(r"0?o?[0-7]{1,4}", value.strip()):
        mode = int(value.strip().replace("o", ""), 8)
    else:
        raise ValueError('must be an octal mode like "0660"')
    if not 0 <= mode <= 0o777:
        raise ValueError("must be between 0000 and 0777")
    return mode


def parse_listen(value: object) -> str:
    """`host:port` (IPv6 as `[::1]:port`), or "" to disable."""
    if value is None or value == "":
        return ""
    if not isinstance(value, str):
        raise ValueError('must be host:port or ""')
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError('must be host:port (port 0-65535) or ""')
    return value


def parse_time(value: object) -> float:
    """Unix seconds from an RFC 3339 time with its offset (`2026-01-02T03:04:05Z`)."""
    if not isinstance(value, str):
        raise ValueError("must be begin, end or an RFC 3339 time like 2026-01-02T03:04:05Z")
    text = value.strip()
    try:
        moment = datetime.fromisoformat(text[:-1] + "+00:00" if text[-1:] in "Zz" else text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None or "T" not in text.upper():
        raise ValueError("must be begin, end or an RFC 3339 time like 2026-01-02T03:04:05Z")
    return moment.timestamp()


def parse_start(value: object) -> str:
    """`membership.start`: begin, end or an RFC 3339 time (kept as written)."""
    if isinstance(value, str) and value.strip().lower() in START_POSITIONS:
        return value.strip().lower()
    parse_time(value)
    assert isinstance(value, str)
    return value.strip()


def parse_whole_seconds(value: object) -> int:
    """A duration of whole seconds >= 1 (SLS takes the group timeout as an integer)."""
    seconds = parse_duration(value)
    if seconds < 1 or seconds != int(seconds):
        raise ValueError("must be a whole number of seconds >= 1")
    return int(seconds)


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def parse_endpoint(value: object) -> str:
    """An endpoint (SLS, or a credentials service) as the client will use it: host[:port],
    optionally with http:// or https://; the text is kept as written."""
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty host[:port], optionally with http:// or https://")
    try:
        sls_endpoint.parse_endpoint(value)
    except ValueError as exc:
        raise ValueError(str(exc).replace(f"invalid endpoint {value!r}: ", "")) from None
    return value.strip()


# --------------------------------------------------------------------------------------------
# A reader for one mapping: typed getters that record problems instead of raising, and a
# check for keys nobody asked for.

T = TypeVar("T")


class _Section:
    def __init__(self, node: object, path: str, problems: list[str]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        if node is None:
            node = {}
        if not isinstance(node, dict):
            problems.append(f"{path or '<top>'}: must be a mapping")
            node = {}
        self.node: dict[Any, Any] = node

    def where(self, key: str) -> str:
        return _join(self.path, key)

    def problem(self, key: str, message: str) -> None:
        self.problems.append(f"{self.where(key)}: {message}")

    def has(self, key: str) -> bool:
        return self.node.get(key) is not None

    def raw(self, key: str) -> object:
        self.seen.add(key)
        return self.node.get(key)

    def get(self, key: str, parse: Callable[[object], T], default: T) -> T:
        value = self.raw(key)
        if value is None:
            return default
        try:
            return parse(value)
        except ValueError as exc:
            self.problem(key, str(exc))
            return default

    def required(self, key: str, parse: Callable[[object], str]) -> str:
        if not self.has(key):
            self.seen.add(key)
            self.problem(key, "required")
            return ""
        return self.get(key, parse, "")

    def section(self, key: str) -> _Section:
        return _Section(self.raw(key), self.where(key), self.problems)

    def finish(self) -> None:
        for key in self.node:
            if key not in self.seen:
                self.problems.append(f"{self.where(str(key))}: unknown key")


def _string(value: object) -> str:
    if not isinstance(value, str):
        raise ValueError("must be a string")
    return value


def _non_empty(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("must be a non-empty string")
    return value


def _boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("must be true or false")
    return value


def _positive_int(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("must be an integer >= 1")
    return value


def _share(value: object) -> float:
    """A share from 0 to 1 (an integer 0 or 1 counts too)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
        raise ValueError("must be a number from 0 to 1")
    return float(value)


def _min_int(minimum: int) -> Callable[[object], int]:
    def parse(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise ValueError(f"must be an integer >= {minimum}")
        return value

    return parse


def _uids(value: object) -> tuple[int, ...]:
    if not isinstance(value, list) or any(
        isinstance(u, bool) or not isinstance(u, int) or u < 0 for u in value
    ):
        raise ValueError("must be a list of user ids (integers >= 0)")
    return tuple(value)


def _choice(*options: str) -> Callable[[object], Any]:
    def parse(value: object) -> str:
        text = value.strip().lower() if isinstance(value, str) else None
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def _optional_string(value: object) -> str | None:
    text = _string(value)
    return text or None


_CONSUMER_NAME = re.compile(r"[A-Za-z0-9._@:-]{1,128}")


def _consumer_name(value: object) -> str | None:
    # "" keeps meaning "no default consumer"; anything else follows the socket's name rule.
    text = _string(value)
    if text and not _CONSUMER_NAME.fullmatch(text):
        raise ValueError("must be 1-128 characters of A-Z a-z 0-9 . _ @ : -")
    return text or None


# --------------------------------------------------------------------------------------------
# Sections.


def _read_socket(s: _Section) -> SocketConfig:
    d = SocketConfig()
    cfg = SocketConfig(
        path=s.get("path", _non_empty, d.path),
        mode=s.get("mode", parse_mode, d.mode),
        allowed_uids=s.get("allowed_uids", _uids, d.allowed_uids),
        max_line_bytes=s.get("max_line_bytes", _min_int(256), d.max_line_bytes),
        max_connections=s.get("max_connections", _positive_int, d.max_connections),
        idle_timeout=s.get("idle_timeout", parse_duration, d.idle_timeout),
        max_buffered_bytes=s.get("max_buffered_bytes", _positive_int, d.max_buffered_bytes),
    )
    if len(cfg.path.encode()) > 107:
        s.problem("path", "too long for a Unix socket (at most 107 bytes)")
    if cfg.max_buffered_bytes < cfg.max_line_bytes:
        s.problem("max_buffered_bytes", "must be at least max_line_bytes")
    s.finish()
    return cfg


def _read_http(s: _Section) -> HttpConfig:
    d = HttpConfig()
    listen = d.listen if "listen" not in s.node else s.get("listen", parse_listen, d.listen)
    cfg = HttpConfig(listen=listen, shard_metrics=s.get("shard_metrics", _boolean, False))
    s.finish()
    return cfg


def _credential(s: _Section, key: str, env_name: str, env: Mapping[str, str]) -> str:
    value = s.get(key, _string, "")
    return value or env.get(env_name, "")


def _read_sls(s: _Section, env: Mapping[str, str]) -> SLSConfig:
    cfg = SLSConfig(
        endpoint=s.required("endpoint", parse_endpoint),
        access_key_id=_credential(s, "access_key_id", ENV_KEY_ID, env),
        access_key_secret=_credential(s, "access_key_secret", ENV_KEY_SECRET, env),
        security_token=_credential(s, "security_token", ENV_TOKEN, env),
        credentials_file=s.get("credentials_file", _optional_string, None),
        signature_version=s.get("signature_version", _choice("v1", "v4"), "v1"),
        allow_insecure_http=s.get("allow_insecure_http", _boolean, False),
        region=s.get("region", _optional_string, None),
        credentials=s.get("credentials", _choice(*CREDENTIALS_SOURCES), "auto"),
        oidc=_read_oidc(s.section("oidc"), env),
        ecs_ram_role=_read_ecs_ram_role(s.section("ecs_ram_role"), env),
        credentials_uri=s.get("credentials_uri", _optional_string, None)
        or env.get(ENV_CREDENTIALS_URI)
        or None,
    )
    _check_credentials_source(s, cfg)
    s.finish()
    return cfg


def _check_credentials_source(s: _Section, cfg: SLSConfig) -> None:
    """What the chosen source needs; `auto` needs nothing (a platform may provide keys)."""
    source = cfg.credentials
    if cfg.credentials_file and source in ("auto", "file"):
        try:
            load_credentials_file(cfg.credentials_file)
        except ValueError as exc:
            s.problem("credentials_file", str(exc))
    if source == "file" and not cfg.credentials_file:
        s.problem("credentials_file", "required with credentials: file")
    if source == "static" and not cfg.has_static_keys:
        s.problems.append(
            f"{s.where('access_key_id')}: no credentials: set sls.access_key_id and "
            f"sls.access_key_secret, or {ENV_KEY_ID} and {ENV_KEY_SECRET}"
        )
    if source == "oidc":
        for key, variable in (
            ("role_arn", ENV_ROLE_ARN),
            ("provider_arn", ENV_OIDC_PROVIDER_ARN),
            ("token_file", ENV_OIDC_TOKEN_FILE),
        ):
            if not getattr(cfg.oidc, key):
                s.problem(f"oidc.{key}", f"required with credentials: oidc (or set {variable})")
    if source == "uri" and not cfg.credentials_uri:
        s.problem(
            "credentials_uri", f"required with credentials: uri (or set {ENV_CREDENTIALS_URI})"
        )


def _default_sts_endpoint(env: Mapping[str, str]) -> str:
    """The webhook's endpoint, else the SDKs' choice: `sts[-vpc].<region>` or the global one."""
    if env.get(ENV_STS_ENDPOINT):
        return env[ENV_STS_ENDPOINT]
    region = env.get(ENV_STS_REGION)
    if not region:
        return DEFAULT_STS_ENDPOINT
    vpc = env.get(ENV_VPC_ENDPOINT_ENABLED, "").lower() == "true"
    return f"sts{'-vpc' if vpc else ''}.{region}.aliyuncs.com"


def _oidc_duration(value: object) -> float:
    seconds = parse_duration(value)
    low, high = OIDC_DURATION_RANGE
    if not low <= seconds <= high:
        raise ValueError(f"must be between {low:g}s and {high:g}s (STS refuses others)")
    return seconds


def _read_oidc(s: _Section, env: Mapping[str, str]) -> OIDCConfig:
    d = OIDCConfig()
    cfg = OIDCConfig(
        role_arn=s.get("role_arn", _optional_string, None) or env.get(ENV_ROLE_ARN) or None,
        provider_arn=s.get("provider_arn", _optional_string, None)
        or env.get(ENV_OIDC_PROVIDER_ARN)
        or None,
        token_file=s.get("token_file", _optional_string, None)
        or env.get(ENV_OIDC_TOKEN_FILE)
        or None,
        session_name=s.get("session_name", _non_empty, "")
        or env.get(ENV_ROLE_SESSION_NAME)
        or d.session_name,
        duration=s.get("duration", _oidc_duration, d.duration),
        sts_endpoint=s.get("sts_endpoint", parse_endpoint, "") or _default_sts_endpoint(env),
    )
    s.finish()
    return cfg


def _read_ecs_ram_role(s: _Section, env: Mapping[str, str]) -> EcsRamRoleConfig:
    d = EcsRamRoleConfig()
    cfg = EcsRamRoleConfig(
        role_name=s.get("role_name", _optional_string, None) or env.get(ENV_ECS_ROLE_NAME) or None,
        metadata_endpoint=s.get("metadata_endpoint", parse_endpoint, d.metadata_endpoint),
    )
    s.finish()
    return cfg


def _read_retry(s: _Section) -> RetryConfig:
    d = RetryConfig()
    cfg = RetryConfig(
        max_attempts=s.get("max_attempts", _positive_int, d.max_attempts),
        initial_backoff=s.get("initial_backoff", parse_duration, d.initial_backoff),
        max_backoff=s.get("max_backoff", parse_duration, d.max_backoff),
    )
    if cfg.initial_backoff > cfg.max_backoff:
        s.problem("initial_backoff", "must not exceed max_backoff")
    s.finish()
    return cfg


def _read_commit(s: _Section) -> CommitConfig:
    d = CommitConfig()
    cfg = CommitConfig(
        interval=s.get("interval", parse_duration, d.interval),
        max_in_flight=s.get("max_in_flight", _positive_int, d.max_in_flight),
        request_timeout=s.get("request_timeout", parse_duration, d.request_timeout),
        retry=_read_retry(s.section("retry")),
        shutdown_timeout=s.get("shutdown_timeout", parse_duration, d.shutdown_timeout),
        wait_timeout=s.get("wait_timeout", parse_duration, d.wait_timeout),
        spread=s.get("spread", _share, d.spread),
    )
    s.finish()
    return cfg


def _read_state(s: _Section) -> StateConfig:
    d = StateConfig()
    cfg = StateConfig(
        dir=s.get("dir", _optional_string, None),
        fsync=s.get("fsync", _choice("always", "batch", "never"), d.fsync),
        fsync_interval=s.get("fsync_interval", parse_duration, d.fsync_interval),
    )
    s.finish()
    return cfg


def _read_log(s: _Section) -> LogConfig:
    cfg = LogConfig(
        level=s.get("level", _choice("debug", "info", "warning", "error", "critical"), "info"),
        format=s.get("format", _choice("text", "json"), "text"),
    )
    s.finish()
    return cfg


def _read_lag(s: _Section) -> LagConfig:
    d = LagConfig()
    cfg = LagConfig(
        interval=s.get("interval", parse_duration_or_zero, d.interval),
        lagging_after=s.get("lagging_after", parse_duration, d.lagging_after),
        stall_after=s.get("stall_after", parse_duration, d.stall_after),
    )
    s.finish()
    return cfg


def _read_membership(s: _Section) -> MembershipConfig:
    d = MembershipConfig()
    cfg = MembershipConfig(
        heartbeat_interval=s.get("heartbeat_interval", parse_duration, d.heartbeat_interval),
        timeout=s.get("timeout", parse_whole_seconds, d.timeout),
        create=s.get("create", _boolean, d.create),
        order=s.get("order", _boolean, d.order),
        release_timeout=s.get("release_timeout", parse_duration, d.release_timeout),
        start=s.get("start", parse_start, d.start),
    )
    s.finish()
    return cfg


def _read_group(s: _Section) -> GroupConfig:
    membership = _read_membership(s.section("membership")) if s.has("membership") else None
    if membership is not None:
        # Each member names itself, and SLS must refuse a member that lost its shard.
        for key in ("consumer", "force_success"):
            if s.has(key):
                s.problem(key, "not allowed with membership: every member commits as itself")
    cfg = GroupConfig(
        name=s.required("name", _non_empty),
        project=s.required("project", _non_empty),
        logstore=s.required("logstore", _non_empty),
        consumer_group=s.required("consumer_group", _non_empty),
        consumer=s.get("consumer", _consumer_name, None),
        force_success=s.get("force_success", _boolean, True),
        interval=s.get("interval", parse_duration, None),
        endpoint=s.get("endpoint", parse_endpoint, None),
        region=s.get("region", _optional_string, None),
        allowed_uids=s.get("allowed_uids", _uids, ()),
        max_shards=s.get("max_shards", _positive_int, GroupConfig.max_shards),
        membership=membership,
    )
    if membership is not None:
        return replace(cfg, consumer=None, force_success=False)
    if not cfg.force_success and not cfg.consumer:
        s.problem("force_success", "false needs a consumer (SLS refuses it otherwise)")
    s.finish()
    return cfg


def _read_groups(node: object, problems: list[str]) -> tuple[GroupConfig, ...]:
    if not isinstance(node, list) or not node:
        problems.append("groups: required: a non-empty list of consumer groups")
        return ()
    groups = tuple(_read_group(_Section(g, f"groups[{i}]", problems)) for i, g in enumerate(node))
    seen: set[str] = set()
    for i, group in enumerate(groups):
        if group.name and group.name in seen:
            problems.append(f"groups[{i}].name: duplicate group name {group.name!r}")
        seen.add(group.name)
    _check_shared_consumer_groups(groups, problems)
    return groups


def _check_shared_consumer_groups(groups: tuple[GroupConfig, ...], problems: list[str]) -> None:
    # Two groups heartbeating one SLS consumer group would fight over its members' shards.
    first: dict[tuple[str, str, str, str | None], int] = {}
    for i, group in enumerate(groups):
        key = (group.project, group.logstore, group.consumer_group, group.endpoint)
        other = first.setdefault(key, i)
        if other != i and (group.membership or groups[other].membership):
            problems.append(
                f"groups[{i}].consumer_group: groups[{other}] names the same SLS consumer "
                "group; with membership each SLS consumer group may be configured once"
            )


def _check_membership_timing(cfg: Config, problems: list[str]) -> None:
    # A member must get two heartbeats through within SLS's timeout, or it loses its shards.
    for i, group in enumerate(cfg.groups):
        m = group.membership
        if m is not None and m.heartbeat_interval + cfg.commit.request_timeout >= m.timeout / 2:
            problems.append(
                f"groups[{i}].membership.heartbeat_interval: heartbeat_interval "
                f"({m.heartbeat_interval:g}s) + commit.request_timeout "
                f"({cfg.commit.request_timeout:g}s) must be less than timeout / 2 "
                f"({m.timeout / 2:g}s)"
            )


def _check_insecure_http(cfg: Config, problems: list[str]) -> None:
    # Every request carries a signature and, with STS, the security token: in clear text they
    # can be read (and the token replayed) by anyone on the path.
    if cfg.sls.allow_insecure_http:
        return
    endpoints: list[tuple[str, str | None]] = [("sls.endpoint", cfg.sls.endpoint)]
    endpoints += [(f"groups[{i}].endpoint", g.endpoint) for i, g in enumerate(cfg.groups)]
    endpoints.append(("sls.oidc.sts_endpoint", cfg.sls.oidc.sts_endpoint))
    for path, text in endpoints:
        if text and _insecure(text):
            problems.append(
                f"{path}: http:// to a host other than loopback sends credentials in clear "
                "text; use https, or set sls.allow_insecure_http: true"
            )
    uri = cfg.sls.credentials_uri
    if uri and _insecure_uri(uri):
        problems.append(
            "sls.credentials_uri: http:// to a host other than loopback receives credentials "
            "in clear text; use https, or set sls.allow_insecure_http: true"
        )


def with_scheme(text: str, default: str = "https") -> str:
    """`text` as a URL: `default://` prepended when it names no scheme."""
    text = text.strip()
    return text if "://" in text else f"{default}://{text}"


def _insecure_uri(uri: str) -> bool:
    parts = urlsplit(with_scheme(uri))
    return parts.scheme.lower() == "http" and not _is_loopback(parts.hostname or "")


def _check_credentials_uri(cfg: Config, problems: list[str]) -> None:
    uri = cfg.sls.credentials_uri
    if not uri:
        return
    try:
        parts = urlsplit(with_scheme(uri))
        valid = parts.port != 0 and parts.scheme.lower() in ("http", "https")
    except ValueError:
        valid = False
    if not valid or not parts.hostname:
        problems.append("sls.credentials_uri: must be a URL like https://host[:port]/path")


def _insecure(text: str) -> bool:
    try:
        endpoint = sls_endpoint.parse_endpoint(text)
    except ValueError:
        return False  # reported by the endpoint's own check
    return endpoint.scheme == "http" and not _is_loopback(endpoint.host)


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_regions(cfg: Config, problems: list[str]) -> None:
    if cfg.sls.signature_version != "v4" or cfg.sls.region:
        return
    for i, group in enumerate(cfg.groups):
        if not group.region:
            problems.append(f"groups[{i}].region: signature v4 needs sls.region or a group region")


def parse_config(data: object, env: Mapping[str, str] | None = None) -> Config:
    """Validate parsed YAML; raise ConfigError listing every problem."""
    env = os.environ if env is None else env
    problems: list[str] = []
    top = _Section(_expand(data, env, "", problems), "", problems)
    sls = _read_sls(top.section("sls"), env)
    cfg = Config(
        socket=_read_socket(top.section("socket")),
        http=_read_http(top.section("http")),
        sls=sls,
        commit=_read_commit(top.section("commit")),
        state=_read_state(top.section("state")),
        log=_read_log(top.section("log")),
        lag=_read_lag(top.section("lag")),
        groups=_read_groups(top.raw("groups"), problems),
    )
    top.finish()
    _check_regions(cfg, problems)
    _check_membership_timing(cfg, problems)
    _check_insecure_http(cfg, problems)
    _check_credentials_uri(cfg, problems)
    if problems:
        raise ConfigError(_unique(problems))
    return cfg


def _unique(problems: list[str]) -> list[str]:
    return list(dict.fromkeys(problems))


def load_config(path: str | Path, env: Mapping[str, str] | None = None) -> Config:
    """Read and validate a YAML config file; raise ConfigError listing every problem."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError([f"{path}: cannot read: {exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: invalid YAML: {_yaml_reason(exc)}"]) from exc
    return parse_config(data, env)


def _yaml_reason(exc: yaml.YAMLError) -> str:
    # str(exc) can quote the offending line, which may hold a secret: keep the position only.
    mark = getattr(exc, "problem_mark", None)
    problem = getattr(exc, "problem", None) or "cannot parse"
    return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark else problem


# --------------------------------------------------------------------------------------------
# Credentials file (STS rotation): JSON with AccessKeyId/AccessKeySecret/SecurityToken.


def load_credentials_file(path: str | Path) -> Credentials:
    """Credentials from a JSON file; ValueError (without any secret) if it is unusable."""
    try:
        return credentials_file.load_credentials_file(path).credentials
    except CredentialsFetchError as exc:
        raise ValueError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# The effective config, for `cpmgr check-config`.

_SECRET_FIELDS = frozenset({"access_key_secret", "security_token"})


def _plain(obj: object, key: str = "") -> object:
    if is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name), f.name) for f in fields(obj)}
    if isinstance(obj, tuple):
        return [_plain(item) for item in obj]
    if key in _SECRET_FIELDS and obj:
        return SECRET_MASK
    if key == "mode" and isinstance(obj, int):
        return f"{obj:04o}"
    if key == "credentials_uri" and isinstance(obj, str) and "?" in obj:
        # A credentials endpoint may authenticate its caller with a token in the query.
        return obj.partition("?")[0] + "?" + SECRET_MASK
    return obj


def render_effective(cfg: Config) -> str:
    """The effective config as YAML, secrets shown as ***."""
    data = cast(dict[str, Any], _plain(cfg))
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False)
