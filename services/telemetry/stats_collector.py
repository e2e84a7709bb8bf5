"""Telemetry's side of the replicas' stats pushes: `StatsCollectorService.ReportStats`
(protos/genmesh/stats/v1/stats.proto) and where the reports are kept, so that the health report
of ANY telemetry replica sees every replica that reports, whichever telemetry replica its
pushes reach.

Kept in Redis, under telemetry's own keys (no other service reads or writes them):

    <REDIS_KEY_PREFIX>{telemetry:replicas}                      sorted set: "<service>:<replica>"
                                                                scored by when it expires
    <REDIS_KEY_PREFIX>{telemetry:replicas}:<service>:<replica>  the serialized ReplicaStats,
                                                                expiring after its ttl_seconds

(one hash tag, so the index and the reports share a Redis Cluster slot). A report lives for its
ttl_seconds (the replicas send three push intervals), so a replica that stops pushing drops
out by itself; ttl_seconds = 0 (a clean stop) deletes it at once.

Every report is also kept in this process's memory with the same expiry. While Redis is
unavailable the reports are read from there: each telemetry replica then sees the replicas
that push to it. Reports Redis never got (written during an outage) are merged into what Redis
answers until they expire, the fresher report of a replica winning.

`LocalReporter` puts telemetry's own ReplicaStats into the same store on the same cadence, so
every telemetry replica shows up in every report too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from redis.asyncio import Redis

from genmesh.stats.v1 import stats_pb2, stats_pb2_grpc
from services.common.errors import FieldViolation, invalid_argument
from services.common.redis import RedisUnavailable, ResilientRedis
from services.common.replica_stats import ReplicaStatsBuilder, timestamp
from services.common.stats_service import ttl_seconds_for
from services.telemetry.stats import reported_at

log = logging.getLogger(__name__)

COLLECTOR_SERVICE_NAME = stats_pb2.DESCRIPTOR.services_by_name["StatsCollectorService"].full_name
# The hash tag keeping the index and every report in one Redis Cluster slot.
REPLICAS_KEY = "{telemetry:replicas}"
# The longest a report is kept, whatever ttl_seconds asks (pushes ask for three intervals).
MAX_TTL_SECONDS = 600
# The most reports held in memory; past it the one expiring soonest makes room.
MAX_MEMORY_REPORTS = 10_000
# Limits of one report: names as Kubernetes allows them, a bounded serialized size.
MAX_SERVICE_CHARS = 63
MAX_REPLICA_CHARS = 253
MAX_REPORT_BYTES = 256 * 1024
# Reports read per MGET.
_MGET_CHUNK = 100


@dataclass
class _Held:
    stats: stats_pb2.ReplicaStats
    expires_at: float  # on the monotonic clock
    in_redis: bool


@dataclass(frozen=True)
class Reports:
    """The reports kept now; `from_redis` is False when Redis could not be read (then only
    the reports pushed to this telemetry replica are there)."""

    replicas: list[stats_pb2.ReplicaStats]
    from_redis: bool


class ReplicaStatsStore:
    def __init__(
        self,
        redis: ResilientRedis,
        *,
        max_memory_reports: int = MAX_MEMORY_REPORTS,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` (monotonic) expires the in-memory reports; `wall_clock` scores the Redis
        index (shared by every telemetry replica). Tests move both."""
        self.redis = redis
        self.index_key = redis.key(REPLICAS_KEY)
        self.max_memory_reports = max_memory_reports
        self._clock = clock
        self._wall = wall_clock
        self._memory: dict[tuple[str, str], _Held] = {}

    def report_key(self, service: str, replica: str) -> str:
        return f"{self.index_key}:{_member(service, replica)}"

    async def put(self, stats: stats_pb2.ReplicaStats) -> None:
        """Keep `stats` for min(ttl_seconds, MAX_TTL_SECONDS); ttl_seconds <= 0 drops the
        replica at once. Never raises for Redis: memory alone keeps it then."""
        key = (stats.service, stats.replica)
        ttl = min(stats.ttl_seconds, MAX_TTL_SECONDS)
        if ttl <= 0:
            self._memory.pop(key, None)
            try:
                await self.redis.run("telemetry.replicas.drop", lambda c: self._drop(c, *key))
            except RedisUnavailable:
                log.info("stats: %s/%s left, but Redis keeps it until it expires", *key)
            return
        if not stats.HasField("reported_at"):
            stats.reported_at.CopyFrom(timestamp(self._wall()))
        held = _Held(stats, self._clock() + ttl, in_redis=False)
        self._hold(key, held)
        try:
            await self.redis.run(
                "telemetry.replicas.put", lambda c: self._write(c, stats, ttl, *key)
            )
        except RedisUnavailable:
            return
        held.in_redis = True

    async def current(self) -> Reports:
        """Every report not yet expired, one per (service, replica), the freshest."""
        self._expire()
        local = list(self._memory.values())
        try:
            raw = await self.redis.run("telemetry.replicas.read", self._read)
        except RedisUnavailable:
            return Reports([h.stats for h in local], from_redis=False)
        found: dict[tuple[str, str], stats_pb2.ReplicaStats] = {}
        for value in raw:
            if value is None:  # expired between the index and the read
                continue
            try:
                stats = stats_pb2.ReplicaStats.FromString(value)
            except DecodeError:
                log.warning("stats: ignoring a stored report that does not parse")
                continue
            found[(stats.service, stats.replica)] = stats
        # What Redis never got (pushed here while it was unavailable) still counts.
        for held in local:
            if held.in_redis:
                continue
            key = (held.stats.service, held.stats.replica)
            seen = found.get(key)
            if seen is None or reported_at(held.stats) > reported_at(seen):
                found[key] = held.stats
        return Reports([found[key] for key in sorted(found)], from_redis=True)

    def _hold(self, key: tuple[str, str], held: _Held) -> None:
        if key not in self._memory and len(self._memory) >= self.max_memory_reports:
            self._expire()
            if len(self._memory) >= self.max_memory_reports:
                soonest = min(self._memory, key=lambda k: self._memory[k].expires_at)
                del self._memory[soonest]
        self._memory[key] = held

    def _expire(self) -> None:
        now = self._clock()
        for key in [k for k, h in self._memory.items() if h.expires_at <= now]:
            del self._memory[key]

    async def _write(
        self, client: Redis, stats: stats_pb2.ReplicaStats, ttl: int, service: str, replica: str
    ) -> None:
        now = self._wall()
        async with client.pipeline(transaction=False) as pipe:
            pipe.set(self.report_key(service, replica), stats.SerializeToString(), ex=ttl)
            pipe.zadd(self.index_key, {_member(service, replica): now + ttl})
            # The index forgets what has expired (the reports expire by themselves).
            pipe.zremrangebyscore(self.index_key, "-inf", now)
            await pipe.execute()

    async def _drop(self, client: Redis, service: str, replica: str) -> None:
        async with client.pipeline(transaction=False) as pipe:
            pipe.delete(self.report_key(service, replica))
            pipe.zrem(self.index_key, _member(service, replica))
            await pipe.execute()

    async def _read(self, client: Redis) -> list[bytes | None]:
        members: list[Any] = await client.zrangebyscore(self.index_key, self._wall(), "+inf")
        keys = [f"{self.index_key}:{_text(m)}" for m in members]
        values: list[bytes | None] = []
        for start in range(0, len(keys), _MGET_CHUNK):
            chunk: list[Any] = await client.mget(keys[start : start + _MGET_CHUNK])
            values.extend(v if v is None else bytes(v) for v in chunk)
        return values


