"""Summaries of samples, the same way in every table of `make bench`."""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (`p` in 0..1) of `values`; 0.0 for no values."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


def median_known(values: Sequence[float | None]) -> float | None:
    """The median of the values that are known; None when none is."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def per_unit_us(seconds: float | None, units: int) -> float | None:
    """Microseconds of `seconds` (CPU time) per unit of work; None when unknown or no work."""
    return None if seconds is None or units == 0 else seconds / units * 1e6


def share_percent(seconds: float | None, wall: float) -> float | None:
    """CPU seconds over wall seconds x 100: the share of one core (the machine is 100 x its
    cores)."""
    return None if seconds is None or not wall else seconds / wall * 100


def fmt(value: float | None, width: int, digits: int = 1, sign: bool = False) -> str:
    """`value` right-aligned in `width`, with thousands separators; n/a when unknown."""
    if value is None:
        return f"{'n/a':>{width}}"
    return f"{value:>+{width},.{digits}f}" if sign else f"{value:>{width},.{digits}f}"


def distribution(values: Sequence[float], points: Sequence[float]) -> dict[str, float]:
    """The percentiles `points` (0..100) of `values`, keyed by their text ("99.9"), as the
    JSON results and the plot take them."""
    return {f"{p:g}": percentile(values, p / 100) for p in points}
