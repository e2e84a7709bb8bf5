"""The goals of issue 9 (2 cores, one run, ratios), and each measured figure against them:
met, NOT met, or not measured (its section did not run)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from bench.ceiling import HIT
from bench.stack import SERVICES

RATIO_TO_CEILING = 0.40
HIT_P99_MS = 30.0
MISS_ADDED_MEDIAN_MS = 2.0
MISS_ADDED_P99_MS = 5.0
QUOTA_PER_SECOND = 3_000.0
EVENTS_PER_SECOND = 50_000.0
EVENTS_RATIO = 10.0
RSS_MB = 120.0
RSS_GROWTH_PERCENT = 5.0
GOAL_CORES = 2


@dataclass(frozen=True)
class Verdict:
    figure: str
    goal: str
    value: str
    met: bool | None  # None: not measured in this run

    @property
    def word(self) -> str:
        return {True: "met", False: "NOT met", None: "not measured"}[self.met]


def _get(data: Mapping[str, Any], *path: str) -> Any:
    node: Any = data
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            return None
        node = node[key]
    return node


def _check(
    figure: str, goal: str, value: float | None, ok: Callable[[float], bool], shown: str = "{:,.0f}"
) -> Verdict:
    """`shown` formats the measured value (with its unit)."""
    if value is None:
        return Verdict(figure, goal, "-", None)
    return Verdict(figure, goal, shown.format(value), ok(value))


def judge(sections: Mapping[str, Any], rss: Mapping[str, Mapping[str, Any]]) -> list[Verdict]:
    """The goals table, figure by figure, from the sections' results and the RSS table."""
    hit = _get(sections, "ceiling", "variants", HIT)
    failures = None if hit is None else hit["non_2xx"] + hit["socket_errors"]
    events_clean = _get(sections, "events", "clean")
    caveat = "" if events_clean in (None, True) else " (failures, see above)"
    verdicts = [
        _check(
            "cache-hit generate RPS / echo ceiling",
            f">= {RATIO_TO_CEILING:.2f}",
            _get(sections, "ceiling", "ratio"),
            lambda v: v >= RATIO_TO_CEILING,
            "{:.3f}",
        ),
        _check(
            "cache-hit generate non-2xx + socket errors",
            "0",
            None if failures is None else float(failures),
            lambda v: v == 0,
        ),
        _check(
            "cache-hit generate p99",
            f"<= {HIT_P99_MS:g} ms",
            None if hit is None else hit["p99_ms"],
            lambda v: v <= HIT_P99_MS,
            "{:.1f} ms",
        ),
        _check(
            "cache miss: median added over the simulator",
            f"<= {MISS_ADDED_MEDIAN_MS:g} ms",
            _get(sections, "miss", "added_median_ms"),
            lambda v: v <= MISS_ADDED_MEDIAN_MS,
            "{:+.2f} ms",
        ),
        _check(
            "cache miss: p99 added over the simulator",
            f"<= {MISS_ADDED_P99_MS:g} ms",
            _get(sections, "miss", "added_p99_ms"),
            lambda v: v <= MISS_ADDED_P99_MS,
            "{:+.2f} ms",
        ),
        _check(
            "quota reservations/s, one process (pairs)",
            f">= {QUOTA_PER_SECOND:,.0f}/s",
            _get(sections, "quota", "reservations_per_second"),
            lambda v: v >= QUOTA_PER_SECOND,
            "{:,.0f}/s",
        ),
        _check(
            "quota reservations/s, one process (consume)",
            f">= {QUOTA_PER_SECOND:,.0f}/s",
            _get(sections, "quota", "consumes_per_second"),
            lambda v: v >= QUOTA_PER_SECOND,
            "{:,.0f}/s",
        ),
        _check(
            "committed events/s through Envoy" + caveat,
            f">= {EVENTS_PER_SECOND:,.0f}/s",
            _get(sections, "events", "events_per_second", "POST /api/events via Envoy"),
            lambda v: v >= EVENTS_PER_SECOND and events_clean is True,
            "{:,.0f}/s",
        ),
        _check(
            "committed events vs row at a time" + caveat,
            f">= {EVENTS_RATIO:g}x",
            _get(sections, "events", "ratio"),
            lambda v: v >= EVENTS_RATIO and events_clean is True,
            "{:.1f}x",
        ),
    ]
    for name in SERVICES:
        verdicts.append(
            _check(
                f"RSS of {name} at the end",
                f"<= {RSS_MB:g} MB",
                _get(rss, name, "end"),
                lambda v: v <= RSS_MB,
                "{:.0f} MB",
            )
        )
    return verdicts


def judge_soak(rss: Mapping[str, Mapping[str, Any]], minutes: float) -> list[Verdict]:
    """The memory goal of a soak: each service's RSS at the end and its growth."""
    verdicts = []
    for name in SERVICES:
        verdicts.append(
            _check(
                f"RSS of {name} after {minutes:g} min",
                f"<= {RSS_MB:g} MB",
                _get(rss, name, "end"),
                lambda v: v <= RSS_MB,
                "{:.0f} MB",
            )
        )
        verdicts.append(
            _check(
                f"RSS growth of {name}",
                f"<= {RSS_GROWTH_PERCENT:g} %",
                _get(rss, name, "growth_percent"),
                lambda v: v <= RSS_GROWTH_PERCENT,
                "{:+.1f} %",
            )
        )
    return verdicts


def print_goals(verdicts: list[Verdict], cores: int | None) -> None:
    on = "" if cores == GOAL_CORES else f" (this machine has {cores} cores)"
    print(f"Goals of issue 9 ({GOAL_CORES} cores, one run){on}")
    header = f"{'figure':<46} {'goal':>13} {'measured':>14}  verdict"
    print(header)
    print("-" * len(header))
    for v in verdicts:
        print(f"{v.figure:<46} {v.goal:>13} {v.value:>14}  {v.word}")


def as_json(verdicts: list[Verdict]) -> list[dict[str, Any]]:
    return [{**asdict(v), "verdict": v.word} for v in verdicts]
