"""The system health report behind the admin /api/admin/health. The public /api/health answers
only its overall status (services/telemetry/public_health.py).

One check runs everything at once, each call with its own timeout, under one hard deadline
(HEALTH_REPORT_DEADLINE_SECONDS): the database and Redis probes; generation's and quota's
grpc.health.v1 Check and StatsService.GetStats at their configured addresses; the reports the
replicas pushed (services/telemetry/stats_collector.py); and this replica's own stats. Whatever
has not answered by the deadline is reported as timed out, so the report answers in time even
when a dependency hangs. Pulled and pushed reports are merged per (service, replica), the
fresher winning (services/telemetry/stats.py).

Overall status (`assess`):
  unhealthy  the database is unreachable; or no replica of generation (or quota, without which
             no generation can reserve its quota unit) reports serving AND its health check
             does not say SERVING;
  degraded   any replica has a fallback engaged (for example Redis': the in-memory fallback
             serves), a circuit breaker open or half-open, or reports not serving; or a
             dependency fails (telemetry's own Redis down) or answers slower than
             HEALTH_DEGRADED_LATENCY_MS;
  healthy    otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.telemetry.stats import (
    TRIPPED_STATES,
    AggregatedStats,
    aggregate,
    breaker_state_name,
)
from services.telemetry.stats_collector import Reports

log = logging.getLogger(__name__)

GENERATION_SERVICE = "genmesh.generation.v1.GenerationService"
QUOTA_SERVICE = "genmesh.quota.v1.QuotaService"
# The services whose replicas the system cannot work without (see the module's note).
REQUIRED_SERVICES = ("generation", "quota")
# The reports must answer within 2 s whatever hangs.
DEFAULT_DEADLINE_SECONDS = 1.8


class Status(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    UNHEALTHY = "unhealthy"
    # No information (no generation replica reports the upstream breaker).
    UNKNOWN = "unknown"


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
    reasons: list[str] = field(default_factory=list)

    @property
    def replicas(self) -> list[stats_pb2.ReplicaStats]:
        return self.stats.replicas


# After a failed connection grpc backs off up to 120 s by default, and fails fast meanwhile: a
# restarted service would look down for minutes. Short backoffs let health see it come back.
_PROBE_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class ProbeFailed(Exception):
    """A dependency is not usable: unreachable, or it says it is not SERVING."""


class ServiceTarget:
    """generation or quota at its configured address (a Kubernetes Service: each call reaches
    one replica), over one long-lived channel: grpc.health.v1 Check of the service's own name
    (so an address pointing at the wrong service shows up) and StatsService.GetStats."""

    def __init__(self, name: str, address: str, health_service: str) -> None:
        self.name = name
        self.address = address
        self.health_service = health_service
        self.channel = grpc.aio.insecure_channel(address, options=_PROBE_CHANNEL_OPTIONS)
        self.health = health_pb2_grpc.HealthStub(self.channel)
        self.stats_stub = stats_pb2_grpc.StatsServiceStub(self.channel)

    async def check(self, timeout: float) -> None:
        """Returns when the service is SERVING; raises ProbeFailed otherwise."""
        try:
            response = await self.health.Check(
                health_pb2.HealthCheckRequest(service=self.health_service), timeout=timeout
            )
        except grpc.aio.AioRpcError as err:
            raise ProbeFailed(self._failure(err, timeout)) from None
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            name = health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)
            raise ProbeFailed(f"{name} at {self.address}")

    async def stats(self, timeout: float) -> stats_pb2.ReplicaStats:
        """The stats of the replica this call reaches; raises ProbeFailed when it cannot."""
        try:
            return await self.stats_stub.GetStats(stats_pb2.GetStatsRequest(), timeout=timeout)
        except grpc.aio.AioRpcError as err:
            raise ProbeFailed(self._failure(err, timeout)) from None

    def _failure(self, err: grpc.aio.AioRpcError, timeout: float) -> str:
        if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return f"timed out: no answer within {timeout:g}s from {self.address}"
        details = (err.details() or "")[:150]
        return f"{err.code().name} from {self.address}: {details}"

    async def close(self) -> None:
        await self.channel.close(None)


@dataclass(frozen=True)
class Probe:
    """A dependency check: returns when the dependency is usable, raises otherwise."""

    name: str
    check: Callable[[], Awaitable[object]]


@dataclass(frozen=True)
class StatsPull:
    """A service's GetStats, reported under the dependency `name` (generation, quota)."""

    name: str
    fetch: Callable[[], Awaitable[stats_pb2.ReplicaStats]]


class PushedStats(Protocol):
    """Where the replicas' pushed reports are kept (stats_collector.ReplicaStatsStore)."""

    async def current(self) -> Reports: ...


def service_probes(target: ServiceTarget, timeout: float) -> tuple[Probe, StatsPull]:
    """The health Check and the GetStats pull of one service."""
    return (
        Probe(target.name, lambda: target.check(timeout)),
        StatsPull(target.name, lambda: target.stats(timeout)),
    )


