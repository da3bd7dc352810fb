"""Fault injection for the emulator: rates, forced codes, latency and late-landing requests.

Every random outcome is drawn from one seeded RNG, so a seed replays the same faults for the
same sequence of requests.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Literal, TypeVar

from cpmgr.errors import ConfigError

_Entry = TypeVar("_Entry")

FaultKind = Literal["reset", "error"]

# The knobs POST /_emulator/faults accepts; anything else is refused so a typo is not ignored.
FAULT_FIELDS = (
    "error_rate",
    "throttle_rate",
    "reset_rate",
    "latency_ms",
    "force",
    "late_rate",
    "late_ms",
    "late",
    "apis",
)
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
    """What to do with one request: an optional fault, and how long to wait before answering.

    `late_seconds` set means: hold the request that long, then apply it (see `FaultSettings`).
    """

    fault: Fault | None
    delay_seconds: float
    late_seconds: float | None = None


@dataclass(frozen=True)
class LateLanding:
    """The next `count` UpdateCheckPoints of a group are applied `delay_ms` after they arrive."""

    count: int
    delay_ms: float


def _empty_force() -> Mapping[str, tuple[int, str]]:
    return MappingProxyType({})


def _empty_late() -> Mapping[str, LateLanding]:
    return MappingProxyType({})


@dataclass(frozen=True)
class FaultSettings:
    """The fault knobs of the emulator (docs/design.md, "The emulator").

    The three rates partition one uniform draw, so each is the measured share of requests
    whatever the others are; their sum must not exceed 1.

    Late landing (UpdateCheckPoint only): a late request is authenticated on arrival, held
    without an answer, and applied to the state and history `late_ms` later, whether or not its
    client is still connected (a client whose timeout is shorter has given up by then: the
    value lands after it retried, as a slow SLS does). A client still waiting gets the answer
    of the apply. `late_rate` is the share of UpdateCheckPoints that would otherwise succeed
    which land late, after a hold drawn uniformly from `late_ms`; `late` makes the next N
    UpdateCheckPoints of a group land late with a fixed hold, whatever the rates draw.
    """

    error_rate: float = 0.0
    throttle_rate: float = 0.0
    reset_rate: float = 0.0
    latency_ms: tuple[float, float] = (0.0, 0.0)
    # "PROJECT/LOGSTORE/GROUP" -> (HTTP status, errorCode) answered to every request for it
    force: Mapping[str, tuple[int, str]] = field(default_factory=_empty_force)
    late_rate: float = 0.0
    late_ms: tuple[float, float] = (0.0, 0.0)
    # "PROJECT/LOGSTORE/GROUP" -> the next UpdateCheckPoints of that group that land late
    late: Mapping[str, LateLanding] = field(default_factory=_empty_late)
    # The APIs ("GetCursor", "UpdateCheckPoint", ...) every knob applies to; None: all of them.
    apis: frozenset[str] | None = None
    # No knob is on: every request passes untouched (worked out once, not per request).
    quiet: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        problems = _rate_problems(self) + _latency_problems(self.latency_ms)
        problems += _late_problems(self.late_rate, self.late_ms)
        if problems:
            raise ConfigError(problems)
        quiet = not (self.error_rate or self.throttle_rate or self.reset_rate or self.late_rate > 0)
        quiet = quiet and self.latency_ms[1] <= 0 and not self.force and not self.late
        object.__setattr__(self, "quiet", quiet)

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
            force = _merged("force", self.force, update["force"], _force_entry, problems)
        late_rate = self.late_rate
        if "late_rate" in update:
            late_rate = _rate("late_rate", update["late_rate"], problems)
        late_ms = self.late_ms
        if "late_ms" in update:
            late_ms = _latency(update["late_ms"], problems, name="late_ms")
        late = self.late
        if "late" in update:
            late = _merged("late", self.late, update["late"], _late_entry, problems)
        apis = _apis(update["apis"], problems) if "apis" in update else self.apis
        if problems:
            raise ConfigError(problems)
        return FaultSettings(
            error_rate=rates.get("error_rate", self.error_rate),
            throttle_rate=rates.get("throttle_rate", self.throttle_rate),
            reset_rate=rates.get("reset_rate", self.reset_rate),
            latency_ms=latency,
            force=force,
            late_rate=late_rate,
            late_ms=late_ms,
            late=late,
            apis=apis,
        )

    def as_json(self) -> dict[str, object]:
        """The settings in the shape POST /_emulator/faults accepts."""
        return {
            "error_rate": self.error_rate,
            "throttle_rate": self.throttle_rate,
            "reset_rate": self.reset_rate,
            "latency_ms": list(self.latency_ms),
            "force": {key: [status, code] for key, (status, code) in sorted(self.force.items())},
            "late_rate": self.late_rate,
            "late_ms": list(self.late_ms),
            "late": {
                key: {"count": entry.count, "delay_ms": entry.delay_ms}
                for key, entry in sorted(self.late.items())
            },
            "apis": sorted(self.apis) if self.apis is not None else None,
        }

    def with_late_consumed(self, group_key: str) -> FaultSettings:
        """A copy with one late landing of `group_key` used up (the entry goes at zero)."""
        late = dict(self.late)
        entry = late.pop(group_key)
        if entry.count > 1:
            late[group_key] = LateLanding(entry.count - 1, entry.delay_ms)
        return replace(self, late=MappingProxyType(late))


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


def _latency(
    value: object, problems: list[str], *, name: str = "latency_ms"
) -> tuple[float, float]:
    if isinstance(value, list | tuple) and len(value) == 2:
        low, high = _number(value[0]), _number(value[1])
        if low is not None and high is not None:
            return (low, high)
    problems.append(f"{name}: must be [min, max] in milliseconds")
    return (0.0, 0.0)


def _latency_problems(latency_ms: tuple[float, float], *, name: str = "latency_ms") -> list[str]:
    low, high = latency_ms
    if not (math.isfinite(low) and math.isfinite(high)) or low < 0 or high < low:
        return [f"{name}: must satisfy 0 <= min <= max"]
    return []


def _late_problems(late_rate: float, late_ms: tuple[float, float]) -> list[str]:
    problems: list[str] = []
    _rate("late_rate", late_rate, problems)
    problems += _latency_problems(late_ms, name="late_ms")
    if not problems and late_rate > 0 and late_ms[1] <= 0:
        # Otherwise late requests would be applied at once: a knob that silently does nothing.
        problems.append("late_rate: needs late_ms with a maximum above 0")
    return problems


def _group_key_problem(field_name: str, key: str) -> str | None:
    parts = key.split("/")
    if len(parts) != _GROUP_KEY_PARTS or not all(parts):
        return f"{field_name}.{key}: the key must be PROJECT/LOGSTORE/GROUP"
    return None


def _force_entry(key: str, value: object, problems: list[str]) -> tuple[int, str] | None:
    """The forced answer `[status, "Code"]` for group `key`, or None after naming the problem."""
    key_problem = _group_key_problem("force", key)
    if key_problem is not None:
        problems.append(key_problem)
        return None
    if isinstance(value, list | tuple) and len(value) == 2:
        status, code = value
        valid_status = isinstance(status, int) and not isinstance(status, bool)
        if valid_status and 400 <= status <= 599 and isinstance(code, str) and code:
            return (status, code)
    problems.append(f'force.{key}: must be [status 400-599, "ErrorCode"] or null')
    return None


def _merged(
    name: str,
    current: Mapping[str, _Entry],
    update: object,
    parse: Callable[[str, object, list[str]], _Entry | None],
    problems: list[str],
) -> Mapping[str, _Entry]:
    """`current` with `update`'s entries (per group key) parsed in; a null entry removes one."""
    if not isinstance(update, dict):
        problems.append(f"{name}: must be an object")
        return current
    merged = dict(current)
    for key, value in update.items():
        if value is None:
            merged.pop(key, None)
            continue
        entry = parse(str(key), value, problems)
        if entry is not None:
            merged[key] = entry
    return MappingProxyType(merged)


