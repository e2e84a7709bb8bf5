"""What one replica reports about itself for the operators' health report: a
`genmesh.stats.v1.ReplicaStats` (protos/genmesh/stats/v1/stats.proto), built from what the
service has. The builder knows no service: each one hands in its name and replica id, its
circuit breakers, its performance monitor and callables for the rest (cache figures, calls in
flight, fallbacks), and binds it to its gRPC health servicer for `serving`.

`stats_service.py` serves the result (`StatsService.GetStats`) and pushes it to telemetry on an
interval (`StatsCollectorService.ReportStats`).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, Protocol

from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2

from genmesh.stats.v1 import stats_pb2
from services.common.breaker import BreakerSnapshot, BreakerState, CircuitBreaker
from services.common.perf import WINDOWS, PerformanceMonitor
from services.common.redis import ResilientRedis

log = logging.getLogger(__name__)

BREAKER_STATES: Mapping[BreakerState, stats_pb2.BreakerState.ValueType] = {
    BreakerState.CLOSED: stats_pb2.BREAKER_STATE_CLOSED,
    BreakerState.OPEN: stats_pb2.BREAKER_STATE_OPEN,
    BreakerState.HALF_OPEN: stats_pb2.BREAKER_STATE_HALF_OPEN,
}


class CacheFigures(Protocol):
    """What a response cache reports (generation's `CacheStats` is one)."""

    @property
    def hits(self) -> int: ...
    @property
    def misses(self) -> int: ...
    @property
    def entries(self) -> int: ...
    @property
    def backend(self) -> str: ...


Serving = Callable[[], Awaitable[bool]]


def default_replica_id() -> str:
    """`<hostname>-<pid>`: unique per process (in Kubernetes the hostname is the pod's name)."""
    return f"{socket.gethostname()}-{os.getpid()}"


def replica_id(*preferred: str) -> str:
    """The first non-empty name among `preferred` (settings, most specific first), else
    `default_replica_id()`."""
    return next((name for name in preferred if name), "") or default_replica_id()


def timestamp(wall_seconds: float) -> Timestamp:
    """A wall-clock time (time.time()) as a Timestamp, to the microsecond."""
    ts = Timestamp()
    ts.FromMicroseconds(round(wall_seconds * 1_000_000))
    return ts


def breaker_stats(snapshot: BreakerSnapshot) -> stats_pb2.BreakerStats:
    stats = stats_pb2.BreakerStats(
        name=snapshot.name,
        state=BREAKER_STATES.get(snapshot.state, stats_pb2.BREAKER_STATE_UNSPECIFIED),
        failures=snapshot.failures,
        successes=snapshot.successes,
        consecutive_failures=snapshot.consecutive_failures,
        retry_after_seconds=snapshot.retry_after_seconds,
        probes_in_flight=snapshot.probes_in_flight,
    )
    if snapshot.last_failure_time is not None:
        stats.last_failure_time.CopyFrom(timestamp(snapshot.last_failure_time))
    return stats


def cache_stats(figures: CacheFigures) -> stats_pb2.CacheStats:
    return stats_pb2.CacheStats(
        hits=figures.hits, misses=figures.misses, entries=figures.entries, backend=figures.backend
    )


def operation_windows(
    perf: PerformanceMonitor, windows: Iterable[int] = WINDOWS
) -> list[stats_pb2.OperationWindow]:
    """Every monitored operation over each window (60 s and 300 s by default), sorted by
    operation name, then window."""
    ops = [op for window in windows for op in perf.windowed(window)]
    ops.sort(key=lambda op: (op.name, op.window_seconds))
    return [
        stats_pb2.OperationWindow(
            name=op.name,
            window_seconds=op.window_seconds,
            count=op.count,
            errors=op.errors,
            slow=op.slow,
            avg_ms=op.avg_ms,
            p95_ms=op.p95_ms,
            max_ms=op.max_ms,
        )
        for op in ops
    ]


def redis_fallback(redis: ResilientRedis) -> Callable[[], bool]:
    """The "redis" fallback is engaged while calls would not go to Redis: REDIS_URL unset, or
    its breaker bypassing it after errors (a pure read)."""
    return lambda: not redis.available


class _LocalCheck:
    """The one part of a ServicerContext that grpc_health's `Check` uses (for an unknown
    service name), so the health servicer can be asked in-process."""

    async def abort(self, code: Any, details: str = "", *args: Any) -> None:
        raise LookupError(f"health: {code}")


def health_serving(health: Any, service: str = "") -> Serving:
    """Whether `health` (a grpc_health async HealthServicer, as GrpcService.health) says
    SERVING for `service` ("" = the server overall, which GrpcService's readiness drives)."""

    async def serving() -> bool:
        request = health_pb2.HealthCheckRequest(service=service)
        try:
            reply = await health.Check(request, _LocalCheck())
        except LookupError:
            return False
        return reply is not None and bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    return serving


class ReplicaStatsBuilder:
    """Builds this replica's `ReplicaStats` from providers, each read at build time:

    - `breakers`: reported in this order, as their snapshots say;
    - `perf`: its operations over the last 60 and 300 seconds;
    - `cache`: an async callable returning the cache's figures; None for a service without a
      response cache (then `cache` stays unset, as it does when the call fails);
    - `inflight`: upstream calls running now (0 when None);
    - `fallbacks`: name -> whether that degraded mode is engaged now;
    - `serving`: whether the replica's health check says SERVING; set it with
      `follow_health(service.health)` once the service exists (False until then).

    A provider that raises leaves its part out (logged) rather than failing the whole report.
    """

    def __init__(
        self,
        service: str,
        replica: str,
        *,
        perf: PerformanceMonitor | None = None,
        breakers: Sequence[CircuitBreaker] = (),
        cache: Callable[[], Awaitable[CacheFigures]] | None = None,
        inflight: Callable[[], int] | None = None,
        fallbacks: Mapping[str, Callable[[], bool]] | None = None,
        serving: Serving | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.service = service
        self.replica = replica
        self.perf = perf
        self.breakers = list(breakers)
        self.cache = cache
        self.inflight = inflight
        self.fallbacks = dict(fallbacks or {})
        self.serving = serving
        self._clock = clock
        # Parts whose provider failed last time: logged once until it answers again.
        self._failing: set[str] = set()

    def follow_health(self, health: Any, service: str = "") -> None:
        """Report `serving` from this health servicer (GrpcService.health)."""
        self.serving = health_serving(health, service)

    async def build(self, ttl_seconds: int = 0) -> stats_pb2.ReplicaStats:
        stats = stats_pb2.ReplicaStats(
            service=self.service,
            replica=self.replica,
            serving=await self._serving(),
            breakers=[breaker_stats(b.snapshot()) for b in self.breakers],
            inflight=self._inflight(),
            fallbacks=[
                stats_pb2.Fallback(name=name, engaged=self._engaged(name, engaged))
                for name, engaged in self.fallbacks.items()
            ],
            operations=operation_windows(self.perf) if self.perf is not None else [],
            ttl_seconds=ttl_seconds,
        )
        if self.cache is not None:
            try:
                figures = await self.cache()
            except Exception as err:  # left out: the rest of the report still counts
                self._failed("cache", err)
            else:
                self._recovered("cache")
                stats.cache.CopyFrom(cache_stats(figures))
        # Stamped last: the time the figures were read.
        stats.reported_at.CopyFrom(timestamp(self._clock()))
        return stats

    async def _serving(self) -> bool:
        if self.serving is None:
            return False
        try:
            serving = await self.serving()
        except Exception as err:
            self._failed("serving", err)
            return False
        self._recovered("serving")
        return serving

    def _inflight(self) -> int:
        if self.inflight is None:
            return 0
        try:
            inflight = max(0, int(self.inflight()))
        except Exception as err:
            self._failed("inflight", err)
            return 0
        self._recovered("inflight")
        return inflight

    def _engaged(self, name: str, engaged: Callable[[], bool]) -> bool:
        part = f"fallback {name}"
        try:
            value = bool(engaged())
        except Exception as err:
            self._failed(part, err)
            return True  # unknown: assume the degraded mode rather than claim all is well
        self._recovered(part)
        return value

    def _failed(self, part: str, err: Exception) -> None:
        if part in self._failing:
            log.debug("stats: %s unavailable: %r", part, err)
            return
        self._failing.add(part)
        log.warning("stats: %s unavailable, left out of the report: %r", part, err)

    def _recovered(self, part: str) -> None:
        if part in self._failing:
            self._failing.discard(part)
            log.info("stats: %s available again", part)
