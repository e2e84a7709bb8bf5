"""How far the goals are from what this run shows the machine allows, from the run's own
figures: the shape's floor (bench/floor_server.py) against the ceiling, its p99, its misses
and its quota call's rate, and the most events per second Envoy and PostgreSQL leave room for
at the CPU they spent per event."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.ceiling import FLOOR as CEILING_FLOOR
from bench.events import FLOOR as EVENTS_FLOOR
from bench.events import MESH, POSTGRES, ROWS
from bench.goals import (
    EVENTS_PER_SECOND,
    EVENTS_RATIO,
    HIT_P99_MS,
    MISS_ADDED_MEDIAN_MS,
    MISS_ADDED_P99_MS,
    QUOTA_PER_SECOND,
    RATIO_TO_CEILING,
)
from bench.quota import FLOOR as QUOTA_FLOOR
from bench.stats import fmt

# Processes whose CPU per event the project's Python does not spend: the proxy in front and the
# database behind.
NOT_PYTHON = ("envoy", POSTGRES)


def floor_line(ceiling: Mapping[str, Any] | None) -> str | None:
    if ceiling is None or ceiling.get("floor_ratio") is None:
        return None
    floor, hit = ceiling["floor_ratio"], ceiling.get("ratio")
    return (
        f"cache-hit / ceiling: the shape's floor (every hop and Redis round trip, no code) "
        f"reaches {floor:.3f} and the real hit {fmt(hit, 0, 3)} ({fmt(hit / floor, 0, 2)} of "
        f"the floor); the goal, {RATIO_TO_CEILING:.2f}, is "
        f"{'within' if floor >= RATIO_TO_CEILING else 'above'} the floor"
    )


def hit_p99_line(ceiling: Mapping[str, Any] | None) -> str | None:
    floor = None if ceiling is None else ceiling["variants"].get(CEILING_FLOOR)
    if ceiling is None or floor is None:
        return None
    return (
        f"cache-hit p99: the floor's own, at the same {ceiling['connections']} connections, is "
        f"{floor['p99_ms']:.1f} ms; the goal asks {HIT_P99_MS:g} ms"
    )


def miss_line(miss: Mapping[str, Any] | None) -> str | None:
    floor = None if miss is None else miss.get("floor")
    if floor is None:
        return None
    return (
        f"cache miss added: through the floor (its hops and round trips, no code) "
        f"{floor['added_median_ms']:+.2f} ms median, {floor['added_p99_ms']:+.2f} ms p99; the "
        f"goals ask {MISS_ADDED_MEDIAN_MS:g} and {MISS_ADDED_P99_MS:g} ms"
    )


def quota_line(quota: Mapping[str, Any] | None) -> str | None:
    floor = None if quota is None else quota["kinds"].get(QUOTA_FLOOR)
    if quota is None or floor is None:
        return None
    calls = floor["per_second"]
    return (
        f"quota reservations/s: one process making one RPC and one Redis round trip per call "
        f"with no code answers {calls:,.0f}/s, so at most {calls:,.0f} consumes/s and "
        f"{calls / 2:,.0f} pairs/s (two of each); the goal asks {QUOTA_PER_SECOND:,.0f}/s"
    )


def events_ceiling(events: Mapping[str, Any] | None, cores: int | None) -> float | None:
    """Events/s the cores allow if the Python services cost nothing: cores / the CPU per event
    of Envoy and PostgreSQL in the mesh runs."""
    if events is None or not cores:
        return None
    per_event = events.get("cpu_us_per_event", {}).get(MESH, {})
    spent: list[float | None] = [per_event.get(name) for name in NOT_PYTHON]
    known = [value for value in spent if value is not None and value > 0]
    if len(known) != len(spent):
        return None
    return cores * 1e6 / sum(known)


def events_line(events: Mapping[str, Any] | None, cores: int | None) -> str | None:
    most = events_ceiling(events, cores)
    if events is None or most is None:
        return None
    rows = events["events_per_second"].get(ROWS)
    needed = EVENTS_RATIO * rows if rows else None
    floor = events["events_per_second"].get(EVENTS_FLOOR)
    measured = (
        ""
        if floor is None
        else f"; the floor (Envoy, the rate-limit check, one INSERT per request, no code) "
        f"committed {floor:,.0f}/s ({fmt(floor / rows if rows else None, 0, 1)}x)"
    )
    return (
        f"committed events/s: at the CPU per event Envoy and PostgreSQL spent, {cores} cores "
        f"allow at most {most:,.0f}/s even if the Python services cost nothing "
        f"({fmt(most / rows if rows else None, 0, 1)}x row at a time){measured}; the goals ask "
        f"{EVENTS_PER_SECOND:,.0f}/s and {EVENTS_RATIO:g}x ({fmt(needed, 0, 0)}/s here)"
    )


def print_bounds(sections: Mapping[str, Any], cores: int | None) -> list[str]:
    """Print what applies to the sections that ran; return the lines (for the results)."""
    lines = [
        line
        for line in (
            floor_line(sections.get("ceiling")),
            hit_p99_line(sections.get("ceiling")),
            miss_line(sections.get("miss")),
            quota_line(sections.get("quota")),
            events_line(sections.get("events"), cores),
        )
        if line is not None
    ]
    if lines:
        print("What this run shows the machine allows:")
        for line in lines:
            print(f"  {line}")
    return lines