@dataclass(frozen=True)
class _Outcome:
    ok: bool
    elapsed_ms: float
    value: Any = None
    detail: str = ""


class SystemHealth:
    def __init__(
        self,
        probes: Sequence[Probe],
        *,
        pulls: Sequence[StatsPull] = (),
        pushed: PushedStats | None = None,
        own: Callable[[], Awaitable[stats_pb2.ReplicaStats]] | None = None,
        required_services: Sequence[str] = (),
        timeout_seconds: float = 1.5,
        deadline_seconds: float = DEFAULT_DEADLINE_SECONDS,
        degraded_latency_ms: float = 500.0,
        openai_breaker: str = "openai",
    ) -> None:
        """`probes` are checked and `pulls` fetched at once, each within `timeout_seconds`,
        along with the `pushed` reports and this replica's `own` stats; nothing is waited for
        past `deadline_seconds`. `required_services` are those without a serving replica of
        which the system is unhealthy (see `assess`)."""
        self.probes = list(probes)
        self.pulls = list(pulls)
        self.pushed = pushed
        self.own = own
        self.required_services = tuple(required_services)
        self.deadline_seconds = deadline_seconds
        self.timeout_seconds = min(timeout_seconds, deadline_seconds)
        self.degraded_latency_ms = degraded_latency_ms
        self.openai_breaker = openai_breaker
        self._running: asyncio.Task[HealthReport] | None = None

    async def report(self) -> HealthReport:
        """The current report. Concurrent callers share one check, so a burst of health
        requests costs the dependencies one round of calls."""
        if self._running is None or self._running.done():
            self._running = asyncio.create_task(self._check(), name="system-health")
        # Shielded: one caller going away must not cancel the check the others wait for.
        return await asyncio.shield(self._running)

    async def _check(self) -> HealthReport:
        started = time.perf_counter()
        checked_at = time.time()
        probes = {p.name: self._start(p.check) for p in self.probes}
        pulls = {p.name: self._start(p.fetch) for p in self.pulls}
        pushed = self._start(self.pushed.current) if self.pushed is not None else None
        own = self._start(self.own) if self.own is not None else None
        tasks = [*probes.values(), *pulls.values(), *(t for t in (pushed, own) if t)]
        # The hard bound: whatever has not answered by now is reported as timed out.
        done, pending = await asyncio.wait(tasks, timeout=self.deadline_seconds)
        for task in pending:
            task.cancel()
            task.add_done_callback(_discard)

        def outcome(task: asyncio.Task[_Outcome]) -> _Outcome:
            if task in done:
                return task.result()
            elapsed = (time.perf_counter() - started) * 1000
            return _Outcome(False, elapsed, detail=self._timed_out(self.deadline_seconds))

        replicas: list[stats_pb2.ReplicaStats] = []
        pulled_notes: dict[str, str] = {}
        for name, task in pulls.items():
            result = outcome(task)
            if result.ok:
                replicas.append(result.value)
            else:
                pulled_notes[name] = f"GetStats: {result.detail}"
                log.info("health: %s GetStats failed: %s", name, result.detail)
        pushed_replicas: list[stats_pb2.ReplicaStats] = []
        notes: list[str] = []
        if pushed is not None:
            result = outcome(pushed)
            if result.ok:
                pushed_replicas = list(result.value.replicas)
                if not result.value.from_redis:
                    notes.append(
                        "replica reports read from this telemetry replica's memory (Redis "
                        "unavailable): replicas pushing to other telemetry replicas are missing"
                    )
            else:
                notes.append(f"the pushed replica reports could not be read: {result.detail}")
        own_replicas: list[stats_pb2.ReplicaStats] = []
        if own is not None:
            result = outcome(own)
            if result.ok:
                own_replicas.append(result.value)
        # Freshest first wins ties: this replica's own, then what was pulled, then pushed.
        stats = aggregate(own_replicas, replicas, pushed_replicas)

        dependencies = [
            self._dependency(name, outcome(task), pulled_notes.get(name, ""))
            for name, task in probes.items()
        ]
        dependencies.append(self._openai(stats))
        status, reasons = assess(dependencies, stats.replicas, self.required_services)
        return HealthReport(
            status=status,
            checked_at=checked_at,
            dependencies=dependencies,
            stats=stats,
            response_time_ms=(time.perf_counter() - started) * 1000,
            reasons=[*reasons, *notes],
        )

    def _start(self, call: Callable[[], Awaitable[Any]]) -> asyncio.Task[_Outcome]:
        return asyncio.create_task(self._measure(call))

    async def _measure(self, call: Callable[[], Awaitable[Any]]) -> _Outcome:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                value = await call()
        except TimeoutError:
            elapsed = (time.perf_counter() - started) * 1000
            return _Outcome(False, elapsed, detail=self._timed_out(self.timeout_seconds))
        except Exception as exc:  # any failure means "not usable now", whatever its type
            elapsed = (time.perf_counter() - started) * 1000
            return _Outcome(False, elapsed, detail=(str(exc) or type(exc).__name__)[:200])
        return _Outcome(True, (time.perf_counter() - started) * 1000, value)

    @staticmethod
    def _timed_out(seconds: float) -> str:
        return f"timed out: no answer within {seconds:g}s"

    def _dependency(self, name: str, result: _Outcome, note: str) -> DependencyReport:
        detail = result.detail
        if not result.ok:
            status = Status.UNHEALTHY
        elif result.elapsed_ms > self.degraded_latency_ms:
            status = Status.DEGRADED
            detail = f"slow: {result.elapsed_ms:.0f} ms (threshold {self.degraded_latency_ms:g} ms)"
        else:
            status = Status.HEALTHY
        detail = "; ".join(part for part in (detail, note) if part)
        return DependencyReport(name, status, result.elapsed_ms, detail)

    def _openai(self, stats: AggregatedStats) -> DependencyReport:
        """The upstream model API, as generation's breaker across its replicas sees it."""
        breaker = stats.breaker("generation", self.openai_breaker)
        if breaker is None:
            detail = (
                "no generation replica reports its stats"
                if not stats.of("generation")
                else f"no circuit breaker named {self.openai_breaker!r} is reported"
            )
            return DependencyReport("openai", Status.UNKNOWN, 0.0, detail)
        status = {
            stats_pb2.BREAKER_STATE_CLOSED: Status.HEALTHY,
            stats_pb2.BREAKER_STATE_HALF_OPEN: Status.DEGRADED,
            stats_pb2.BREAKER_STATE_OPEN: Status.UNHEALTHY,
        }.get(breaker.state, Status.UNKNOWN)
        detail = (
            f"circuit breaker {breaker.state_name}: open or half-open on "
            f"{breaker.tripped_replicas} of {breaker.replicas} generation replica(s)"
        )
        return DependencyReport("openai", status, 0.0, detail)


