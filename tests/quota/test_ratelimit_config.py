"""The rate-limit configuration: the shipped limits.yaml, environment overrides, route matching,
the errors a bad file or variable gets, and the decision's Redis budget setting."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import AliasChoices, ValidationError
from pydantic_settings import BaseSettings

from services.quota.ratelimit.config import (
    DEFAULT_CONFIG,
    SETTING_VARIABLES,
    ConfigError,
    Limit,
    Scope,
    Unit,
    load_config,
    parse_config,
    parse_duration_ms,
    parse_limit,
)
from services.quota.settings import QuotaSettings


def shipped() -> dict[str, Any]:
    raw: dict[str, Any] = yaml.safe_load(DEFAULT_CONFIG.read_text())
    return raw


def test_the_shipped_file_covers_every_route_of_the_issue() -> None:
    config = load_config()
    names = {route.name for route in config.routes}
    assert names == {
        "generate",
        "generate_stream",
        "feedback",
        "wishlist",
        "events",
        "reads",
        "admin",
    }
    for route in (*config.routes, config.default):
        assert route.per_ip is not None and route.per_user is not None, route.name
    assert config.escalation.enabled
    assert config.escalation.blocks_ms == (60_000, 600_000, 3_600_000)


def test_the_readme_table_is_the_shipped_file() -> None:
    """The README's table of default limits says what limits.yaml says."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    table = readme.split("| route | REST paths | per IP | per user |", 1)[1].split("\n\n", 1)[0]
    documented = {}
    for row in table.strip().splitlines()[1:]:
        name, _, per_ip, per_user = (cell.strip() for cell in row.strip("|").split("|"))
        documented[name] = (per_ip, per_user)
    config = load_config()
    shipped_limits = {
        route.name: (str(route.per_ip), str(route.per_user) if route.per_user else "—")
        for route in (*config.routes, config.default, config.admin_failures)
    }
    assert documented == shipped_limits


def test_routes_match_exact_paths_then_the_longest_prefix_then_the_default() -> None:
    config = load_config()
    assert config.route_for("/api/generate").name == "generate"
    assert config.route_for("/api/generate:stream").name == "generate_stream"
    assert config.route_for("/api/generate?x=1").name == "generate"  # no query tricks
    assert config.route_for("/api/quota").name == "reads"
    assert config.route_for("/api/profile").name == "reads"
    assert config.route_for("/api/admin/blocks:lift").name == "admin"
    assert config.route_for("/api/admin/cache").name == "admin"
    assert config.route_for("/api/health").name == "default"
    assert config.route_for("/api/generatex").name == "default"
    assert config.route_for("").name == "default"


def test_environment_overrides_the_common_knobs() -> None:
    config = load_config(
        env={
            "RATE_LIMIT_GENERATE_PER_IP": "7/second",
            "RATE_LIMIT_GENERATE_PER_USER": "off",
            "RATE_LIMIT_DEFAULT_PER_IP": "9/hour",
            "RATE_LIMIT_BLOCK_AFTER": "4",
            "RATE_LIMIT_VIOLATION_WINDOW": "30s",
            "RATE_LIMIT_BLOCK_STEPS": "2s, 1m",
            "RATE_LIMIT_FORGET_AFTER": "1d",
        }
    )
    generate = config.route_for("/api/generate")
    assert generate.per_ip == Limit(7, Unit.SECOND)
    assert generate.limit(Scope.USER) is None
    assert config.default.per_ip == Limit(9, Unit.HOUR)
    escalation = config.escalation
    assert (escalation.violations, escalation.window_ms) == (4, 30_000)
    assert escalation.blocks_ms == (2_000, 60_000)
    assert escalation.forget_after_ms == 86_400_000
    # The last step repeats.
    assert [escalation.block_ms(level) for level in (1, 2, 3, 9)] == [2000, 60000, 60000, 60000]


def test_limits_and_durations_parse_strictly() -> None:
    assert parse_limit("20/minute") == Limit(20, Unit.MINUTE)
    assert parse_limit(" 1 / day ") == Limit(1, Unit.DAY)
    assert parse_limit("off") is None
    assert parse_limit(False) is None  # YAML reads a bare `off` as false
    for bad in ("0/minute", "20/min", "20", "-1/second", "twenty/minute", 20, None):
        with pytest.raises(ValueError, match="expected"):
            parse_limit(bad)
    assert parse_duration_ms("250ms") == 250
    assert parse_duration_ms("1.5h") == 5_400_000
    for bad_duration in ("10", "1w", "", "0s", 5):
        with pytest.raises(ValueError, match="duration"):
            parse_duration_ms(bad_duration)


