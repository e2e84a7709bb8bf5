"""The funnel-events table of `make bench` (bench/events.py measures): committed events per
second through the mesh and row at a time, the cross-check of stored rows, and the CPU each
process spent per event."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from bench.events import (
    CLIENT,
    CONNECTIONS,
    EVENTS_PER_REQUEST,
    FLOOR,
    MESH,
    POSTGRES,
    ROWS,
    THREADS,
    EventsReport,
    EventsRun,
)
from bench.stats import fmt, median_known


def print_events(report: EventsReport, cores: int | None) -> dict[str, Any]:
    """Print the tables; return the figures (medians per variant) for the results and the
    goals (bench/goals.py judges them)."""
    runs = report.runs
    rounds = sum(1 for run in runs if run.variant == MESH)
    print(
        f"Funnel events: committed events per second, {rounds} alternating rounds x "
        f"{report.seconds:g} s per variant after a {report.warmup:g} s warm-up of each"
    )
    print(
        f"  {cores} cores, shared by the load generator, the mesh, PostgreSQL "
        f"({report.server}) and the machine's other work: noisy, quote the ratio"
    )
    print(
        f"  mesh: wrk -t{THREADS} -c{CONNECTIONS}, {EVENTS_PER_REQUEST} new events per request, "
        f"committed = 2xx x {EVENTS_PER_REQUEST}; row at a time: {CONNECTIONS} asyncpg "
        "connections, one INSERT per event (autocommit)"
    )
    header = (
        f"{'variant':<32} {'events/s':>9} {'rows/s':>9} {'calls/s':>8} {'p50 ms':>7} "
        f"{'p99 ms':>7} {'failed':>6} {'socket errors':>13}"
    )
    print(header)
    print("-" * len(header))
    variants = report.variants
    medians: dict[str, float] = {}
    for variant in variants:
        mine = [run for run in runs if run.variant == variant]
        medians[variant] = statistics.median(run.rate for run in mine)
        print(
            f"{variant:<32} {medians[variant]:>9,.0f} "
            f"{fmt(median_known([run.stored_rate for run in mine]), 9, 0)} "
            f"{statistics.median(run.calls / run.seconds for run in mine):>8,.0f} "
            f"{statistics.median(run.p50_ms for run in mine):>7.2f} "
            f"{statistics.median(run.p99_ms for run in mine):>7.2f} "
            f"{sum(run.failed for run in mine):>6} {sum(run.socket_errors for run in mine):>13}"
        )
    for variant in variants:
        each = ", ".join(f"{run.rate:,.0f}" for run in runs if run.variant == variant)
        print(f"  {variant}, events/s per round: {each}")
    print(
        "  rows/s: rows of the run's ids found in funnel_events afterwards / seconds (mesh: "
        f"may exceed events/s by up to {CONNECTIONS} requests in flight when wrk stopped)"
    )
    mismatches = [(run, why) for run in runs if (why := run.mismatch()) is not None]
    for run, why in mismatches:
        print(f"  MISMATCH in a {run.variant} run (ids {run.prefix}-...): {why}")
    if not mismatches:
        print(
            "  cross-check: every run's rows in funnel_events tally with what its client was told"
        )
    cpu = _print_cpu(runs, variants)

    mesh, rows = medians[MESH], medians[ROWS]
    ratio = mesh / rows if rows else None
    print(f"mesh / row at a time = {fmt(ratio, 0)}x (medians: {mesh:,.0f} / {rows:,.0f} events/s)")
    if FLOOR in medians:
        floor = medians[FLOOR]
        print(
            f"floor / row at a time = {fmt(floor / rows if rows else None, 0)}x, mesh / floor = "
            f"{fmt(mesh / floor if floor else None, 0, 2)} (the floor: Envoy, the rate-limit "
            "check and one INSERT per request, no code)"
        )
    clean = not mismatches and not any(run.failed or run.socket_errors for run in runs)
    return {
        "events_per_second": medians,
        "rounds": {v: [run.rate for run in runs if run.variant == v] for v in variants},
        "ratio": ratio,
        "clean": clean,
        "server": report.server,
        "events_per_request": EVENTS_PER_REQUEST,
        "connections": CONNECTIONS,
        "cpu_us_per_event": cpu,
    }


def _print_cpu(
    runs: Sequence[EventsRun], variants: Sequence[str]
) -> dict[str, dict[str, float | None]]:
    """CPU per committed event and share of one core, by process, medians per variant; returns
    the CPU µs per event by variant and process."""
    names = [CLIENT, *(n for n in runs[0].cpu if n not in (CLIENT, POSTGRES))]
    if all(POSTGRES in run.cpu for run in runs):
        names.append(POSTGRES)
    short = {MESH: "mesh", ROWS: "rows", FLOOR: "floor"}
    header = f"{'CPU, medians':<24}" + "".join(
        f" {short[v] + ' µs/event':>14} {short[v] + ' % core':>12}" for v in variants
    )
    print(header)
    print("-" * len(header))

    def medians(variant: str, pick: Sequence[str]) -> tuple[float | None, float | None]:
        used = [
            (sum(run.cpu[n] for n in pick), run)
            for run in runs
            if run.variant == variant and all(n in run.cpu for n in pick)
        ]
        per_event = median_known(
            [cpu / run.committed * 1e6 if run.committed else None for cpu, run in used]
        )
        share = median_known(
            [cpu / run.seconds * 100 if run.seconds else None for cpu, run in used]
        )
        return per_event, share

    def cells(pick: Sequence[str]) -> str:
        out = ""
        for variant in variants:
            per_event, share = medians(variant, pick)
            out += f" {fmt(per_event, 14, 1)} {fmt(share, 12, 0)}"
        return out

    for name in names:
        print(f"{name:<24}{cells([name])}")
    print(f"{'all of the above':<24}{cells(names)}")
    print("  % core: CPU time / wall time x 100, so the whole machine is 100 x its cores")
    return {v: {name: medians(v, [name])[0] for name in names} for v in variants}
