"""`make soak` (python -m bench.soak): steady mixed traffic against a private mesh for
SOAK_MINUTES, at about half its capacity, then errors and each service's memory.

It starts the same private mesh as `make bench` (bench/stack.py), fills the cache for the hit
stream, and measures the capacity of the mix: the four streams of bench/soak_traffic.py (cache
hits, cache misses, funnel events, feedback), unpaced and all at once, for SOAK_PROBE_SECONDS.
Half of that total (or SOAK_RATE requests/s when set, with no probe) is split among the streams
by their shares, and each is paced to its part. Every SOAK_REPORT_SECONDS it prints the rates
reached, the errors (non-2xx answers and socket errors) and the RSS of each service; at the
end, the totals, the RSS at the mesh's start, at the soak's start (after the probe, so start-up
and first-use growth are not counted) and at its end, the growth, each process's average CPU,
and the memory goal of issue 9 (each service at most 120 MB, growth at most 5 %). Results go to
bench/results/<UTC time>-soak.json and latest-soak.json.

Settings (environment):
  SOAK_MINUTES          how long the steady traffic runs (10)
  SOAK_RATE             total requests/s to send; unset: half the measured capacity
  SOAK_PROBE_SECONDS    the capacity probe (10)
  SOAK_REPORT_SECONDS   one progress line (and one pacing correction) per period (60)
  BENCH_SIM_LATENCY_MS, BENCH_GEN_MAX_INFLIGHT, BENCH_LOG_LEVEL, BENCH_RESULTS_DIR and
  BENCH_KEEP_LOGS as for `make bench` (bench/__main__.py).
"""

from __future__ import annotations

import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from bench import goals, memory, results, wrk
from bench.errors import BenchError
from bench.proc import CpuWindow, rss_snapshot
from bench.settings import BenchSettings, SettingError, SoakSettings
from bench.soak_traffic import SHARES, Pacer, Stream, streams, write_script
from bench.stack import SERVICES, Stack, mesh_env, private_stack
from bench.stats import fmt, share_percent
from devstack.infra import InfraError

Period = dict[str, wrk.WrkResult]


def run_period(
    wrk_binary: str,
    url: str,
    chosen: list[Stream],
    delays: dict[str, float],
    seconds: float,
    workdir: Path,
) -> Period:
    """Every stream at once for `seconds`, each with its delay (0: unpaced)."""

    def one(stream: Stream) -> wrk.WrkResult:
        script = write_script(stream, workdir, delays[stream.name])
        try:
            return wrk.run(
                wrk_binary, f"{url}{stream.path}", script, seconds, 1, stream.connections
            )
        finally:
            script.unlink(missing_ok=True)

    with ThreadPoolExecutor(len(chosen)) as pool:
        return dict(zip((s.name for s in chosen), pool.map(one, chosen), strict=True))


def _fill_cache(url: str, text: str) -> None:
    for _ in range(2):
        reply = httpx.post(f"{url}/api/generate", json={"text": text, "lang": "en"}, timeout=60)
        if reply.status_code != 200:
            raise BenchError(f"POST /api/generate -> {reply.status_code} {reply.text[:300]}")


def _rates(period: Period) -> str:
    return ", ".join(f"{name} {result.rps:,.0f}" for name, result in period.items())


def _errors(period: Period) -> tuple[int, int]:
    return (
        sum(r.non_2xx for r in period.values()),
        sum(r.socket_errors for r in period.values()),
    )


def _targets(
    stack: Stack, s: SoakSettings, chosen: list[Stream], wrk_binary: str
) -> tuple[float | None, dict[str, Pacer]]:
    """The capacity measured (None with SOAK_RATE) and each stream's pacer."""
    url = stack.config.gateway_url
    capacity: float | None = None
    if s.rate is None:
        print(
            f"==> capacity of the mix: every stream unpaced for {s.probe_seconds:g} s", flush=True
        )
        probe = run_period(
            wrk_binary, url, chosen, dict.fromkeys(SHARES, 0.0), s.probe_seconds, stack.scratch
        )
        capacity = sum(r.rps for r in probe.values())
        non_2xx, socket_errors = _errors(probe)
        print(
            f"    {capacity:,.0f} req/s ({_rates(probe)}); non-2xx {non_2xx}, socket errors "
            f"{socket_errors}"
        )
    total = s.rate if s.rate is not None else (capacity or 0.0) / 2
    pacers = {
        stream.name: Pacer(stream.connections, total * SHARES[stream.name]) for stream in chosen
    }
    return capacity, pacers


