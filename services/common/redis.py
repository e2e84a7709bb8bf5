"""Redis through redis-py's asyncio client, made safe to depend on: every call has a short
timeout and a few retries with exponential backoff; after repeated errors a circuit breaker
bypasses Redis for a cooldown, then probes it again. Callers catch `RedisUnavailable` and use
their in-memory fallback, so a Redis outage costs at most one failed call per request and
never hangs a request."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from services.common.breaker import CircuitBreaker
from services.common.perf import PerformanceMonitor
from services.common.settings import RedisSettings

log = logging.getLogger(__name__)
T = TypeVar("T")


class RedisUnavailable(Exception):
    """Redis is not configured, failing, or bypassed by the breaker: use the fallback."""


class ResilientRedis:
    """`client` replaces the one REDIS_URL would make (the Redis Cluster tests hand in a
    cluster client, to prove the Lua scripts run unchanged there)."""

    def __init__(
        self, settings: RedisSettings, perf: PerformanceMonitor, client: Redis | None = None
    ) -> None:
        self.settings = settings
        self.perf = perf
        self.prefix = settings.redis_key_prefix
        self.breaker = CircuitBreaker(
            "redis",
            failure_threshold=settings.redis_error_threshold,
            reset_timeout=settings.redis_cooldown_seconds,
            half_open_attempts=1,
        )
        self.client: Redis | None = client
        if client is None and settings.redis_url:
            self.client = Redis.from_url(
                settings.redis_url,
                socket_timeout=settings.redis_timeout_seconds,
                socket_connect_timeout=settings.redis_timeout_seconds,
                retry=Retry(ExponentialBackoff(cap=0.1, base=0.01), retries=1),
                retry_on_error=[RedisConnectionError, RedisTimeoutError],
                health_check_interval=30,
            )
        elif client is None:
            log.warning("REDIS_URL is empty: using the in-memory, per-replica fallback")

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    @property
    def configured(self) -> bool:
        return self.client is not None

    @property
    def available(self) -> bool:
        """Whether a call would go to Redis now (a pure read: it changes no breaker state)."""
        return self.client is not None and self.breaker.allow()

    async def run(self, operation: str, fn: Callable[[Redis], Awaitable[T]]) -> T:
        if self.client is None:
            raise RedisUnavailable(operation)
        permit = self.breaker.try_acquire()
        if permit is None:
            raise RedisUnavailable(operation)
        # Leaving the block unsettled (cancelled, or an error that is not Redis's) releases
        # the permit: it frees a half-open probe slot and counts for nothing.
        with permit:
            try:
                async with self.perf.track(f"redis.{operation}"):
                    async with asyncio.timeout(self.settings.redis_timeout_seconds * 3):
                        result = await fn(self.client)
            except (RedisError, OSError, TimeoutError) as err:
                if permit.failure():
                    log.warning(
                        "redis bypassed for %.0fs after errors: %s",
                        self.breaker.retry_after(),
                        err,
                    )
                raise RedisUnavailable(operation) from err
            if permit.success():
                log.info("redis is back")
            return result

    async def ping(self) -> None:
        """For health: fails when Redis is unset or unreachable (the breaker is bypassed so
        health tells the truth even while callers use the fallback)."""
        if self.client is None:
            raise RedisUnavailable("REDIS_URL is not set")
        await self.client.ping()

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
