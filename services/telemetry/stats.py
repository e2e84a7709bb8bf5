"""The generation replicas' published stats, read and aggregated for the health report.

Every generation replica publishes a JSON snapshot to Redis under
`<REDIS_KEY_PREFIX>stats:generation:<replica-id>` with a TTL of a few publish intervals, so a
replica that stops publishing drops out by itself:

    {"replica": str, "published_at": float,
     "circuit_breakers": [{"name", "state": "closed"|"open"|"half_open",
                           "failures", "successes", "last_failure_time": float|null}],
     "cache": {"hits", "misses", "entries", "backend": "redis"|"memory"},
     "operations": [{"name", "count", "errors", "total_ms", "max_ms", "slow"}]}

`StatsSource` is where snapshots come from (Redis here; plain dicts in tests), and `aggregate`
merges them: counters are summed, operations merged by name, and each breaker takes the worst
state any replica reports.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from services.common.perf import OperationTotals
from services.common.redis import RedisUnavailable, ResilientRedis

log = logging.getLogger(__name__)

STATS_KEY_PARTS = ("stats", "generation")
# Keys fetched per MGET while reading snapshots.
_MGET_CHUNK = 100
# Worst last: a breaker's aggregate state is the worst any replica reports.
_STATE_RANK = {"closed": 0, "half_open": 1, "open": 2}


class _Published(BaseModel):
    # Unknown fields are ignored so the publisher can add some without breaking us.
    model_config = ConfigDict(extra="ignore", frozen=True)


class PublishedBreaker(_Published):
    name: str
    state: Literal["closed", "open", "half_open"]
    failures: int = Field(default=0, ge=0)
    successes: int = Field(default=0, ge=0)
    last_failure_time: float | None = None


class PublishedCache(_Published):
    hits: int = Field(default=0, ge=0)
    misses: int = Field(default=0, ge=0)
    entries: int = Field(default=0, ge=0)
    backend: Literal["redis", "memory"] = "memory"


class PublishedOperation(_Published):
    name: str
    count: int = Field(default=0, ge=0)
    errors: int = Field(default=0, ge=0)
    total_ms: float = Field(default=0.0, ge=0)
    max_ms: float = Field(default=0.0, ge=0)
    slow: int = Field(default=0, ge=0)


class PublishedSnapshot(_Published):
    replica: str
    published_at: float
    circuit_breakers: list[PublishedBreaker] = []
    cache: PublishedCache | None = None
    operations: list[PublishedOperation] = []


@dataclass(frozen=True)
class BreakerSummary:
    name: str
    state: str
    failures: int
    successes: int
    last_failure_time: float | None


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
    replicas: list[str] = field(default_factory=list)
    breakers: list[BreakerSummary] = field(default_factory=list)
    cache: CacheSummary | None = None
    operations: list[OperationTotals] = field(default_factory=list)

    def breaker(self, name: str) -> BreakerSummary | None:
        return next((b for b in self.breakers if b.name == name), None)


class StatsSource(Protocol):
    async def snapshots(self) -> list[Mapping[str, Any]]:
        """The snapshots currently published; empty when none are or they cannot be read."""
        ...


class StaticStatsSource:
    """Fixed snapshots, for tests and tools."""

    def __init__(self, snapshots: Sequence[Mapping[str, Any]] = ()) -> None:
        self._snapshots = list(snapshots)

    async def snapshots(self) -> list[Mapping[str, Any]]:
        return list(self._snapshots)


class RedisStatsSource:
    """Reads every replica's snapshot with SCAN + MGET. Redis down means no snapshots (the
    health report then says so); it never raises."""

    def __init__(self, redis: ResilientRedis) -> None:
        self.redis = redis
        # SCAN patterns are globs: the prefix is matched literally.
        self.pattern = _glob_escape(redis.key(*STATS_KEY_PARTS, "")) + "*"

    async def snapshots(self) -> list[Mapping[str, Any]]:
        try:
            raw = await self.redis.run("stats.read", self._read)
        except RedisUnavailable:
            return []
        found: list[Mapping[str, Any]] = []
        for value in raw:
            if value is None:  # expired between SCAN and MGET
                continue
            try:
                parsed = json.loads(value)
            except (ValueError, UnicodeDecodeError):
                log.warning("ignoring a stats snapshot that is not JSON")
                continue
            if isinstance(parsed, dict):
                found.append(parsed)
        return found

    async def _read(self, client: Any) -> list[bytes | None]:
        keys = [key async for key in client.scan_iter(match=self.pattern, count=500)]
        values: list[bytes | None] = []
        for start in range(0, len(keys), _MGET_CHUNK):
            values.extend(await client.mget(keys[start : start + _MGET_CHUNK]))
        return values


def aggregate(
    snapshots: Iterable[Mapping[str, Any]], local_operations: Iterable[OperationTotals] = ()
) -> AggregatedStats:
    """Merge published snapshots (malformed ones are skipped) and this process's own
    operation totals into one view."""
    parsed: list[PublishedSnapshot] = []
    for raw in snapshots:
        try:
            parsed.append(PublishedSnapshot.model_validate(raw))
        except ValidationError as err:
            log.warning("ignoring a malformed stats snapshot: %s", err.errors()[:3])

    breakers: dict[str, BreakerSummary] = {}
    for snapshot in parsed:
        for b in snapshot.circuit_breakers:
            seen = breakers.get(b.name)
            if seen is None:
                breakers[b.name] = BreakerSummary(
                    b.name, b.state, b.failures, b.successes, b.last_failure_time
                )
                continue
            times = [t for t in (seen.last_failure_time, b.last_failure_time) if t is not None]
            breakers[b.name] = BreakerSummary(
                name=b.name,
                state=max(seen.state, b.state, key=_STATE_RANK.__getitem__),
                failures=seen.failures + b.failures,
                successes=seen.successes + b.successes,
                last_failure_time=max(times) if times else None,
            )

    operations: dict[str, OperationTotals] = {}
    published_ops = (
        OperationTotals(o.name, o.count, o.errors, o.total_ms, o.max_ms, o.slow)
        for s in parsed
        for o in s.operations
    )
    for op in (*published_ops, *local_operations):
        totals = operations.setdefault(op.name, OperationTotals(op.name))
        totals.count += op.count
        totals.errors += op.errors
        totals.total_ms += op.total_ms
        totals.max_ms = max(totals.max_ms, op.max_ms)
        totals.slow += op.slow

    return AggregatedStats(
        replicas=sorted(s.replica for s in parsed),
        breakers=sorted(breakers.values(), key=lambda b: b.name),
        cache=_merge_caches([s.cache for s in parsed if s.cache is not None]),
        operations=sorted(operations.values(), key=lambda o: o.name),
    )


def _merge_caches(caches: Sequence[PublishedCache]) -> CacheSummary | None:
    if not caches:
        return None
    # Hits and misses are per-replica counters: summed. Entries is a gauge: replicas on the
    # shared Redis cache all see the same entries (counted once), in-memory caches add up.
    shared_entries = max((c.entries for c in caches if c.backend == "redis"), default=0)
    local_entries = sum(c.entries for c in caches if c.backend == "memory")
    return CacheSummary(
        hits=sum(c.hits for c in caches),
        misses=sum(c.misses for c in caches),
        entries=shared_entries + local_entries,
    )


def _glob_escape(text: str) -> str:
    return re.sub(r"([*?\[\]\\])", r"\\\1", text)