def _member(service: str, replica: str) -> str:
    return f"{service}:{replica}"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def check_report(stats: stats_pb2.ReplicaStats) -> None:
    """Raises INVALID_ARGUMENT for a report that cannot be kept."""
    violations: list[FieldViolation] = []
    if not stats.service or len(stats.service) > MAX_SERVICE_CHARS:
        violations.append(
            FieldViolation("stats.service", f"must be 1 to {MAX_SERVICE_CHARS} characters")
        )
    if not stats.replica or len(stats.replica) > MAX_REPLICA_CHARS:
        violations.append(
            FieldViolation("stats.replica", f"must be 1 to {MAX_REPLICA_CHARS} characters")
        )
    if stats.ttl_seconds < 0:
        violations.append(FieldViolation("stats.ttl_seconds", "must not be negative"))
    if stats.ByteSize() > MAX_REPORT_BYTES:
        violations.append(FieldViolation("stats", f"must be at most {MAX_REPORT_BYTES} bytes"))
    if violations:
        raise invalid_argument(*violations)


class StatsCollectorServicer(stats_pb2_grpc.StatsCollectorServiceServicer):
    """ReportStats: keep one replica's stats for its ttl_seconds (0 drops it at once)."""

    def __init__(self, store: ReplicaStatsStore) -> None:
        self.store = store

    async def ReportStats(
        self, request: stats_pb2.ReportStatsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> stats_pb2.ReportStatsResponse:
        check_report(request.stats)
        await self.store.put(request.stats)
        return stats_pb2.ReportStatsResponse()


def add_stats_collector(server: grpc.aio.Server, store: ReplicaStatsStore) -> None:
    stats_pb2_grpc.add_StatsCollectorServiceServicer_to_server(
        StatsCollectorServicer(store), server
    )


class LocalReporter:
    """Puts this telemetry replica's own stats into the store right after start, then every
    `interval_seconds` (kept three intervals), and drops them on stop, like the other services'
    StatsReporter does over gRPC. Never raises."""

    def __init__(
        self, builder: ReplicaStatsBuilder, store: ReplicaStatsStore, interval_seconds: float
    ) -> None:
        if not interval_seconds > 0:
            raise ValueError("interval_seconds must be positive")
        self.builder = builder
        self.store = store
        self.interval_seconds = interval_seconds
        self.ttl_seconds = ttl_seconds_for(interval_seconds)
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="stats-local-reporter")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await self.report(0)

    async def report(self, ttl_seconds: int) -> None:
        try:
            await self.store.put(await self.builder.build(ttl_seconds))
        except Exception:  # the next tick tries again
            log.warning("stats: could not keep this replica's own stats", exc_info=True)

    async def _run(self) -> None:
        while True:
            await self.report(self.ttl_seconds)
            await asyncio.sleep(self.interval_seconds)
