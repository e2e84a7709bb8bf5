"""Resident memory (RSS) of each process of a run at several moments, in `make bench` and
`make soak`, with the growth between the last two."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bench.stats import fmt


def growth_percent(start: float | None, end: float | None) -> float | None:
    return None if start is None or end is None or not start else (end - start) / start * 100


def table(columns: Mapping[str, Mapping[str, float]]) -> dict[str, dict[str, Any]]:
    """Per process: its RSS in MB under each column label (None when it could not be read
    then), and `growth_percent` from the second-to-last column to the last."""
    labels = list(columns)
    names: dict[str, None] = {}
    for snapshot in columns.values():
        names.update(dict.fromkeys(snapshot))
    rows: dict[str, dict[str, Any]] = {}
    for name in names:
        row: dict[str, Any] = {label: columns[label].get(name) for label in labels}
        row["growth_percent"] = growth_percent(row[labels[-2]], row[labels[-1]])
        rows[name] = row
    return rows


def print_rss(rows: Mapping[str, Mapping[str, Any]]) -> None:
    if not rows:
        print("RSS: not available (no /proc)")
        return
    labels = [k for k in next(iter(rows.values())) if k != "growth_percent"]
    header = (
        f"{'RSS, MB':<14} " + " ".join(f"{label:>12}" for label in labels) + f" {'growth %':>9}"
    )
    print(header)
    print("-" * len(header))
    for name, row in rows.items():
        cells = " ".join(fmt(row[label], 12) for label in labels)
        print(f"{name:<14} {cells} {fmt(row['growth_percent'], 9, 1, sign=True)}")
    print(
        f"  growth: {labels[-2]} to {labels[-1]}; each process with its descendants (Envoy: "
        "one process, its worker threads included)"
    )