def soak(stack: Stack, s: SoakSettings, wrk_binary: str) -> dict[str, Any]:
    url = stack.config.gateway_url
    rss_mesh = rss_snapshot(stack.processes())
    hit_text = f"soak cache hit {uuid.uuid4().hex[:8]}"
    _fill_cache(url, hit_text)
    chosen = streams(hit_text)
    capacity, pacers = _targets(stack, s, chosen, wrk_binary)
    target = sum(p.target for p in pacers.values())
    print(
        f"==> {s.minutes:g} min at {target:,.0f} req/s"
        + (f" (half of {capacity:,.0f})" if capacity else " (SOAK_RATE)")
        + ": "
        + ", ".join(f"{name} {p.target:,.0f}" for name, p in pacers.items()),
        flush=True,
    )
    rss_start = rss_snapshot(stack.processes())
    print(f"    RSS MB at the start: {_service_rss(rss_start)}", flush=True)
    periods: list[Period] = []
    total_seconds = s.minutes * 60
    began = time.monotonic()
    with CpuWindow(stack.processes()) as cpu:
        while (elapsed := time.monotonic() - began) < total_seconds - 0.5:
            seconds = max(1.0, min(s.report_seconds, total_seconds - elapsed))
            delays = {name: pacer.delay_ms for name, pacer in pacers.items()}
            period = run_period(wrk_binary, url, chosen, delays, seconds, stack.scratch)
            for name, result in period.items():
                pacers[name].observe(result.rps, delays[name])
            periods.append(period)
            non_2xx, socket_errors = _errors(period)
            print(
                f"  {(time.monotonic() - began) / 60:5.1f} min: "
                f"{sum(r.rps for r in period.values()):,.0f} req/s ({_rates(period)}); non-2xx "
                f"{non_2xx}, socket errors {socket_errors}; RSS MB "
                f"{_service_rss(rss_snapshot(stack.processes()))}",
                flush=True,
            )
    wall = time.monotonic() - began
    rss = memory.table(
        {"mesh start": rss_mesh, "soak start": rss_start, "end": rss_snapshot(stack.processes())}
    )
    return {
        "minutes": s.minutes,
        "capacity_rps": capacity,
        "target_rps": {name: p.target for name, p in pacers.items()},
        "streams": _totals(periods),
        "cpu_percent": {name: share_percent(used, wall) for name, used in cpu.used.items()},
        "rss": rss,
    }


def _service_rss(snapshot: dict[str, float]) -> str:
    return ", ".join(f"{name} {snapshot[name]:.0f}" for name in SERVICES if name in snapshot)


def _totals(periods: list[Period]) -> dict[str, dict[str, Any]]:
    totals: dict[str, dict[str, Any]] = {}
    for name in periods[0] if periods else ():
        mine = [period[name] for period in periods]
        seconds = sum(r.seconds for r in mine)
        requests = sum(r.requests for r in mine)
        totals[name] = {
            "requests": requests,
            "rps": requests / seconds if seconds else 0.0,
            "non_2xx": sum(r.non_2xx for r in mine),
            "socket_errors": sum(r.socket_errors for r in mine),
            "p99_ms_max": max(r.p99_ms for r in mine),
        }
    return totals


def print_soak(figures: dict[str, Any]) -> None:
    print()
    header = (
        f"{'stream':<10} {'target/s':>9} {'reached/s':>9} {'requests':>10} {'non-2xx':>8} "
        f"{'socket errors':>13} {'worst p99 ms':>12}"
    )
    print(header)
    print("-" * len(header))
    for name, row in figures["streams"].items():
        print(
            f"{name:<10} {figures['target_rps'][name]:>9,.0f} {row['rps']:>9,.0f} "
            f"{row['requests']:>10,} {row['non_2xx']:>8} {row['socket_errors']:>13} "
            f"{row['p99_ms_max']:>12.1f}"
        )
    rows = figures["streams"].values()
    errors = sum(r["non_2xx"] + r["socket_errors"] for r in rows)
    print(f"errors: {errors} of {sum(r['requests'] for r in rows):,} requests")
    print()
    memory.print_rss(figures["rss"])
    print()
    print(
        "average CPU, % of a core: "
        + ", ".join(f"{name} {fmt(v, 0, 0)}" for name, v in figures["cpu_percent"].items())
    )


def main() -> int:
    try:
        settings = BenchSettings.from_env()
        soak_settings = SoakSettings.from_env()
    except SettingError as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 2
    wrk_binary = wrk.binary()
    if wrk_binary is None:
        print(f"ERROR: {wrk.INSTALL_HINT}", file=sys.stderr)
        return 1
    started = datetime.now(UTC)
    env = mesh_env(settings.sim_latency_ms, settings.gen_max_inflight, settings.log_level)
    try:
        with private_stack(env, with_echo=False) as stack:
            figures = soak(stack, soak_settings, wrk_binary)
    except (InfraError, BenchError, wrk.WrkError) as err:
        print(f"ERROR: {err}", file=sys.stderr)
        return 1
    print_soak(figures)
    verdicts = goals.judge_soak(figures["rss"], soak_settings.minutes)
    print()
    goals.print_goals(verdicts, os.cpu_count())
    document = {
        "started": started.isoformat(),
        "finished": datetime.now(UTC).isoformat(),
        "machine": results.machine(),
        "settings": {**vars(soak_settings), "sim_latency_ms": settings.sim_latency_ms},
        "soak": figures,
        "goals": goals.as_json(verdicts),
    }
    path = results.write(settings.results_dir, f"{results.stamp(started)}-soak", document)
    print(f"\nresults: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
