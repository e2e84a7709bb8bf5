"""What the bench says the machine allows follows from the run's own figures."""

from __future__ import annotations

import pytest

from bench.bounds import (
    events_ceiling,
    events_line,
    floor_line,
    hit_p99_line,
    miss_line,
    quota_line,
)
from bench.ceiling import FLOOR as CEILING_FLOOR
from bench.events import FLOOR as EVENTS_FLOOR
from bench.events import MESH, POSTGRES, ROWS
from bench.quota import FLOOR as QUOTA_FLOOR


def _events(envoy: float | None, postgres: float | None) -> dict[str, object]:
    return {
        "events_per_second": {MESH: 20_000.0, ROWS: 8_000.0},
        "cpu_us_per_event": {
            MESH: {"envoy": envoy, POSTGRES: postgres, "telemetry": 30.0, "quota": 14.0}
        },
    }


def test_events_ceiling_counts_only_envoy_and_postgres() -> None:
    # 2 cores / (10 + 30) µs per event; the Python services' CPU is left out.
    assert events_ceiling(_events(10.0, 30.0), 2) == pytest.approx(50_000)
    line = events_line(_events(10.0, 30.0), 2)
    assert line is not None
    assert "at most 50,000/s" in line
    assert "6.2x row at a time" in line
    assert "(80,000/s here)" in line


@pytest.mark.parametrize("envoy, postgres", [(None, 30.0), (10.0, None), (0.0, 30.0)])
def test_no_events_ceiling_without_both_figures(
    envoy: float | None, postgres: float | None
) -> None:
    assert events_ceiling(_events(envoy, postgres), 2) is None
    assert events_line(_events(envoy, postgres), 2) is None


def test_the_floor_line_says_whether_the_goal_is_above_the_floor() -> None:
    below = floor_line({"ratio": 0.12, "floor_ratio": 0.15})
    assert below is not None
    assert "reaches 0.150" in below and "0.80 of the floor" in below and "above the floor" in below
    within = floor_line({"ratio": 0.3, "floor_ratio": 0.5})
    assert within is not None and "within the floor" in within
    assert floor_line({"ratio": 0.12}) is None


def test_the_quota_line_halves_the_floor_for_pairs() -> None:
    line = quota_line({"kinds": {QUOTA_FLOOR: {"per_second": 4_000.0}}})
    assert line is not None
    assert "at most 4,000 consumes/s and 2,000 pairs/s" in line
    assert quota_line({"kinds": {}}) is None


def test_the_miss_and_p99_lines_quote_the_floor() -> None:
    miss = miss_line({"floor": {"added_median_ms": 6.5, "added_p99_ms": 9.25}})
    assert miss is not None and "+6.50 ms median, +9.25 ms p99" in miss
    assert miss_line({"added_median_ms": 13.0}) is None
    p99 = hit_p99_line({"connections": 32, "variants": {CEILING_FLOOR: {"p99_ms": 73.05}}})
    assert p99 is not None and "at the same 32 connections, is 73.0 ms" in p99
    assert hit_p99_line({"connections": 32, "variants": {}}) is None


def test_the_events_line_quotes_the_measured_floor() -> None:
    events = _events(10.0, 30.0)
    rates = events["events_per_second"]
    assert isinstance(rates, dict)
    rates[EVENTS_FLOOR] = 32_000.0
    line = events_line(events, 2)
    assert line is not None and "committed 32,000/s (4.0x)" in line
