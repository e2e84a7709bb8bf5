"""What the replicas report about themselves (`genmesh.stats.v1.ReplicaStats`, pushed to
telemetry or pulled from a service's GetStats), merged for the operators' health report.

- `merge_replicas`: one report per (service, replica), the fresher (`reported_at`) winning.
- `merge_operations`: each operation of each service per window (60 s, 300 s), across that
  service's replicas: counts, errors and slow calls summed, the average weighted by the counts,
  the max the highest, and the p95 the highest any replica reports. That p95 is conservative:
  no replica has more than 5% of its calls above its own p95, so no more than 5% of all the
  calls lie above the highest of them; the merged calls' true p95 is at most that figure.
- `merge_breakers`: each breaker of each service, the worst state any replica reports.
- `merge_caches`: the response caches (generation's), hits and misses summed.

Telemetry reads nothing another service writes to Redis: replicas push their reports to it
(services/telemetry/stats_collector.py) and it pulls them over gRPC.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from genmesh.stats.v1 import stats_pb2

BREAKER_STATE_NAMES: dict[int, str] = {
    stats_pb2.BREAKER_STATE_CLOSED: "closed",
    stats_pb2.BREAKER_STATE_HALF_OPEN: "half_open",
    stats_pb2.BREAKER_STATE_OPEN: "open",
}
# The worst state wins; a replica reporting no state says nothing about it (ranked lowest).
_STATE_RANK: dict[int, int] = {
    stats_pb2.BREAKER_STATE_UNSPECIFIED: -1,
    stats_pb2.BREAKER_STATE_CLOSED: 0,
    stats_pb2.BREAKER_STATE_HALF_OPEN: 1,
    stats_pb2.BREAKER_STATE_OPEN: 2,
}
TRIPPED_STATES = frozenset({stats_pb2.BREAKER_STATE_OPEN, stats_pb2.BREAKER_STATE_HALF_OPEN})


def breaker_state_name(state: int) -> str:
    return BREAKER_STATE_NAMES.get(state, "unknown")


def reported_at(stats: stats_pb2.ReplicaStats) -> float:
    """When the replica read its figures, in Unix seconds (0 when it did not say)."""
    return stats.reported_at.seconds + stats.reported_at.nanos / 1e9


@dataclass(frozen=True)
class OperationFigures:
    """One operation of one service over the last `window_seconds`, across its replicas."""

    service: str
    name: str
    window_seconds: int
    count: int
    errors: int
    slow: int
    avg_ms: float
    p95_ms: float
    max_ms: float
    replicas: int

    @property
    def error_rate(self) -> float:
        return self.errors / self.count if self.count else 0.0

    @property
    def requests_per_second(self) -> float:
        return self.count / self.window_seconds if self.window_seconds > 0 else 0.0


@dataclass(frozen=True)
class BreakerSummary:
    service: str
    name: str
    state: stats_pb2.BreakerState.ValueType  # the worst any replica reports
    failures: int
    successes: int
    last_failure_time: float | None
    replicas: int
    tripped_replicas: int

    @property
    def state_name(self) -> str:
        return breaker_state_name(self.state)


@dataclass(frozen=True)
class CacheSummary:
    hits: int
    misses: int
    entries: int

    @property
    def hit_rate(self) -> float:
        lookups = self.hits + self.misses
        return self.hits / lookups if lookups else 0.0


@dataclass(frozen=True)
class AggregatedStats:
    replicas: list[stats_pb2.ReplicaStats] = field(default_factory=list)
    breakers: list[BreakerSummary] = field(default_factory=list)
    cache: CacheSummary | None = None
    operations: list[OperationFigures] = field(default_factory=list)

    def breaker(self, service: str, name: str) -> BreakerSummary | None:
        return next((b for b in self.breakers if (b.service, b.name) == (service, name)), None)

    def of(self, service: str) -> list[stats_pb2.ReplicaStats]:
        return [r for r in self.replicas if r.service == service]


def merge_replicas(*sources: Iterable[stats_pb2.ReplicaStats]) -> list[stats_pb2.ReplicaStats]:
    """One report per (service, replica) from every source, the fresher winning (on a tie,
    the earlier source), sorted by service then replica."""
    freshest: dict[tuple[str, str], stats_pb2.ReplicaStats] = {}
    for source in sources:
        for stats in source:
            key = (stats.service, stats.replica)
            seen = freshest.get(key)
            if seen is None or reported_at(stats) > reported_at(seen):
                freshest[key] = stats
    return [freshest[key] for key in sorted(freshest)]


def merge_operations(replicas: Iterable[stats_pb2.ReplicaStats]) -> list[OperationFigures]:
    """Each (service, operation, window) across the replicas reporting it (see the module's
    note on the p95), sorted by service, operation, then window."""
    merged: dict[tuple[str, str, int], _OperationSum] = {}
    for stats in replicas:
        for op in stats.operations:
            key = (stats.service, op.name, op.window_seconds)
            merged.setdefault(key, _OperationSum()).add(op)
    return [merged[key].figures(*key) for key in sorted(merged)]


@dataclass
class _OperationSum:
    count: int = 0
    errors: int = 0
    slow: int = 0
    total_ms: float = 0.0
    p95_ms: float = 0.0
    max_ms: float = 0.0
    replicas: int = 0

    def add(self, op: stats_pb2.OperationWindow) -> None:
        if op.count <= 0:
            return  # nothing in this replica's window: it changes no figure
        self.count += op.count
        self.errors += op.errors
        self.slow += op.slow
        self.total_ms += op.avg_ms * op.count
        self.p95_ms = max(self.p95_ms, op.p95_ms)
        self.max_ms = max(self.max_ms, op.max_ms)
        self.replicas += 1

    def figures(self, service: str, name: str, window_seconds: int) -> OperationFigures:
        return OperationFigures(
            service=service,
            name=name,
            window_seconds=window_seconds,
            count=self.count,
            errors=self.errors,
            slow=self.slow,
            avg_ms=self.total_ms / self.count if self.count else 0.0,
            p95_ms=self.p95_ms,
            max_ms=self.max_ms,
            replicas=self.replicas,
        )


def merge_breakers(replicas: Iterable[stats_pb2.ReplicaStats]) -> list[BreakerSummary]:
    """Each (service, breaker name): the worst state, counters summed, the latest failure;
    sorted by service then name."""
    merged: dict[tuple[str, str], BreakerSummary] = {}
    for stats in replicas:
        for b in stats.breakers:
            key = (stats.service, b.name)
            failed = (
                b.last_failure_time.seconds + b.last_failure_time.nanos / 1e9
                if b.HasField("last_failure_time")
                else None
            )
            tripped = 1 if b.state in TRIPPED_STATES else 0
            seen = merged.get(key)
            if seen is None:
                merged[key] = BreakerSummary(
                    stats.service, b.name, b.state, b.failures, b.successes, failed, 1, tripped
                )
                continue
            times = [t for t in (seen.last_failure_time, failed) if t is not None]
            merged[key] = BreakerSummary(
                service=stats.service,
                name=b.name,
                state=max(seen.state, b.state, key=lambda s: _STATE_RANK.get(s, -1)),
                failures=seen.failures + b.failures,
                successes=seen.successes + b.successes,
                last_failure_time=max(times) if times else None,
                replicas=seen.replicas + 1,
                tripped_replicas=seen.tripped_replicas + tripped,
            )
    return [merged[key] for key in sorted(merged)]


def merge_caches(replicas: Iterable[stats_pb2.ReplicaStats]) -> CacheSummary | None:
    """The replicas' response caches as one; None when no replica reports a cache."""
    caches: Sequence[stats_pb2.CacheStats] = [r.cache for r in replicas if r.HasField("cache")]
    if not caches:
        return None
    # Hits and misses are per-replica counters: summed. Entries is a gauge: replicas on the
    # shared Redis cache all see the same entries (counted once), in-memory caches add up.
    shared_entries = max((c.entries for c in caches if c.backend == "redis"), default=0)
    local_entries = sum(c.entries for c in caches if c.backend != "redis")
    return CacheSummary(
        hits=sum(c.hits for c in caches),
        misses=sum(c.misses for c in caches),
        entries=shared_entries + local_entries,
    )


def aggregate(*sources: Iterable[stats_pb2.ReplicaStats]) -> AggregatedStats:
    """Every source's reports merged into one view (see the functions above)."""
    replicas = merge_replicas(*sources)
    return AggregatedStats(
        replicas=replicas,
        breakers=merge_breakers(replicas),
        cache=merge_caches(replicas),
        operations=merge_operations(replicas),
    )
