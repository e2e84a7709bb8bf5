"""Rate-limit decisions per second of one quota process in `make bench`: its ShouldRateLimit
(Envoy's rate limit service) called directly over gRPC, a fixed number of calls in flight, as
a guest request (one descriptor: path + client IP) and as a signed-in one (two: + path and
user), alternately. What the limits cost on the generate path is bench/limits_cost.py.

Every limit is raised so that nothing is refused: the figures are the cost of asking and
counting, not of refusing.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.proc import CpuWindow
from bench.stats import fmt, median_known, per_unit_us, percentile, share_percent
from services.quota.ratelimit.decider import PATH_ENTRY, REMOTE_ADDRESS_ENTRY, USER_ENTRY
from services.quota.ratelimit.rls import SERVICE_NAME, RlsMessages

RLS_METHOD = f"/{SERVICE_NAME}/ShouldRateLimit"
RLS_DOMAIN = "genmesh"  # what Envoy sends (envoy.yaml.tmpl); the quota service ignores it
RLS_PATH = "/api/generate"
RLS_CALL_TIMEOUT_SECONDS = 5.0
RLS_INFLIGHT = 16
# Distinct client IPs (and users) cycled through, so each call counts against its own GCRA
# key, as real traffic from many clients does, rather than one hot key.
RLS_SUBJECTS = 1 << 15
_RLS_OK = 1  # envoy.service.ratelimit.v3.RateLimitResponse.Code.OK

NOTE = (
    "Rate limits: medians of alternating runs on a shared, noisy machine ({cores} cores shared "
    "by the load generator and every process); quote the ratios, not the absolute figures."
)


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
        return per_unit_us(self.cpu.get("quota"), len(self.latencies_ms))

    def cpu_percent(self, name: str) -> float | None:
        """Share of one core `name` used during the run: near 100 for the quota process
        means it was the bottleneck, not the client."""
        return share_percent(self.cpu.get(name), self.seconds)


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
                with CpuWindow(pids, alone=("client",)) as cpu:
                    await _drive(call, payloads[kind], run, seconds)
                run.cpu = cpu.used
                runs.append(run)
    return runs


def print_decisions(runs: Sequence[RlsRun], seconds: float) -> dict[str, Any]:
    """Print the table; return its figures (medians per request kind) for the results."""
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
    kinds: dict[str, dict[str, Any]] = {}
    for kind in RLS_KINDS:
        mine = [run for run in runs if run.kind == kind]
        rate = statistics.median(r.rate for r in mine)
        p50 = statistics.median(percentile(r.latencies_ms, 0.50) for r in mine)
        p99 = statistics.median(percentile(r.latencies_ms, 0.99) for r in mine)
        per_decision = median_known([run.cpu_us_per_decision() for run in mine])
        quota_share = median_known([run.cpu_percent("quota") for run in mine])
        client_share = median_known([run.cpu_percent("client") for run in mine])
        refused, errors = sum(r.refused for r in mine), sum(r.errors for r in mine)
        print(
            f"{kind.name:<24} {rate:>11,.0f} {p50:>7.2f} {p99:>7.2f} {fmt(per_decision, 21)} "
            f"{fmt(quota_share, 11, 0)} {fmt(client_share, 12, 0)} {refused:>7} {errors:>6}"
        )
        kinds[kind.name] = {
            "decisions_per_second": rate,
            "rounds": [r.rate for r in mine],
            "p50_ms": p50,
            "p99_ms": p99,
            "quota_cpu_us_per_decision": per_decision,
            "quota_cpu_percent": quota_share,
            "client_cpu_percent": client_share,
            "refused": refused,
            "errors": errors,
        }
    return {"inflight": RLS_INFLIGHT, "seconds": seconds, "kinds": kinds}