def _apis(value: object, problems: list[str]) -> frozenset[str] | None:
    if value is None:
        return None
    if isinstance(value, list) and value and all(isinstance(api, str) and api for api in value):
        return frozenset(value)
    problems.append('apis: must be a non-empty list of API names (["GetCursor", ...]) or null')
    return None


def _late_entry(key: str, value: object, problems: list[str]) -> LateLanding | None:
    """`{"count": N, "delay_ms": D}` for group `key`, or None after naming the problem."""
    key_problem = _group_key_problem("late", key)
    if key_problem is not None:
        problems.append(key_problem)
        return None
    if isinstance(value, dict) and set(value) == {"count", "delay_ms"}:
        count, delay = value["count"], _number(value["delay_ms"])
        valid_count = isinstance(count, int) and not isinstance(count, bool) and count >= 1
        if valid_count and delay is not None and delay >= 0:
            return LateLanding(count, delay)
    problems.append(f'late.{key}: must be {{"count": N >= 1, "delay_ms": D >= 0}} or null')
    return None


_UNTOUCHED = Decision(None, 0.0)


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

    def decide(
        self, group_key: str | None, *, api: str = "", can_land_late: bool = False
    ) -> Decision:
        """Draw the outcome of one request addressed to `group_key` ("P/L/G"), if any.

        A request to an API outside `apis` (when set) passes untouched, drawing nothing.

        Order: a `late` entry for the group (when `can_land_late`), reset, forced code for the
        group, error rate, throttle rate (half 503 ServerBusy, half 403 WriteQuotaExceed),
        then `late_rate` among the requests left to succeed (when `can_land_late`). The
        latency applies to every outcome but a late one, whose hold replaces it.
        """
        settings = self.settings
        if settings.apis is not None and api not in settings.apis:
            return _UNTOUCHED
        # Drawn even with every knob off, so that a seed draws the same faults once knobs are on.
        roll = self._rng.random()
        if settings.quiet:
            return _UNTOUCHED
        low, high = settings.latency_ms
        delay = self._rng.uniform(low, high) / 1000.0 if high > 0 else 0.0
        if can_land_late and group_key is not None and group_key in settings.late:
            self.settings = settings.with_late_consumed(group_key)
            return Decision(None, 0.0, settings.late[group_key].delay_ms / 1000.0)
        fault = self._fault(settings, roll, group_key)
        late = self._random_late(settings) if fault is None and can_land_late else None
        if late is not None:
            return Decision(None, 0.0, late)
        return Decision(fault, delay)

    def _random_late(self, settings: FaultSettings) -> float | None:
        """The hold in seconds if `late_rate` draws this request, else None."""
        # Drawn only when the knob is on, so existing seeds replay the same faults as before.
        if settings.late_rate <= 0 or self._rng.random() >= settings.late_rate:
            return None
        low, high = settings.late_ms
        return self._rng.uniform(low, high) / 1000.0

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
