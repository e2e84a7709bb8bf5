"""The rate-limit configuration: the shipped limits.yaml, environment overrides, route matching
and the errors a bad file gets."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from services.quota.ratelimit.config import (
    DEFAULT_CONFIG,
    ConfigError,
    Limit,
    Scope,
    Unit,
    load_config,
    parse_config,
    parse_duration_ms,
    parse_limit,
)


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
    ],
)
def test_a_bad_file_is_refused_with_a_message_naming_what_is_wrong(change: Any, names: str) -> None:
    raw = shipped()
    change(raw)
    with pytest.raises(ConfigError, match=names):
        parse_config(raw)


def test_a_bad_override_is_refused_too() -> None:
    with pytest.raises(ConfigError, match="expected"):
        load_config(env={"RATE_LIMIT_FEEDBACK_PER_USER": "10 per minute"})


def test_a_missing_or_unparsable_file_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"nope\.yaml"):
        load_config(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("routes: [unclosed")
    with pytest.raises(ConfigError, match=r"broken\.yaml"):
        load_config(broken)