def assess(
    dependencies: Sequence[DependencyReport],
    replicas: Sequence[stats_pb2.ReplicaStats],
    required_services: Sequence[str] = REQUIRED_SERVICES,
    *,
    essential: frozenset[str] = frozenset({"database"}),
) -> tuple[Status, list[str]]:
    """The overall status and why (see the module's note): `dependencies` as checked,
    `replicas` every replica's freshest report."""
    unhealthy = _unhealthy(dependencies, replicas, required_services, essential)
    degraded = [
        *(
            _dependency_finding(d)
            for d in dependencies
            if d.status in (Status.UNHEALTHY, Status.DEGRADED)
            # An essential one down is already why the system is unhealthy.
            and not (d.name in essential and d.status is Status.UNHEALTHY)
        ),
        *(finding for r in replicas for finding in _replica_findings(r)),
    ]
    if unhealthy:
        return Status.UNHEALTHY, unhealthy + degraded
    if degraded:
        return Status.DEGRADED, degraded
    return Status.HEALTHY, []


def _unhealthy(
    dependencies: Sequence[DependencyReport],
    replicas: Sequence[stats_pb2.ReplicaStats],
    required_services: Sequence[str],
    essential: frozenset[str],
) -> list[str]:
    by_name: Mapping[str, DependencyReport] = {d.name: d for d in dependencies}
    findings = [
        f"{d.name} is unreachable: {d.detail}"
        for d in dependencies
        if d.name in essential and d.status is Status.UNHEALTHY
    ]
    for service in required_services:
        serving = any(r.service == service and r.serving for r in replicas)
        check = by_name.get(service)
        if serving or (check is not None and check.status in (Status.HEALTHY, Status.DEGRADED)):
            continue
        said = f" (its health check: {check.detail})" if check is not None and check.detail else ""
        findings.append(f"no {service} replica is serving{said}")
    return findings


def _dependency_finding(d: DependencyReport) -> str:
    if d.status is Status.DEGRADED:
        return f"{d.name} is degraded: {d.detail}"
    return f"{d.name} is failing: {d.detail}"


def _replica_findings(r: stats_pb2.ReplicaStats) -> list[str]:
    who = f"{r.service}/{r.replica}"
    findings = [f"{who} is not serving"] if not r.serving else []
    findings += [f"{who} has its {f.name} fallback engaged" for f in r.fallbacks if f.engaged]
    findings += [
        f"{who} has circuit breaker {b.name} {breaker_state_name(b.state)}"
        for b in r.breakers
        if b.state in TRIPPED_STATES
    ]
    return findings


def _discard(task: asyncio.Task[Any]) -> None:
    """Collects a task cut at the deadline, so its end is not logged as never retrieved."""
    if not task.cancelled():
        task.exception()