@pytest.mark.parametrize(
    ("change", "names"),
    [
        (lambda raw: raw.update(version=2), "version"),
        (lambda raw: raw["routes"]["generate"].update(per_ip="lots"), "per_ip"),
        (lambda raw: raw["routes"]["generate"].update(burst=3), "burst"),
        (lambda raw: raw["routes"]["feedback"].update(paths=["/api/generate"]), "both"),
        (lambda raw: raw["routes"]["feedback"].update(paths=["api/feedback"]), "starts with"),
        (lambda raw: raw["escalation"].update(blocks=[]), "blocks"),
        (lambda raw: raw["escalation"].update(window="soon"), "duration"),
        (lambda raw: raw["escalation"].update(violations="many"), "violations"),
        (lambda raw: raw.update(extra=1), "extra"),
        (lambda raw: raw["default"].update(paths=["/x"]), "default"),
        (lambda raw: raw["escalation"].update(block_after=3), "block_after"),
        (lambda raw: raw["routes"].update(admin_failures={"per_ip": "1/minute"}), "reserved"),
    ],
)
def test_a_bad_file_is_refused_with_a_message_naming_what_is_wrong(change: Any, names: str) -> None:
    raw = shipped()
    change(raw)
    with pytest.raises(ConfigError, match=names):
        parse_config(raw)


def test_a_bad_override_is_refused_too() -> None:
    with pytest.raises(ConfigError, match=r"RATE_LIMIT_FEEDBACK_PER_USER.*expected"):
        load_config(env={"RATE_LIMIT_FEEDBACK_PER_USER": "10 per minute"})


@pytest.mark.parametrize(
    ("variable", "value", "names"),
    [
        (
            "RATE_LIMIT_READS_PER_USER",
            "garbage",
            r"RATE_LIMIT_READS_PER_USER \(routes\.reads\.per_user\)",
        ),
        ("RATE_LIMIT_DEFAULT_PER_IP", "0/minute", r"RATE_LIMIT_DEFAULT_PER_IP \(default\.per_ip\)"),
        ("RATE_LIMIT_ADMIN_FAILURES_PER_IP", "5/min", "RATE_LIMIT_ADMIN_FAILURES_PER_IP"),
        ("RATE_LIMIT_BLOCK_AFTER", "many", r"RATE_LIMIT_BLOCK_AFTER \(escalation\.violations\)"),
        ("RATE_LIMIT_BLOCK_AFTER", "-1", "RATE_LIMIT_BLOCK_AFTER"),
        ("RATE_LIMIT_VIOLATION_WINDOW", "soon", "RATE_LIMIT_VIOLATION_WINDOW"),
        ("RATE_LIMIT_BLOCK_STEPS", "1m,forever", r"RATE_LIMIT_BLOCK_STEPS .*'forever'"),
        ("RATE_LIMIT_BLOCK_STEPS", ",", "RATE_LIMIT_BLOCK_STEPS"),
        ("RATE_LIMIT_FORGET_AFTER", "1w", "RATE_LIMIT_FORGET_AFTER"),
    ],
)
def test_a_garbage_value_is_refused_naming_the_variable(
    variable: str, value: str, names: str
) -> None:
    with pytest.raises(ConfigError, match=names):
        load_config(env={variable: value})


@pytest.mark.parametrize(
    ("variable", "suggestion"),
    [
        ("RATE_LIMIT_GENERATES_PER_IP", "RATE_LIMIT_GENERATE_PER_IP"),
        ("RATE_LIMIT_READ_PER_USER", "RATE_LIMIT_READS_PER_USER"),
        ("RATE_LIMIT_BLOCKS_AFTER", "RATE_LIMIT_BLOCK_AFTER"),
        ("RATE_LIMIT_ADMIN_FAILURES_PER_USER", "RATE_LIMIT_ADMIN_FAILURES_PER_IP"),
        ("rate_limit_generates_per_ip", "RATE_LIMIT_GENERATE_PER_IP"),
        ("RATE_LIMIT_UPLOADS_PER_IP", None),
    ],
)
def test_an_unknown_rate_limit_variable_is_refused_naming_it(
    variable: str, suggestion: str | None
) -> None:
    """A misspelt override would otherwise leave the limit it meant to change as it was."""
    with pytest.raises(ConfigError, match="unknown rate-limit variable") as refused:
        load_config(env={variable: "1/minute", "RATE_LIMIT_GENERATE_PER_USER": "5/minute"})
    message = str(refused.value)
    assert variable.upper() in message
    if suggestion:
        assert f"did you mean {suggestion}?" in message
    assert "GENERATE_STREAM" in message and "RATE_LIMIT_BLOCK_AFTER" in message  # what is known


