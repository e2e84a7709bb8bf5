"""Each section of `make bench`, wired to the running stack and the settings: it prints its
tables and returns its figures (JSON-able) for the results, the goals and the plot."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

from bench import (
    ceiling,
    events,
    limits_cost,
    misses,
    processes,
    quota,
    ratelimit,
    tracing_cost,
    validation_cost,
    wrk,
)
from bench.envoy import Gateway, extra_gateway
from bench.events_report import print_events
from bench.floor import ENVOY as FLOOR_ENVOY
from bench.floor import QUOTA as FLOOR_QUOTA
from bench.floor import TELEMETRY as FLOOR_TELEMETRY
from bench.scenarios import print_scenarios
from bench.settings import BenchSettings
from bench.singleflight import print_single_flight
from bench.stack import Stack

Section = Callable[[Stack, BenchSettings], dict[str, Any]]
# Sections that need wrk (Envoy cannot be loaded enough from Python); skipped without it.
NEEDS_WRK = frozenset({"ceiling", "limits", "processes", "tracing", "events"})


def _wrk() -> str:
    binary = wrk.binary()
    if binary is None:  # checked before any section runs
        raise wrk.WrkError(wrk.INSTALL_HINT)
    return binary


def run_ceiling(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    if stack.gateway is None:
        raise RuntimeError("the ceiling needs the bench's Envoy (private_stack(with_echo=True))")
    runs = ceiling.measure(
        _wrk(),
        stack.gateway.url,
        stack.processes(),
        stack.scratch,
        s.rounds,
        s.wrk_seconds,
        s.warmup_seconds,
        s.connections,
        stack.floor.url if stack.floor is not None else None,
    )
    figures = ceiling.summarize(runs, s.connections)
    ceiling.print_ceiling(figures, s.rounds, s.wrk_seconds, s.warmup_seconds)
    return figures


def run_miss(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    config = stack.config
    pids = {
        name: pid for name, pid in stack.processes().items() if name not in ("echo", "envoy-bench")
    }
    samples = misses.measure(
        config.gateway_url, config.simulator_url, config.simulator_api_key, s.misses, pids
    )
    figures = misses.summarize(samples, s.sim_latency_ms)
    misses.print_misses(figures)
    if stack.floor is not None:
        floor_samples = misses.measure_floor(
            stack.floor.url, config.simulator_url, config.simulator_api_key, s.misses, pids
        )
        figures["floor"] = misses.summarize(floor_samples, s.sim_latency_ms, via=misses.FLOOR)
        print()
        misses.print_misses(
            figures["floor"],
            via=misses.FLOOR,
            through="the shape's floor (its hops and round trips, no code)",
            who="the floor",
        )
    return figures


def run_quota(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    pids = {"quota": stack.pid("quota")}
    if stack.floor is not None:
        pids["floor-quota"] = stack.floor.quota.pid
    if "redis" in stack.processes():
        pids["redis"] = stack.pid("redis")
    runs = asyncio.run(
        quota.measure(
            stack.config.quota_addr,
            pids,
            s.rounds,
            s.quota_seconds,
            s.warmup_seconds,
            s.quota_inflight,
            stack.floor.quota_addr if stack.floor is not None else None,
        )
    )
    figures = quota.summarize(runs, s.quota_inflight)
    quota.print_quota(figures, s.rounds, s.quota_seconds)
    return figures


def run_ratelimit(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    print(ratelimit.NOTE.format(cores=os.cpu_count()))
    runs = asyncio.run(
        ratelimit.measure_decisions(
            stack.config.quota_addr, stack.pid("quota"), s.rounds, s.rls_seconds, 1.0
        )
    )
    return ratelimit.print_decisions(runs, s.rls_seconds)


def run_limits(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    config = stack.config
    on = Gateway(
        "limits on",
        config.gateway_url,
        f"http://127.0.0.1:{config.gateway_admin_port}",
        stack.pid("envoy"),
    )
    services = {name: stack.pid(name) for name in ("quota", "generation")}
    if "redis" in stack.processes():
        services["redis"] = stack.pid("redis")
    with extra_gateway(stack.mesh, "limits off", {"GATEWAY_RATE_LIMIT": "false"}) as off:
        report = limits_cost.measure_cost(
            _wrk(),
            on,
            off,
            services,
            stack.scratch,
            s.rounds,
            s.wrk_seconds,
            s.warmup_seconds,
        )
    return limits_cost.print_cost(report)


def run_processes(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    report = processes.measure(_wrk(), stack, s.rounds, s.wrk_seconds, s.warmup_seconds)
    figures = processes.summarize(report)
    processes.print_processes(figures)
    return figures


def run_tracing(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    figures = tracing_cost.measure(_wrk(), stack, s.rounds, s.wrk_seconds, s.warmup_seconds)
    tracing_cost.print_tracing(figures)
    return figures


def run_validation(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    per_call = validation_cost.measure()
    hit = stack.figures.get("ceiling", {}).get("variants", {}).get(ceiling.HIT, {})
    per_hit: dict[str, float] | None = hit.get("cpu_us_per_request")
    validation_cost.print_validation(per_call, per_hit)
    return {"cpu_us_per_call": per_call, "service_cpu_us_per_hit": per_hit}


def run_events(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    config = stack.config
    services = {name: stack.pid(name) for name in ("envoy", "quota", "telemetry")}
    if stack.floor is not None:
        floor = stack.floor.processes()
        services |= {name: floor[name] for name in (FLOOR_ENVOY, FLOOR_QUOTA, FLOOR_TELEMETRY)}
    report = asyncio.run(
        events.measure(
            _wrk(),
            config.gateway_url,
            config.database_url,
            services,
            stack.scratch,
            s.rounds,
            s.events_seconds,
            s.warmup_seconds,
            stack.floor.url if stack.floor is not None else None,
        )
    )
    return print_events(report, os.cpu_count())


def run_scenarios(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    return print_scenarios(stack.config.gateway_url, s.requests, s.concurrency)


def run_singleflight(stack: Stack, s: BenchSettings) -> dict[str, Any]:
    config = stack.config
    return print_single_flight(
        config.gateway_url, config.simulator_url, s.burst, s.burst_rounds, s.sim_latency_ms
    )


SECTIONS: dict[str, Section] = {
    "ceiling": run_ceiling,
    "miss": run_miss,
    "quota": run_quota,
    "ratelimit": run_ratelimit,
    "limits": run_limits,
    "processes": run_processes,
    "tracing": run_tracing,
    "validation": run_validation,
    "events": run_events,
    "scenarios": run_scenarios,
    "singleflight": run_singleflight,
}
