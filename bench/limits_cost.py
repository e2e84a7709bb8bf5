"""What the rate limits cost on the cache-hit generate path, in `make bench`: the same
cache-hit POST /api/generate through the mesh's Envoy (limits on) and through a second Envoy
with GATEWAY_RATE_LIMIT=false, alternately, with wrk; throughput, latency and each process's
CPU time per request. Every limit is raised so that nothing is refused.
"""

from __future__ import annotations

import json
import statistics
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from bench import wrk
from bench.envoy import Gateway, rate_limit_counters
from bench.errors import BenchError
from bench.proc import CpuWindow
from bench.stats import fmt, median_known, per_unit_us

WRK_THREADS = 2
WRK_CONNECTIONS = 32


@dataclass(frozen=True)
class CostRun:
    gateway: Gateway
    result: wrk.WrkResult
    # CPU seconds per process during the run: "envoy <label>" for each gateway, then the
    # services by name.
    cpu: dict[str, float]


@dataclass(frozen=True)
class CostReport:
    on: Gateway
    off: Gateway
    runs: list[CostRun]
    seconds: float
    # Per gateway label: Envoy's rate-limit counters over the measured runs.
    checks: dict[str, dict[str, int]]


def _envoy(gateway: Gateway) -> str:
    return f"envoy {gateway.label}"


def _probe(gateway: Gateway, body: str) -> bool:
    """One generate request through `gateway` (the first one fills the response cache); True
    when the answer carries X-RateLimit-Limit, i.e. the gateway asked for a decision."""
    reply = httpx.post(
        f"{gateway.url}/api/generate",
        content=body,
        headers={"content-type": "application/json"},
        timeout=60,
    )
    if reply.status_code != 200:
        raise BenchError(f"{gateway.label}: POST /api/generate -> {reply.status_code} {reply.text}")
    return "x-ratelimit-limit" in reply.headers


def measure_cost(
    wrk_binary: str,
    on: Gateway,
    off: Gateway,
    services: Mapping[str, int],
    workdir: Path,
    rounds: int,
    seconds: float,
    warmup: float,
) -> CostReport:
    """Cache-hit POST /api/generate (the same body every time) through `on` and `off`,
    alternately `rounds` times each after a warm-up of each, with the CPU every process used
    during each run. Alternating spreads the machine's drift (other work, thermal limits,
    caches) over both gateways instead of loading it onto whichever ran last."""
    body = json.dumps({"text": f"bench rate-limit cost {uuid.uuid4().hex[:8]}", "lang": "en"})
    script = wrk.write_post_json_script(workdir / "generate.lua", body)
    for gateway, asks in ((on, True), (off, False)):
        if _probe(gateway, body) != asks:
            raise BenchError(
                f"{gateway.label} ({gateway.url}) "
                f"{'sent no' if asks else 'sent'} X-RateLimit-Limit header: its rate limiting "
                "is not what its label says, so the comparison would mean nothing"
            )

    def drive(gateway: Gateway, duration: float) -> wrk.WrkResult:
        return wrk.run(
            wrk_binary,
            f"{gateway.url}/api/generate",
            script,
            duration,
            threads=WRK_THREADS,
            connections=WRK_CONNECTIONS,
        )

    for gateway in (on, off):
        drive(gateway, warmup)
    pids = {_envoy(on): on.pid, _envoy(off): off.pid, **services}
    before = {g.label: rate_limit_counters(g.admin_url) for g in (on, off)}
    runs: list[CostRun] = []
    for _ in range(rounds):
        for gateway in (on, off):
            with CpuWindow(pids) as cpu:
                result = drive(gateway, seconds)
            runs.append(CostRun(gateway, result, cpu.used))
    after = {g.label: rate_limit_counters(g.admin_url) for g in (on, off)}
    checks = {
        label: {kind: after[label][kind] - count for kind, count in counts.items()}
        for label, counts in before.items()
    }
    return CostReport(on, off, runs, seconds, checks)


