"""The rate-limit configuration: `limits.yaml` (or the file RATE_LIMIT_CONFIG names), with
environment overrides for the common knobs, validated into typed, frozen objects.

Loaded once at start; a bad file or override stops the service with a message naming the
field (and the variable, for an override), like every other setting. So does a RATE_LIMIT_*
variable that is neither an override nor a setting: a misspelt override
(RATE_LIMIT_GENERATES_PER_IP) would otherwise be ignored without a word, leaving the limit
the operator meant to change as it was.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

DEFAULT_CONFIG = Path(__file__).resolve().with_name("limits.yaml")
SUPPORTED_VERSION = 1

ENV_PREFIX = "RATE_LIMIT_"
# The escalation overrides: variable -> the `escalation` key it replaces.
ESCALATION_VARIABLES = {
    "RATE_LIMIT_BLOCK_AFTER": "violations",
    "RATE_LIMIT_VIOLATION_WINDOW": "window",
    "RATE_LIMIT_BLOCK_STEPS": "blocks",
    "RATE_LIMIT_FORGET_AFTER": "forget_after",
}
# The quota service's settings whose names start with RATE_LIMIT_ (services/quota/settings.py;
# tests/quota/test_ratelimit_config.py keeps this in step with every service's settings).
SETTING_VARIABLES = frozenset({"RATE_LIMIT_CONFIG", "RATE_LIMIT_REDIS_TIMEOUT_MS"})

T = TypeVar("T")

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


def _route_variable(name: str, scope: Scope) -> str:
    return f"{ENV_PREFIX}{name.upper()}_PER_{scope.value.upper()}"


def _parsed(where: str, variable: str | None, parse: Callable[[object], T], value: object) -> T:
    """`parse(value)`, its error naming the field, and the variable when it set the value."""
    try:
        return parse(value)
    except ValueError as err:
        label = f"{variable} ({where})" if variable else where
        raise ValueError(f"{label}: {err}") from None


def _whole_number(value: object) -> int:
    try:
        count = int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected a whole number, got {value!r}") from None
    if count < 0:
        raise ValueError(f"expected 0 (never block) or more, got {value!r}")
    return count


def _durations(value: object) -> tuple[int, ...]:
    if isinstance(value, str):
        value = [step for step in value.split(",") if step.strip()]
    if not isinstance(value, list) or not value:
        raise ValueError(f"expected a list of durations such as 1m,10m,1h; got {value!r}")
    return tuple(parse_duration_ms(step) for step in value)


def _escalation(raw: Mapping[str, Any], env: Mapping[str, str]) -> Escalation:
    values: dict[str, object] = {}
    parsers: dict[str, tuple[str, Callable[[object], object]]] = {
        "violations": ("violations", _whole_number),
        "window": ("window_ms", parse_duration_ms),
        "blocks": ("blocks_ms", _durations),
        "forget_after": ("forget_after_ms", parse_duration_ms),
    }
    unknown = set(raw) - set(parsers)
    if unknown:
        raise ValueError(f"escalation: unknown keys {sorted(unknown)}")
    by_key = {key: variable for variable, key in ESCALATION_VARIABLES.items()}
    for key, (field, parse) in parsers.items():
        variable = by_key[key] if by_key[key] in env else None
        value = env[variable] if variable else raw.get(key)
        values[field] = _parsed(f"escalation.{key}", variable, parse, value)
    try:
        return Escalation.model_validate(values)
    except ValidationError as err:
        raise _errors("escalation", err) from None


def _route(
    name: str, raw: Mapping[str, Any], env: Mapping[str, str], scopes: tuple[Scope, ...] = (*Scope,)
) -> RouteLimits:
    where = "default" if name == "default" else f"routes.{name}"
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a mapping")
    values = dict(raw)
    for scope in scopes:
        variable = _route_variable(name, scope)
        if variable in env:
            field = f"per_{scope.value}"
            values[field] = _parsed(f"{where}.{field}", variable, parse_limit, env[variable])
    try:
        return RouteLimits(name=name, **values)
    except ValidationError as err:
        raise _errors(where, err) from None


def _admin_failures(raw: object, env: Mapping[str, str]) -> RouteLimits:
    if not isinstance(raw, dict) or set(raw) - {"per_ip"}:
        raise ValueError(f"{ADMIN_FAILURES}: expected per_ip only")
    return _route(ADMIN_FAILURES, raw, env, (Scope.IP,))


def _overrides(env: Mapping[str, str]) -> dict[str, str]:
    """The RATE_LIMIT_* variables of `env`, by their name in capitals (variable names are read
    without regard to case, as every setting's are)."""
    found: dict[str, str] = {}
    spelled: dict[str, str] = {}
    for variable, value in env.items():
        name = variable.upper()
        if not name.startswith(ENV_PREFIX):
            continue
        if name in spelled:
            raise ValueError(f"{spelled[name]} and {variable} are the same variable: set one")
        spelled[name] = variable
        found[name] = value
    return found


def _refuse_unknown(overrides: Mapping[str, str], route_names: list[str]) -> None:
    """Every RATE_LIMIT_* variable must be an override of this configuration or a setting."""
    routes = [*route_names, "default"]
    known = {
        *(_route_variable(name, scope) for name in routes for scope in Scope),
        _route_variable(ADMIN_FAILURES, Scope.IP),
        *ESCALATION_VARIABLES,
        *SETTING_VARIABLES,
    }
    unknown = sorted(set(overrides) - known)
    if not unknown:
        return
    problems = []
    for variable in unknown:
        close = difflib.get_close_matches(variable, sorted(known), n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else ""
        problems.append(f"{variable}{hint}")
    raise ValueError(
        f"unknown rate-limit variable{'s' if len(unknown) > 1 else ''} {', '.join(problems)}. "
        f"Known: RATE_LIMIT_<ROUTE>_PER_IP and RATE_LIMIT_<ROUTE>_PER_USER with <ROUTE> one of "
        f"{', '.join(name.upper() for name in routes)}; "
        f"{_route_variable(ADMIN_FAILURES, Scope.IP)}; "
        f"{', '.join(ESCALATION_VARIABLES)}; {', '.join(sorted(SETTING_VARIABLES))}"
    )


def _refuse_shared_paths(routes: tuple[RouteLimits, ...]) -> None:
    seen: dict[str, str] = {}
    for route in routes:
        for path in (*route.paths, *(f"prefix {p}" for p in route.prefixes)):
            if path in seen:
                raise ValueError(f"{path} is in both {seen[path]} and {route.name}")
            seen[path] = route.name


def parse_config(raw: object, env: Mapping[str, str] | None = None) -> RateLimitConfig:
    """Validate a parsed YAML document, applying environment overrides from `env` (the whole
    environment will do: only RATE_LIMIT_* variables are read, and each must be known)."""
    try:
        overrides = _overrides(env or {})
        if not isinstance(raw, dict):
            raise ValueError("expected a mapping at the top level")
        version = raw.get("version")
        if version != SUPPORTED_VERSION:
            raise ValueError(f"version: expected {SUPPORTED_VERSION}, got {version!r}")
        routes_raw = raw.get("routes") or {}
        if not isinstance(routes_raw, dict):
            raise ValueError("routes: expected a mapping of route name to limits")
        for reserved in ("default", ADMIN_FAILURES):
            if reserved in routes_raw:
                raise ValueError(f"routes: '{reserved}' is reserved for the top-level {reserved}")
        _refuse_unknown(overrides, [str(name) for name in routes_raw])
        routes = tuple(_route(name, spec or {}, overrides) for name, spec in routes_raw.items())
        default_raw = raw.get("default") or {}
        if not isinstance(default_raw, dict) or {"paths", "prefixes"} & set(default_raw):
            raise ValueError("default: expected per_ip / per_user only")
        unknown = set(raw) - {"version", "routes", "default", "escalation", ADMIN_FAILURES}
        if unknown:
            raise ValueError(f"unknown top-level keys: {sorted(unknown)}")
        escalation_raw = raw.get("escalation") or {}
        if not isinstance(escalation_raw, dict):
            raise ValueError("escalation: expected a mapping")
        _refuse_shared_paths(routes)
        return RateLimitConfig(
            version=version,
            routes=routes,
            default=_route("default", default_raw, overrides),
            escalation=_escalation(escalation_raw, overrides),
            admin_failures=_admin_failures(raw.get(ADMIN_FAILURES) or {}, overrides),
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