def test_overrides_follow_the_routes_of_the_file() -> None:
    raw = shipped()
    raw["routes"]["uploads"] = {"paths": ["/api/uploads"], "per_ip": "1/minute"}
    config = parse_config(raw, {"RATE_LIMIT_UPLOADS_PER_IP": "2/minute"})
    assert config.route_for("/api/uploads").per_ip == Limit(2, Unit.MINUTE)
    del raw["routes"]["generate"]
    with pytest.raises(ConfigError, match="RATE_LIMIT_GENERATE_PER_IP"):
        parse_config(raw, {"RATE_LIMIT_GENERATE_PER_IP": "2/minute"})


def test_the_rest_of_the_environment_and_the_settings_pass() -> None:
    config = load_config(
        env={
            "RATE_LIMIT_CONFIG": str(DEFAULT_CONFIG),
            "RATE_LIMIT_REDIS_TIMEOUT_MS": "50",
            "GATEWAY_RATE_LIMIT_TIMEOUT_MS": "100",
            "PATH": "/usr/bin",
            "rate_limit_generate_per_ip": "7/second",  # read without regard to case
        }
    )
    assert config.route_for("/api/generate").per_ip == Limit(7, Unit.SECOND)
    with pytest.raises(ConfigError, match="same variable"):
        load_config(env={"RATE_LIMIT_BLOCK_AFTER": "3", "rate_limit_block_after": "4"})


def _settings_classes() -> list[type[BaseSettings]]:
    found: list[type[BaseSettings]] = []
    for service in ("gateway", "generation", "quota", "telemetry"):
        module = importlib.import_module(f"services.{service}.settings")
        found += [
            value
            for value in vars(module).values()
            if isinstance(value, type) and issubclass(value, BaseSettings)
        ]
    return found


def _variables(settings: type[BaseSettings]) -> set[str]:
    """The environment variables a settings class reads: its aliases, else its field names
    (no settings class has an env_prefix)."""
    names: set[str] = set()
    for name, field in settings.model_fields.items():
        aliases: list[str] = []
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                aliases.append(alias)
            elif isinstance(alias, AliasChoices):
                aliases += [str(choice) for choice in alias.choices]
        names.update(alias.upper() for alias in aliases or [name])
    return names


def test_every_rate_limit_setting_of_any_service_is_known_to_the_override_check() -> None:
    """The quota service reads every RATE_LIMIT_* variable as an override and refuses those
    it does not know: a setting so named (in any service: one environment may serve them all,
    as devstack's does) must be on its list."""
    named = {
        variable
        for settings in _settings_classes()
        for variable in _variables(settings)
        if variable.startswith("RATE_LIMIT_")
    }
    assert named == SETTING_VARIABLES
    assert {v for v in _variables(QuotaSettings) if v.startswith("RATE_LIMIT_")} == named


def test_the_deploy_files_set_only_known_variables() -> None:
    root = Path(__file__).resolve().parents[2]
    env: dict[str, str] = {}
    for path in (root / "deploy").rglob("*.env"):
        for line in path.read_text().splitlines():
            name, _, value = line.partition("=")
            if name.strip().upper().startswith("RATE_LIMIT_") and not line.startswith("#"):
                env[name.strip()] = value.strip()
    assert "RATE_LIMIT_REDIS_TIMEOUT_MS" in env  # documented with the other quota settings
    load_config(env=env)


def test_the_redis_budget_of_a_decision_is_below_envoys_wait(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert QuotaSettings().rate_limit_redis_timeout_ms == 50
    monkeypatch.setenv("RATE_LIMIT_REDIS_TIMEOUT_MS", "100")
    with pytest.raises(ValidationError, match=r"RATE_LIMIT_REDIS_TIMEOUT_MS.*GATEWAY_RATE_LIMIT"):
        QuotaSettings()
    monkeypatch.setenv("GATEWAY_RATE_LIMIT_TIMEOUT_MS", "250")  # a gateway that waits longer
    assert QuotaSettings().rate_limit_redis_timeout_ms == 100
    monkeypatch.setenv("RATE_LIMIT_REDIS_TIMEOUT_MS", "0")
    with pytest.raises(ValidationError, match="RATE_LIMIT_REDIS_TIMEOUT_MS"):
        QuotaSettings()


def test_a_missing_or_unparsable_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: [unclosed")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_config(broken)
