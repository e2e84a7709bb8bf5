"""The rate-limit configuration: `limits.yaml` (or the file RATE_LIMIT_CONFIG names), with
environment overrides for the common knobs, validated into typed, frozen objects.

Loaded once at start; a bad file or override stops the service with a message naming the
field, like every other setting.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG = Path(__file__).resolve().with_name("limits.yaml")
SUPPORTED_VERSION = 1

_LIMIT = re.compile(r"^\s*(\d+)\s*/\s*(second|minute|hour|day)\s*$")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_MS = {"ms": 1, "s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000}


class ConfigError(ValueError):
    """The rate-limit configuration is invalid; the message says where."""


class Unit(StrEnum):
    SECOND = "second"
    MINUTE = "minute"
    HOUR = "hour"
    DAY = "day"

    @property
    def milliseconds(self) -> int:
        return {"second": 1000, "minute": 60_000, "hour": 3_600_000, "day": 86_400_000}[self]


class Scope(StrEnum):
    """Who a limit counts: a client network, or a signed-in user."""

    IP = "ip"
    USER = "user"


@dataclass(frozen=True)
class Limit:
    """`requests` per `unit`, GCRA: a burst of at most `requests`, refilled one per
    unit/requests."""

    requests: int
    unit: Unit

    @property
    def period_ms(self) -> int:
        return self.unit.milliseconds

    def __str__(self) -> str:
        return f"{self.requests}/{self.unit.value}"


def parse_limit(value: object) -> Limit | None:
    """`"20/minute"` -> Limit; `"off"` (or YAML's false, which `off` parses to) -> None."""
    if value is False or (isinstance(value, str) and value.strip().lower() == "off"):
        return None
    match = _LIMIT.match(str(value)) if isinstance(value, str) else None
    if match is None or int(match[1]) < 1:
        raise ValueError(
            f"expected '<n>/second|minute|hour|day' with n >= 1, or 'off'; got {value!r}"
        )
    return Limit(int(match[1]), Unit(match[2]))


def parse_duration_ms(value: object) -> int:
    """`"90s"`, `"1m"`, `"1.5h"`, `"250ms"`, `"1d"` -> milliseconds (at least 1)."""
    match = _DURATION.match(value) if isinstance(value, str) else None
    if match is None:
        raise ValueError(f"expected a duration such as 30s, 10m, 1h; got {value!r}")
    milliseconds = round(float(match[1]) * _DURATION_MS[match[2]])
    if milliseconds < 1:
        raise ValueError(f"duration must be at least 1ms; got {value!r}")
    return milliseconds


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


ADMIN_FAILURES = "admin_failures"


class RouteLimits(_Strict):
    name: str = ""
    paths: tuple[str, ...] = ()
    prefixes: tuple[str, ...] = ()
    per_ip: Limit | None = None
    per_user: Limit | None = None

    @field_validator("per_ip", "per_user", mode="before")
    @classmethod
    def _limit(cls, value: object) -> object:
        return value if value is None or isinstance(value, Limit) else parse_limit(value)

    @field_validator("paths", "prefixes")
    @classmethod
    def _api_paths(cls, values: tuple[str, ...]) -> tuple[str, ...]:
        for path in values:
            if not path.startswith("/"):
                raise ValueError(f"a path starts with '/': {path!r}")
        return values

    def limit(self, scope: Scope) -> Limit | None:
        return self.per_ip if scope is Scope.IP else self.per_user


class Escalation(_Strict):
    """Repeated refusals within `window_ms` escalate to a block, longer each time."""

    violations: int = Field(ge=0)
    window_ms: int = Field(ge=1)
    blocks_ms: tuple[int, ...] = Field(min_length=1)
    forget_after_ms: int = Field(ge=1)

    @property
    def enabled(self) -> bool:
        return self.violations > 0

    def block_ms(self, level: int) -> int:
        """How long the `level`-th block (1-based) lasts; the last step repeats."""
        return self.blocks_ms[min(max(level, 1), len(self.blocks_ms)) - 1]


class RateLimitConfig(_Strict):
    version: int
    routes: tuple[RouteLimits, ...]
    default: RouteLimits
    escalation: Escalation
    # Failed admin attempts, per client network (per_ip only: a guesser has no verified user).
    admin_failures: RouteLimits = RouteLimits(name=ADMIN_FAILURES)

    def route_for(self, path: str) -> RouteLimits:
        """The route a REST path counts against: exact path, else longest prefix, else the
        default. The query string never matters (clients could vary it freely)."""
        path = path.split("?", 1)[0]
        for route in self.routes:
            if path in route.paths:
                return route
        best: RouteLimits | None = None
        best_length = -1
        for route in self.routes:
            for prefix in route.prefixes:
                if path.startswith(prefix) and len(prefix) > best_length:
                    best, best_length = route, len(prefix)
        return best or self.default


def _errors(where: str, err: ValidationError) -> ValueError:
    """One line per problem, each naming its field: `routes.generate.per_ip: expected ...`."""
    problems = []
    for error in err.errors():
        field = ".".join(str(part) for part in error["loc"])
        message = str(error["msg"]).removeprefix("Value error, ")
        problems.append(f"{where}.{field}: {message}" if field else f"{where}: {message}")
    return ValueError("; ".join(problems))


def _escalation(raw: Mapping[str, Any], env: Mapping[str, str]) -> Escalation:
    violations = env.get("RATE_LIMIT_BLOCK_AFTER", raw.get("violations"))
    window = env.get("RATE_LIMIT_VIOLATION_WINDOW", raw.get("window"))
    steps = env.get("RATE_LIMIT_BLOCK_STEPS", raw.get("blocks"))
    forget = env.get("RATE_LIMIT_FORGET_AFTER", raw.get("forget_after"))
    if isinstance(steps, str):
        steps = [step for step in steps.split(",") if step.strip()]
    if not isinstance(steps, list):
        raise ValueError(f"escalation.blocks: expected a list of durations, got {steps!r}")
    try:
        count = int(str(violations))
    except ValueError:
        raise ValueError(
            f"escalation.violations: expected a whole number, got {violations!r}"
        ) from None
    try:
        return Escalation(
            violations=count,
            window_ms=parse_duration_ms(window),
            blocks_ms=tuple(parse_duration_ms(step) for step in steps),
            forget_after_ms=parse_duration_ms(forget),
        )
    except ValidationError as err:
        raise _errors("escalation", err) from None
    except ValueError as err:
        raise ValueError(f"escalation: {err}") from None


def _route(name: str, raw: Mapping[str, Any], env: Mapping[str, str]) -> RouteLimits:
    values = dict(raw)
    for scope in Scope:
        override = env.get(f"RATE_LIMIT_{name.upper()}_PER_{scope.value.upper()}")
        if override is not None:
            values[f"per_{scope.value}"] = override
    where = "default" if name == "default" else f"routes.{name}"
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping")
    try:
        return RouteLimits(name=name, **values)
    except ValidationError as err:
        raise _errors(where, err) from None


def _admin_failures(raw: object, env: Mapping[str, str]) -> RouteLimits:
    if not isinstance(raw, dict) or set(raw) - {"per_ip"}:
        raise ValueError(f"{ADMIN_FAILURES}: expected per_ip only")
    return _route(ADMIN_FAILURES, raw, env)


def parse_config(raw: object, env: Mapping[str, str] | None = None) -> RateLimitConfig:
    """Validate a parsed YAML document, applying environment overrides from `env`."""
    env = env or {}
    try:
        if not isinstance(raw, dict):
            raise ValueError("expected a mapping at the top level")
        version = raw.get("version")
        if version != SUPPORTED_VERSION:
            raise ValueError(f"version: expected {SUPPORTED_VERSION}, got {version!r}")
        routes_raw = raw.get("routes") or {}
        if not isinstance(routes_raw, dict):
            raise ValueError("routes: expected a mapping of route name to limits")
        routes = tuple(_route(name, spec or {}, env) for name, spec in routes_raw.items())
        if "default" in routes_raw:
            raise ValueError("routes: 'default' is reserved for the top-level default")
        default_raw = raw.get("default") or {}
        if not isinstance(default_raw, dict) or {"paths", "prefixes"} & set(default_raw):
            raise ValueError("default: expected per_ip / per_user only")
        unknown = set(raw) - {"version", "routes", "default", "escalation", ADMIN_FAILURES}
        if unknown:
            raise ValueError(f"unknown top-level keys: {sorted(unknown)}")
        seen: dict[str, str] = {}
        for route in routes:
            for path in (*route.paths, *(f"prefix {p}" for p in route.prefixes)):
                if path in seen:
                    raise ValueError(f"{path} is in both {seen[path]} and {route.name}")
                seen[path] = route.name
        return RateLimitConfig(
            version=version,
            routes=routes,
            default=_route("default", default_raw, env),
            escalation=_escalation(raw.get("escalation") or {}, env),
            admin_failures=_admin_failures(raw.get(ADMIN_FAILURES) or {}, env),
        )
    except ValidationError as err:
        raise ConfigError(f"invalid rate-limit configuration: {_errors('config', err)}") from None
    except (ValueError, TypeError) as err:
        raise ConfigError(f"invalid rate-limit configuration: {err}") from None


def load_config(
    path: Path = DEFAULT_CONFIG, env: Mapping[str, str] | None = None
) -> RateLimitConfig:
    """Read and validate a YAML file (see `limits.yaml` for the format)."""
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as err:
        raise ConfigError(f"cannot read the rate-limit configuration {path}: {err}") from None
    try:
        return parse_config(raw, env)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
