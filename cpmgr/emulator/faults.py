"""Fault injection for the emulator: rates, forced codes and latency, drawn from one seeded RNG."""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Literal

from cpmgr.errors import ConfigError

FaultKind = Literal["reset", "error"]

# The knobs POST /_emulator/faults accepts; anything else is refused so a typo is not ignored.
FAULT_FIELDS = ("error_rate", "throttle_rate", "reset_rate", "latency_ms", "force")
_RATE_FIELDS = ("error_rate", "throttle_rate", "reset_rate")
_GROUP_KEY_PARTS = 3


@dataclass(frozen=True)
class Fault:
    """One injected outcome: a dropped connection, or an SLS error answer."""

    kind: FaultKind
    status: int = 0
    code: str = ""
    message: str = ""


RESET = Fault("reset", code="Reset")
INTERNAL_ERROR = Fault("error", 500, "InternalServerError", "injected internal server error")
SERVER_BUSY = Fault("error", 503, "ServerBusy", "injected: the server is busy, please retry")
WRITE_QUOTA = Fault("error", 403, "WriteQuotaExceed", "injected: write quota exceeded")


@dataclass(frozen=True)
class Decision:
    """What to do with one request: an optional fault, and how long to wait before answering."""

    fault: Fault | None
    delay_seconds: float


def _empty_force() -> Mapping[str, tuple[int, str]]:
    return MappingProxyType({})


@dataclass(frozen=True)
class FaultSettings:
    """The fault knobs of CONTRACT.md section 6.

    The three rates partition one uniform draw, so each is the measured share of requests
    whatever the others are; their sum must not exceed 1.
    """

    error_rate: float = 0.0
    throttle_rate: float = 0.0
    reset_rate: float = 0.0
    latency_ms: tuple[float, float] = (0.0, 0.0)
    # "PROJECT/LOGSTORE/GROUP" -> (HTTP status, errorCode) answered to every request for it
    force: Mapping[str, tuple[int, str]] = field(default_factory=_empty_force)

    def __post_init__(self) -> None:
        problems = _rate_problems(self) + _latency_problems(self.latency_ms)
        if problems:
            raise ConfigError(problems)

    def merged(self, update: Mapping[str, object]) -> FaultSettings:
        """A copy with the fields of `update` (the admin endpoint's JSON) applied.

        `force` entries are merged one by one; a null value clears that group's entry.
        Raises ConfigError naming every bad field.
        """
        problems = [f"{name}: unknown field" for name in update if name not in FAULT_FIELDS]
        rates = {
            name: _rate(name, update[name], problems) for name in _RATE_FIELDS if name in update
        }
        latency = self.latency_ms
        if "latency_ms" in update:
            latency = _latency(update["latency_ms"], problems)
        force = self.force
        if "force" in update:
            force = _merged_force(self.force, update["force"], problems)
        if problems:
            raise ConfigError(problems)
        return FaultSettings(
            error_rate=rates.get("error_rate", self.error_rate),
            throttle_rate=rates.get("throttle_rate", self.throttle_rate),
            reset_rate=rates.get("reset_rate", self.reset_rate),
            latency_ms=latency,
            force=force,
        )

    def as_json(self) -> dict[str, object]:
        """The settings in the shape POST /_emulator/faults accepts."""
        return {
            "error_rate": self.error_rate,
            "throttle_rate": self.throttle_rate,
            "reset_rate": self.reset_rate,
            "latency_ms": list(self.latency_ms),
            "force": {key: [status, code] for key, (status, code) in sorted(self.force.items())},
        }


def _number(value: object) -> float | None:
    """`value` as a finite float, or None for anything else (bools included)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    return number if math.isfinite(number) else None


def _rate(name: str, value: object, problems: list[str]) -> float:
    number = _number(value)
    if number is None or not 0.0 <= number <= 1.0:
        problems.append(f"{name}: must be a number between 0 and 1")
        return 0.0
    return number


def _rate_problems(settings: FaultSettings) -> list[str]:
    problems: list[str] = []
    for name in _RATE_FIELDS:
        _rate(name, getattr(settings, name), problems)
    total = settings.error_rate + settings.throttle_rate + settings.reset_rate
    if not problems and total > 1.0 + 1e-9:
        problems.append("error_rate + throttle_rate + reset_rate: must not exceed 1")
    return problems


def _latency(value: object, problems: list[str]) -> tuple[float, float]:
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return (low, high)
    problems.append("latency_ms: must be [min, max] in milliseconds")
    return (0.0, 0.0)


def _latency_problems(latency_ms: tuple[float, float]) -> list[str]:
    low, high = latency_ms
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < low:
        return ["latency_ms: must satisfy 0 <= min <= max"]
    return []


def _force_entry(key: str, value: object, problems: list[str]) -> tuple[int, str] | None:
    """The forced answer `[status, "Code"]` for group `key`, or None after naming the problem."""
    parts = key.split("/")
    if len(parts) != _GROUP_KEY_PARTS or not all(parts):
        problems.append(f"force.{key}: the key must be PROJECT/LOGSTORE/GROUP")
        return None
    if isinstance(value, list | tuple) and len(value) == 2:
        status, code = value
        valid_status = isinstance(status, int) and not isinstance(status, bool)
        if valid_status and 400 <= status <= 599 and isinstance(code, str) and code:
            return (status, code)
    problems.append(f'force.{key}: must be [status 400-599, "ErrorCode"] or null')
    return None


def _merged_force(
    current: Mapping[str, tuple[int, str]], update: object, problems: list[str]
) -> Mapping[str, tuple[int, str]]:
    if not isinstance(update, dict):
        problems.append("force: must be an object")
        return current
    merged = dict(current)
    for key, value in update.items():
        if value is None:
            merged.pop(key, None)
            continue
        entry = _force_entry(str(key), value, problems)
        if entry is not None:
            merged[key] = entry
    return MappingProxyType(merged)


class FaultInjector:
    """Decides, for each SLS API request, whether and how it fails; one RNG for reproducibility."""

    def __init__(self, settings: FaultSettings | None = None, *, seed: int = 0) -> None:
        self.settings = settings or FaultSettings()
        self.seed = seed
        self._rng = random.Random(seed)

    def update(self, changes: Mapping[str, object]) -> FaultSettings:
        """Merge admin changes into the settings (all or nothing); raises ConfigError."""
        self.settings = self.settings.merged(changes)
        return self.settings

    def decide(self, group_key: str | None) -> Decision:
        """Draw the outcome of one request addressed to `group_key` ("P/L/G"), if any.

        Order: reset, forced code for the group, error rate, throttle rate (half 503
        ServerBusy, half 403 WriteQuotaExceed); the latency applies whatever the outcome.
        """
        settings = self.settings
        roll = self._rng.random()
        low, high = settings.latency_ms
        delay = self._rng.uniform(low, high) / 1000.0 if high > 0 else 0.0
        return Decision(self._fault(settings, roll, group_key), delay)

    @staticmethod
    def _fault(settings: FaultSettings, roll: float, group_key: str | None) -> Fault | None:
        if roll < settings.reset_rate:
            return RESET
        forced = settings.force.get(group_key) if group_key else None
        if forced is not None:
            status, code = forced
            return Fault("error", status, code, f"injected {code} for {group_key}")
        roll -= settings.reset_rate
        if roll < settings.error_rate:
            return INTERNAL_ERROR
        roll -= settings.error_rate
        if roll < settings.throttle_rate:
            return SERVER_BUSY if roll < settings.throttle_rate / 2 else WRITE_QUOTA
        return None
