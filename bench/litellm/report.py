"""genmesh and LiteLLM side by side, and the run's JSON document: bench/results/<UTC
time>-litellm.json and latest-litellm.json (`make bench`'s latest.json is left alone)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from bench import ceiling, results
from bench.stats import fmt

GENMESH, LITELLM = "genmesh", "LiteLLM"
# The processes each request goes through, whose CPU the comparison adds up (the load
# generator, the idle simulator and the processes of the other path left out). "redis" is
# there only when the run started its own Redis: a shared one's CPU is other people's too.
GENMESH_HIT_PATH = ("envoy-bench", "generation", "quota", "telemetry", "redis")
GENMESH_MISS_PATH = ("envoy", "generation", "quota", "telemetry", "redis")
LITELLM_PATH = ("litellm", "redis")
# (row, digits): the rows of the table, in order.
ROWS = (
    ("cache-hit req/s", 0),
    ("cache-hit p50 ms", 2),
    ("cache-hit p99 ms", 2),
    ("cache-hit non-2xx + socket errors", 0),
    ("cache-hit CPU µs per request", 0),
    ("miss: added median ms", 2),
    ("miss: added p99 ms", 2),
    ("miss: CPU µs per request", 0),
)


def _cpu(per_process: Mapping[str, float | None], path: Iterable[str]) -> float | None:
    known = [v for name in path if (v := per_process.get(name)) is not None]
    return sum(known) if known else None


def _hit_rows(hit: Mapping[str, Any] | None, path: Iterable[str]) -> dict[str, float | None]:
    if hit is None:
        return {}
    return {
        "cache-hit req/s": hit["rps"],
        "cache-hit p50 ms": hit["p50_ms"],
        "cache-hit p99 ms": hit["p99_ms"],
        "cache-hit non-2xx + socket errors": hit["non_2xx"] + hit["socket_errors"],
        "cache-hit CPU µs per request": _cpu(hit["cpu_us_per_request"], path),
    }


def _miss_rows(miss: Mapping[str, Any] | None, path: Iterable[str]) -> dict[str, float | None]:
    if miss is None:
        return {}
    return {
        "miss: added median ms": miss["added_median_ms"],
        "miss: added p99 ms": miss["added_p99_ms"],
        "miss: CPU µs per request": _cpu(miss["cpu_us_per_pair"], path),
    }


def comparison(
    genmesh: Mapping[str, Any], litellm: Mapping[str, Any]
) -> dict[str, dict[str, float | None]]:
    """Row -> {GENMESH: figure, LITELLM: figure}, None where a side was not measured.
    `genmesh` holds bench.sections' `ceiling` and `miss` figures, `litellm` this package's
    `cache_hit` and `miss`."""
    ceiling_figures = genmesh.get("ceiling")
    sides = {
        GENMESH: {
            **_hit_rows(
                ceiling_figures["variants"][ceiling.HIT] if ceiling_figures else None,
                GENMESH_HIT_PATH,
            ),
            **_miss_rows(genmesh.get("miss"), GENMESH_MISS_PATH),
        },
        LITELLM: {
            **_hit_rows(litellm.get("cache_hit"), LITELLM_PATH),
            **_miss_rows(litellm.get("miss"), LITELLM_PATH),
        },
    }
    return {row: {side: sides[side].get(row) for side in sides} for row, _ in ROWS}


def print_comparison(rows: Mapping[str, Mapping[str, float | None]], version: str) -> None:
    header = f"{'':<36} {GENMESH:>10} {LITELLM + ' ' + version:>16}"
    print(header)
    print("-" * len(header))
    for row, digits in ROWS:
        cells = rows[row]
        print(f"{row:<36} {fmt(cells[GENMESH], 10, digits)} {fmt(cells[LITELLM], 16, digits)}")
    genmesh_rps, litellm_rps = rows["cache-hit req/s"][GENMESH], rows["cache-hit req/s"][LITELLM]
    if genmesh_rps and litellm_rps is not None:
        print(f"LiteLLM / genmesh cache-hit req/s = {litellm_rps / genmesh_rps:.2f}")
    print(
        "  CPU: the processes on each path (genmesh: "
        f"{', '.join(GENMESH_HIT_PATH[:-1])}; LiteLLM: its proxy; Redis only when the run "
        "started its own); a miss pair's simulator CPU is left out on both sides"
    )


def write(results_dir: Path, started: datetime, document: Mapping[str, Any]) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    text = json.dumps(document, indent=2, default=str) + "\n"
    path = results_dir / f"{results.stamp(started)}-litellm.json"
    path.write_text(text)
    (results_dir / "latest-litellm.json").write_text(text)
    return path
