"""The PNG of a `make bench` run (matplotlib, no display needed): the latency distributions of
each scenario measured, and the cache-hit generate path's RPS as a share of the ceiling's, per
round and median, against the goal."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

# The Figure API, not pyplot: no global state, no display backend (savefig renders with Agg).
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from bench.ceiling import ECHO, FLOOR, HIT
from bench.goals import RATIO_TO_CEILING
from bench.misses import DIRECT, MESH
from bench.misses import FLOOR as FLOOR_MISS

TICKS = {0.01: "p1", 0.1: "p10", 0.5: "p50", 0.9: "p90", 0.99: "p99", 0.999: "p99.9"}


def _curves(sections: Mapping[str, Any]) -> dict[str, dict[str, float]]:
    """Scenario label -> {percentile text: ms}, for the sections that ran."""
    curves: dict[str, dict[str, float]] = {}
    ceiling = sections.get("ceiling", {}).get("variants", {})
    for label in (ECHO, HIT, FLOOR):
        if label in ceiling:
            curves[f"{label}, wrk"] = ceiling[label]["distribution_ms"]
    misses = sections.get("miss", {}).get("variants", {})
    floor_misses = sections.get("miss", {}).get("floor", {}).get("variants", {})
    for label, variants in ((MESH, misses), (FLOOR_MISS, floor_misses), (DIRECT, misses)):
        if label in variants:
            curves[f"{label}, sequential"] = variants[label]["distribution_ms"]
    return curves


def _draw_distributions(ax: Axes, curves: Mapping[str, Mapping[str, float]], title: str) -> None:
    for label, points in curves.items():
        # The logit axis cannot show 0 % or 100 %.
        pairs = sorted((float(p) / 100, ms) for p, ms in points.items() if 0 < float(p) < 100)
        if pairs:
            ax.plot([p for p, _ in pairs], [ms for _, ms in pairs], marker=".", label=label)
    ax.set_xscale("logit")
    ax.set_xticks(list(TICKS), list(TICKS.values()))
    ax.minorticks_off()
    ax.set_yscale("log")
    ax.set_xlabel("percentile")
    ax.set_ylabel("latency, ms")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")


def _draw_ratio(ax: Axes, ceiling: Mapping[str, Any]) -> None:
    ratio = ceiling.get("ratio")
    rounds = ceiling.get("ratio_rounds", [])
    labels, heights, colours = [ECHO, HIT], [1.0, ratio or 0.0], ["#999999", "#1f77b4"]
    if "floor_ratio" in ceiling:
        labels.append(FLOOR)
        heights.append(ceiling["floor_ratio"] or 0.0)
        colours.append("#ff7f0e")
    ax.bar(labels, heights, color=colours)
    ax.scatter([HIT] * len(rounds), rounds, color="black", zorder=3, label="each round")
    floor_rounds = ceiling.get("floor_ratio_rounds", [])
    ax.scatter([FLOOR] * len(floor_rounds), floor_rounds, color="black", zorder=3)
    ax.axhline(RATIO_TO_CEILING, linestyle="--", color="red", label=f"goal {RATIO_TO_CEILING:g}")
    ax.set_ylim(0, 1.1)
    ax.set_ylabel("requests/s, share of the ceiling")
    ax.set_title(f"Cache-hit generate vs the ceiling: {ratio or 0:.3f}")
    ax.legend(fontsize="small")


def draw(sections: Mapping[str, Any], machine: Mapping[str, Any], path: Path) -> Path | None:
    """Write the PNG; None (nothing written) when no section with figures to draw ran."""
    curves = _curves(sections)
    scenario_curves = {
        name: row["distribution_ms"]
        for name, row in sections.get("scenarios", {}).get("scenarios", {}).items()
    }
    ceiling = sections.get("ceiling")
    panels = [bool(curves), bool(scenario_curves), ceiling is not None]
    if not any(panels):
        return None
    figure = Figure(figsize=(6.5 * sum(panels), 5))
    axes = figure.subplots(1, sum(panels), squeeze=False)
    slots = iter(axes[0])
    if curves:
        _draw_distributions(next(slots), curves, "Latency distributions")
    if scenario_curves:
        _draw_distributions(next(slots), scenario_curves, "REST scenarios (httpx client)")
    if ceiling is not None:
        _draw_ratio(next(slots), ceiling)
    figure.suptitle(
        f"make bench: {machine.get('cores')} cores ({machine.get('cpu')}), "
        f"Envoy {''.join(str(machine.get('envoy', '')).split('/')[1:2])}"
    )
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    return path
