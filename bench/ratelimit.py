"""The rate-limit figures of `make bench`, measured in the same run as the other scenarios:

1. Decisions per second of one quota process: its ShouldRateLimit (Envoy's rate limit service)
   called directly over gRPC, a fixed number of calls in flight, as a guest request (one
   descriptor: path + client IP) and as a signed-in one (two: + path and user), alternately.
2. What the limits cost on the cache-hit generate path: the same cache-hit POST /api/generate
   through the mesh's Envoy (limits on) and through a second Envoy with GATEWAY_RATE_LIMIT=false,
   alternately, with wrk; throughput, latency and each process's CPU time per request.

Every limit is raised so that nothing is refused: the figures are the cost of asking and
counting, not of refusing.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx

from bench import wrk
from bench.envoy import Gateway, rate_limit_counters
from bench.proc import CpuWindow
from bench.stats import percentile
from services.quota.ratelimit.config import DEFAULT_CONFIG, Scope, load_config
from services.quota.ratelimit.decider import PATH_ENTRY, REMOTE_ADDRESS_ENTRY, USER_ENTRY
from services.quota.ratelimit.rls import SERVICE_NAME, RlsMessages

# High enough that no bench traffic is refused: all of it comes from 127.0.0.1, one client
# network, at thousands of requests a second.
RAISED_LIMIT = "1000000/second"
RLS_METHOD = f"/{SERVICE_NAME}/ShouldRateLimit"
RLS_DOMAIN = "genmesh"  # what Envoy sends (envoy.yaml.tmpl); the quota service ignores it
RLS_PATH = "/api/generate"
RLS_CALL_TIMEOUT_SECONDS = 5.0
RLS_INFLIGHT = 16
# Distinct client IPs (and users) cycled through, so each call counts against its own GCRA
# key, as real traffic from many clients does, rather than one hot key.
RLS_SUBJECTS = 1 << 15
_RLS_OK = 1  # envoy.service.ratelimit.v3.RateLimitResponse.Code.OK
WRK_THREADS = 2
WRK_CONNECTIONS = 32

NOTE = (
    "Rate limits: medians of alternating runs on a shared, noisy machine ({cores} cores shared "
    "by the load generator and every process); quote the ratios, not the absolute figures."
)


def raised_limits_env() -> dict[str, str]:
    """RATE_LIMIT_<ROUTE>_PER_IP / _PER_USER = RAISED_LIMIT for every route of the limits file
    the quota service reads, and for the default, so no bench scenario is ever refused."""
    config = load_config(Path(os.environ.get("RATE_LIMIT_CONFIG") or DEFAULT_CONFIG))
    names = [route.name for route in config.routes] + ["default"]
    return {
        f"RATE_LIMIT_{name.upper()}_PER_{scope.value.upper()}": RAISED_LIMIT
        for name in names
        for scope in Scope
    }


def _cpu_per_unit_us(seconds: float | None, units: int) -> float | None:
    return None if seconds is None or units == 0 else seconds / units * 1e6


def _fmt(value: float | None, width: int, digits: int = 1, sign: bool = False) -> str:
    if value is None:
        return f"{'n/a':>{width}}"
    return f"{value:>+{width}.{digits}f}" if sign else f"{value:>{width}.{digits}f}"


def _median(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


# -- 1. decisions per second of one quota process ----------------------------------------------


@dataclass(frozen=True)
class RlsKind:
    name: str
    signed_in: bool
    # Second octet of the client IPs, so the two kinds never share a GCRA key.
    network: int


RLS_KINDS = (
    RlsKind("guest (IP)", signed_in=False, network=1),
    RlsKind("signed in (IP + user)", signed_in=True, network=2),
)


@dataclass
class RlsRun:
    kind: RlsKind
    latencies_ms: list[float] = field(default_factory=list)
    refused: int = 0
    errors: int = 0
    seconds: float = 0.0
    cpu: dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return len(self.latencies_ms) / self.seconds if self.seconds else 0.0

    def cpu_us_per_decision(self) -> float | None:
        return _cpu_per_unit_us(self.cpu.get("quota"), len(self.latencies_ms))

    def cpu_percent(self, name: str) -> float | None:
        """Share of one core `name` used during the run: near 100 for the quota process
        means it was the bottleneck, not the client."""
        used = self.cpu.get(name)
        return None if used is None or not self.seconds else used / self.seconds * 100


def rls_payloads(messages: RlsMessages, kind: RlsKind) -> list[bytes]:
    """Serialized RateLimitRequests as Envoy builds them (envoy.yaml.tmpl's rate_limits),
    made once up front so the client spends its CPU on calls, not on protobuf."""
    payloads: list[bytes] = []
    for i in range(RLS_SUBJECTS):
        request: Any = messages.request()
        request.domain = RLS_DOMAIN
        ip = f"10.{kind.network}.{i >> 8 & 255}.{i & 255}"
        entries = [[(PATH_ENTRY, RLS_PATH), (REMOTE_ADDRESS_ENTRY, ip)]]
        if kind.signed_in:
            entries.append([(PATH_ENTRY, RLS_PATH), (USER_ENTRY, f"bench-user-{i}")])
        for pairs in entries:
            descriptor = request.descriptors.add()
            for key, value in pairs:
                entry = descriptor.entries.add()
                entry.key, entry.value = key, value
        payloads.append(request.SerializeToString())
    return payloads


Call = Callable[..., Any]


async def _drive(call: Call, payloads: Sequence[bytes], run: RlsRun, seconds: float) -> None:
    """RLS_INFLIGHT workers, each with one call in flight, until `seconds` have passed."""
    deadline = time.perf_counter() + seconds
    counter = itertools.count()

    async def worker() -> None:
        while time.perf_counter() < deadline:
            payload = payloads[next(counter) % len(payloads)]
            started = time.perf_counter()
            try:
                reply = await call(payload, timeout=RLS_CALL_TIMEOUT_SECONDS)
            except grpc.aio.AioRpcError:
                run.errors += 1
                continue
            run.latencies_ms.append((time.perf_counter() - started) * 1000)
            if reply.overall_code != _RLS_OK:
                run.refused += 1

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(RLS_INFLIGHT)))
    # Until the last call came back: the calls counted are the calls completed.
    run.seconds = time.perf_counter() - began


async def measure_decisions(
    quota_addr: str, quota_pid: int, rounds: int, seconds: float, warmup: float
) -> list[RlsRun]:
    """Alternate guest and signed-in runs `rounds` times, after a warm-up of each; each run
    records client-side latencies and the CPU the quota process (and this client) used."""
    messages = RlsMessages()
    payloads = {kind: rls_payloads(messages, kind) for kind in RLS_KINDS}
    pids = {"quota": quota_pid, "client": os.getpid()}
    runs: list[RlsRun] = []
    async with grpc.aio.insecure_channel(quota_addr) as channel:
        # Bytes in (already serialized), the response decoded to check its overall code.
        call = channel.unary_unary(
            RLS_METHOD,
            request_serializer=None,
            response_deserializer=messages.response.FromString,
        )
        for kind in RLS_KINDS:
            await _drive(call, payloads[kind], RlsRun(kind), warmup)
        for _ in range(rounds):
            for kind in RLS_KINDS:
                run = RlsRun(kind)
                with CpuWindow(pids) as cpu:
                    await _drive(call, payloads[kind], run, seconds)
                run.cpu = cpu.used
                runs.append(run)
    return runs


def print_decisions(runs: Sequence[RlsRun], seconds: float) -> None:
    rounds = sum(1 for run in runs if run.kind == RLS_KINDS[0])
    print(
        f"Rate-limit decisions of one quota process: ShouldRateLimit over gRPC, {RLS_INFLIGHT} "
        f"calls in flight, {rounds} x {seconds:g} s per request kind, alternating"
    )
    header = (
        f"{'request':<24} {'decisions/s':>11} {'p50 ms':>7} {'p99 ms':>7} "
        f"{'quota CPU µs/decision':>21} {'quota CPU %':>11} {'client CPU %':>12} "
        f"{'refused':>7} {'errors':>6}"
    )
    print(header)
    print("-" * len(header))
    for kind in RLS_KINDS:
        mine = [run for run in runs if run.kind == kind]
        per_decision = _median([run.cpu_us_per_decision() for run in mine])
        quota_share = _median([run.cpu_percent("quota") for run in mine])
        client_share = _median([run.cpu_percent("client") for run in mine])
        print(
            f"{kind.name:<24} {statistics.median(r.rate for r in mine):>11.0f} "
            f"{statistics.median(percentile(r.latencies_ms, 0.50) for r in mine):>7.2f} "
            f"{statistics.median(percentile(r.latencies_ms, 0.99) for r in mine):>7.2f} "
            f"{_fmt(per_decision, 21)} {_fmt(quota_share, 11, 0)} {_fmt(client_share, 12, 0)} "
            f"{sum(r.refused for r in mine):>7} {sum(r.errors for r in mine):>6}"
        )


# -- 2. what the limits cost on the cache-hit generate path ------------------------------------


class BenchError(RuntimeError):
    """The comparison cannot be trusted (a gateway is not what its label says, a request
    failed); the message says why."""


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
    rows = {label: _cpu_per_unit_us(run.cpu.get(key), requests) for label, key in names.items()}
    known = [value for value in rows.values() if value is not None]
    rows["all of the above"] = sum(known) if known else None
    return rows


def print_cost(report: CostReport) -> None:
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
    ratio = rps[on.label] / rps[off.label] if rps[off.label] else float("nan")
    print(
        f"RPS(on)/RPS(off) = {ratio:.3f}; with limits on, p50 "
        f"{p50[on.label] - p50[off.label]:+.2f} ms, p99 {p99[on.label] - p99[off.label]:+.2f} ms"
    )

    print()
    header = f"{'CPU µs per request':<24} {on.label:>11} {off.label:>11} {'on - off':>9}"
    print(header)
    print("-" * len(header))
    per_run = [(run.gateway, _cpu_rows(report, run)) for run in report.runs]
    for label in per_run[0][1]:
        medians = {
            g.label: _median([rows[label] for gw, rows in per_run if gw is g]) for g in (on, off)
        }
        a, b = medians[on.label], medians[off.label]
        delta = None if a is None or b is None else a - b
        print(f"{label:<24} {_fmt(a, 11)} {_fmt(b, 11)} {_fmt(delta, 9, sign=True)}")

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
