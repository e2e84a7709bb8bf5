"""Publishes this replica's statistics to Redis for the telemetry service's health endpoint:
every STATS_PUBLISH_INTERVAL_SECONDS, key `<REDIS_KEY_PREFIX>stats:generation:<replica>`,
TTL three intervals (a replica that stops publishing drops out by itself). The JSON format is
a contract with telemetry:

    {"replica": str, "published_at": float_unix_seconds,
     "circuit_breakers": [{"name": "openai", "state": "closed"|"open"|"half_open",
                           "failures": int, "successes": int, "last_failure_time": float|null}],
     "cache": {"hits": int, "misses": int, "entries": int, "backend": "redis"|"memory"},
     "operations": [{"name": str, "count": int, "errors": int, "total_ms": float,
                     "max_ms": float, "slow": int}]}
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Sequence
from typing import Any

from services.common.breaker import BreakerSnapshot, CircuitBreaker
from services.common.perf import OperationTotals, PerformanceMonitor
from services.common.redis import RedisUnavailable, ResilientRedis
from services.generation.cache import CacheStats, ResilientResponseCache

log = logging.getLogger(__name__)


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def build_snapshot(
    replica: str,
    breakers: Sequence[BreakerSnapshot],
    cache: CacheStats,
    operations: Sequence[OperationTotals],
    published_at: float,
) -> dict[str, Any]:
    return {
        "replica": replica,
        "published_at": published_at,
        "circuit_breakers": [
            {
                "name": b.name,
                "state": b.state.value,
                "failures": b.failures,
                "successes": b.successes,
                "last_failure_time": b.last_failure_time,
            }
            for b in breakers
        ],
        "cache": {
            "hits": cache.hits,
            "misses": cache.misses,
            "entries": cache.entries,
            "backend": cache.backend,
        },
        "operations": [
            {
                "name": op.name,
                "count": op.count,
                "errors": op.errors,
                "total_ms": round(op.total_ms, 3),
                "max_ms": round(op.max_ms, 3),
                "slow": op.slow,
            }
            for op in operations
        ],
    }


class StatsPublisher:
    def __init__(
        self,
        redis: ResilientRedis,
        replica_id: str,
        interval_seconds: float,
        breaker: CircuitBreaker,
        cache: ResilientResponseCache,
        perf: PerformanceMonitor,
    ) -> None:
        self.redis = redis
        self.replica_id = replica_id
        self.interval_seconds = interval_seconds
        self.breaker = breaker
        self.cache = cache
        self.perf = perf
        self.key = redis.key("stats", "generation", replica_id)
        self._task: asyncio.Task[None] | None = None

    async def snapshot(self) -> dict[str, Any]:
        return build_snapshot(
            self.replica_id,
            [self.breaker.snapshot()],
            await self.cache.stats(),
            self.perf.snapshot(),
            time.time(),
        )

    async def publish_once(self) -> bool:
        """True when the snapshot reached Redis. Without Redis there is nowhere to publish:
        telemetry then reports this replica's stats as unknown, which is the truth."""
        payload = json.dumps(await self.snapshot(), separators=(",", ":"))
        ttl_ms = max(1, round(self.interval_seconds * 3 * 1000))
        try:
            await self.redis.run(
                "stats_publish", lambda client: client.set(self.key, payload, px=ttl_ms)
            )
        except RedisUnavailable:
            log.debug("stats not published: Redis unavailable")
            return False
        return True

    async def start(self) -> None:
        if self._task is not None:
            return
        await self.publish_once()
        self._task = asyncio.create_task(self._run(), name="stats-publisher")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval_seconds)
            try:
                await self.publish_once()
            except Exception:  # a bad snapshot must not end publishing for good
                log.exception("stats publishing failed")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        # A replica that stopped cleanly leaves at once rather than after the TTL.
        with contextlib.suppress(RedisUnavailable):
            await self.redis.run("stats_delete", lambda client: client.delete(self.key))