def _cpu_rows(report: CostReport, run: CostRun) -> dict[str, float | None]:
    """µs of CPU per request, by process, for one run. The serving Envoy is the one wrk
    drove; the idle one shows the background (health checks, stats) it costs meanwhile."""
    idle = report.off if run.gateway is report.on else report.on
    names = {
        "envoy serving the run": _envoy(run.gateway),
        "envoy idle (the other)": _envoy(idle),
        **{name: name for name in run.cpu if not name.startswith("envoy ")},
    }
    # wrk counts the requests answered before it stopped; the few in flight then (at most one
    # per connection) are served too, a bias of the same size for both gateways.
    requests = run.result.requests
    rows = {label: per_unit_us(run.cpu.get(key), requests) for label, key in names.items()}
    known = [value for value in rows.values() if value is not None]
    rows["all of the above"] = sum(known) if known else None
    return rows


def print_cost(report: CostReport) -> dict[str, Any]:
    """Print the tables; return their figures (medians per gateway) for the results."""
    on, off = report.on, report.off
    rounds = sum(1 for run in report.runs if run.gateway is on)
    print(
        f"Cost of the limits on cache-hit POST /api/generate: the mesh's Envoy ({on.label}) vs "
        f"a second Envoy ({off.label}, GATEWAY_RATE_LIMIT=false), wrk -t{WRK_THREADS} "
        f"-c{WRK_CONNECTIONS}, {rounds} x {report.seconds:g} s each, alternating"
    )
    header = (
        f"{'gateway':<24} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'non-2xx':>7} "
        f"{'socket errors':>13}"
    )
    print(header)
    print("-" * len(header))
    rps: dict[str, float] = {}
    p50: dict[str, float] = {}
    p99: dict[str, float] = {}
    for gateway in (on, off):
        mine = [run.result for run in report.runs if run.gateway is gateway]
        rps[gateway.label] = statistics.median(r.rps for r in mine)
        p50[gateway.label] = statistics.median(r.p50_ms for r in mine)
        p99[gateway.label] = statistics.median(r.p99_ms for r in mine)
        print(
            f"{gateway.label:<24} {rps[gateway.label]:>9.0f} {p50[gateway.label]:>7.2f} "
            f"{p99[gateway.label]:>7.2f} {sum(r.non_2xx for r in mine):>7} "
            f"{sum(r.socket_errors for r in mine):>13}"
        )
    ratio = rps[on.label] / rps[off.label] if rps[off.label] else None
    print(
        f"RPS(on)/RPS(off) = {fmt(ratio, 0, 3)}; with limits on, p50 "
        f"{p50[on.label] - p50[off.label]:+.2f} ms, p99 {p99[on.label] - p99[off.label]:+.2f} ms"
    )

    print()
    header = f"{'CPU µs per request':<24} {on.label:>11} {off.label:>11} {'on - off':>9}"
    print(header)
    print("-" * len(header))
    per_run = [(run.gateway, _cpu_rows(report, run)) for run in report.runs]
    cpu_us: dict[str, dict[str, float | None]] = {}
    for label in per_run[0][1]:
        medians = {
            g.label: median_known([rows[label] for gw, rows in per_run if gw is g])
            for g in (on, off)
        }
        cpu_us[label] = medians
        a, b = medians[on.label], medians[off.label]
        delta = None if a is None or b is None else a - b
        print(f"{label:<24} {fmt(a, 11)} {fmt(b, 11)} {fmt(delta, 9, sign=True)}")

    served = {
        g.label: sum(run.result.requests for run in report.runs if run.gateway is g)
        for g in (on, off)
    }
    for gateway in (on, off):
        counts = ", ".join(f"{kind} {n}" for kind, n in report.checks[gateway.label].items())
        print(
            f"rate-limit checks by the {gateway.label} Envoy during its runs: {counts} "
            f"(wrk counted {served[gateway.label]} requests)"
        )
    passed = report.checks[on.label]["failure_mode_allowed"]
    if passed:
        print(
            f"  {passed} checks failed or timed out (GATEWAY_RATE_LIMIT_TIMEOUT_MS) and their "
            "requests passed without a decision (fail open)"
        )
    return {
        "rps": rps,
        "p50_ms": p50,
        "p99_ms": p99,
        "ratio_on_off": ratio,
        "cpu_us_per_request": cpu_us,
        "rate_limit_checks": report.checks,
    }
