"""The system health report behind the admin /api/admin/health: every dependency probed at
once, each with its own timeout, plus the circuit breakers, cache statistics and error rates
the generation replicas publish. The public /api/health answers only its overall status
(services/telemetry/public_health.py).

Overall status:
  unhealthy  the database is down (nothing can be stored), or generation or quota is not
             SERVING (nothing can be generated);
  degraded   Redis is down (fallbacks engaged), the OpenAI breaker is open or half-open, or a
             dependency answered slower than the alert threshold;
  healthy    otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.perf import PerformanceMonitor
from services.telemetry.stats import AggregatedStats, StatsSource, aggregate

log = logging.getLogger(__name__)

GENERATION_SERVICE = "genmesh.generation.v1.GenerationService"
QUOTA_SERVICE = "genmesh.quota.v1.QuotaService"


class Status(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    # No information (the generation replicas have published no breaker state).
    UNKNOWN = "unknown"


# Dependencies without which the system cannot do its job; the others only degrade it.
ESSENTIAL = frozenset({"database", "generation", "quota"})


@dataclass(frozen=True)
class DependencyReport:
    name: str
    status: Status
    latency_ms: float
    detail: str = ""


@dataclass(frozen=True)
class HealthReport:
    status: Status
    checked_at: float
    dependencies: list[DependencyReport]
    stats: AggregatedStats
    response_time_ms: float


# After a failed connection grpc backs off up to 120 s by default, and fails fast meanwhile: a
# restarted service would look down for minutes. Short backoffs let health see it come back.
_PROBE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class GrpcHealthTarget:
    """Another service, probed with grpc.health.v1 Check over a long-lived channel. The
    service's own name is checked, so an address pointing at the wrong service shows up."""

    def __init__(self, address: str, service: str) -> None:
        self.address = address
        self.service = service
        self.channel = grpc.aio.insecure_channel(address, options=_PROBE_CHANNEL_OPTIONS)
        self.stub = health_pb2_grpc.HealthStub(self.channel)

    async def check(self, timeout: float) -> None:
        """Returns when the service is SERVING; raises otherwise."""
        try:
            response = await self.stub.Check(
                health_pb2.HealthCheckRequest(service=self.service), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            details = (err.details() or "")[:150]
            raise ProbeFailed(f"{err.code().name} from {self.address}: {details}") from None
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            raise ProbeFailed(f"{name} at {self.address}")

    async def close(self) -> None:
        await self.channel.close(None)


class ProbeFailed(Exception):
    """A dependency is not usable: unreachable, or it says it is not SERVING."""


@dataclass(frozen=True)
class Probe:
    name: str
    check: Callable[[], Awaitable[object]]


class SystemHealth:
    def __init__(
        self,
        probes: Sequence[Probe],
        stats: StatsSource,
        perf: PerformanceMonitor,
        *,
        timeout_seconds: float = 2.0,
        degraded_latency_ms: float = 500.0,
        openai_breaker: str = "openai",
    ) -> None:
        self.probes = list(probes)
        self.stats = stats
        self.perf = perf
        self.timeout_seconds = timeout_seconds
        self.degraded_latency_ms = degraded_latency_ms
        self.openai_breaker = openai_breaker
        self._running: asyncio.Task[HealthReport] | None = None

    async def report(self) -> HealthReport:
        """The current report. Concurrent callers share one check, so a burst of health
        requests costs the dependencies one round of probes."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._check(), name="system-health")
        # Shielded: one caller going away must not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    async def _check(self) -> HealthReport:
        started = time.perf_counter()
        checked_at = time.time()
        reading = asyncio.create_task(self._read_stats())
        dependencies = list(await asyncio.gather(*(self._probe(p) for p in self.probes)))
        stats = await reading
        dependencies.append(self._openai(stats))
        return HealthReport(
            status=overall_status(dependencies),
            checked_at=checked_at,
            dependencies=dependencies,
            stats=stats,
            response_time_ms=(time.perf_counter() - started) * 1000,
        )

    async def _probe(self, probe: Probe) -> DependencyReport:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                await probe.check()
        except TimeoutError:
            elapsed = (time.perf_counter() - started) * 1000
            detail = f"no answer within {self.timeout_seconds:g}s"
            return DependencyReport(probe.name, Status.UNHEALTHY, elapsed, detail)
        except Exception as exc:  # any failure means "not usable now", whatever its type
            elapsed = (time.perf_counter() - started) * 1000
            detail = (str(exc) or type(exc).__name__)[:200]
            return DependencyReport(probe.name, Status.UNHEALTHY, elapsed, detail)
        elapsed = (time.perf_counter() - started) * 1000
        if elapsed > self.degraded_latency_ms:
            detail = f"slow: {elapsed:.0f} ms (threshold {self.degraded_latency_ms:g} ms)"
            return DependencyReport(probe.name, Status.DEGRADED, elapsed, detail)
        return DependencyReport(probe.name, Status.HEALTHY, elapsed)

    async def _read_stats(self) -> AggregatedStats:
        snapshots: list[Mapping[str, Any]] = []
        try:
            async with asyncio.timeout(self.timeout_seconds):
                snapshots = list(await self.stats.snapshots())
        except Exception:  # the report still answers, with this process's own figures
            log.warning("could not read the published stats", exc_info=True)
        return aggregate(snapshots, self.perf.snapshot())

    def _openai(self, stats: AggregatedStats) -> DependencyReport:
        breaker = stats.breaker(self.openai_breaker)
        if breaker is None:
            detail = (
                "no generation replica has published its stats"
                if not stats.replicas
                else f"no circuit breaker named {self.openai_breaker!r} is published"
            )
            return DependencyReport("openai", Status.UNKNOWN, 0.0, detail)
        status = {
            "closed": Status.HEALTHY,
            "half_open": Status.DEGRADED,
            "open": Status.UNHEALTHY,
        }[breaker.state]
        detail = f"circuit breaker {breaker.state} across {len(stats.replicas)} replica(s)"
        return DependencyReport("openai", status, 0.0, detail)


def overall_status(dependencies: Sequence[DependencyReport]) -> Status:
    if any(d.name in ESSENTIAL and d.status is Status.UNHEALTHY for d in dependencies):
        return Status.UNHEALTHY
    if any(d.status in (Status.DEGRADED, Status.UNHEALTHY) for d in dependencies):
        return Status.DEGRADED
    return Status.HEALTHY
