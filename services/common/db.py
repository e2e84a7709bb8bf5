"""PostgreSQL through an asyncpg pool: created lazily (a service starts, and reports
NOT_SERVING, even while the database is down), statements time out, transient failures are
retried with exponential backoff, and every query is timed by the performance monitor."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import asyncpg
import grpc
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential_jitter,
)

from services.common.errors import Reason, ServiceError
from services.common.perf import PerformanceMonitor
from services.common.settings import PostgresSettings

log = logging.getLogger(__name__)
T = TypeVar("T")

# Failures worth another try: the connection or server went away, or a concurrent
# transaction made ours lose (serialization, deadlock). Constraint errors are not among them.
TRANSIENT_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.SerializationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.InterfaceError,
    # A pooled connection left mid-protocol by a server that shut down ("cannot switch to
    # state ..."; asyncpg issue #784): the next attempt gets a fresh connection.
    asyncpg.InternalClientError,
)


def database_unavailable() -> ServiceError:
    return ServiceError(
        grpc.StatusCode.UNAVAILABLE,
        Reason.DEPENDENCY_UNAVAILABLE,
        "the database is unavailable, try again shortly",
        retry_after_seconds=2,
    )


class Database:
    def __init__(self, settings: PostgresSettings, perf: PerformanceMonitor) -> None:
        self.settings = settings
        self.perf = perf
        self._pool: asyncpg.Pool | None = None
        self._lock = asyncio.Lock()

    async def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            async with self._lock:
                if self._pool is None:
                    self._pool = await asyncpg.create_pool(
                        self.settings.database_url,
                        min_size=self.settings.db_pool_min_size,
                        max_size=self.settings.db_pool_max_size,
                        command_timeout=self.settings.db_command_timeout_seconds,
                        timeout=self.settings.db_command_timeout_seconds,
                    )
        return self._pool

    async def run(self, operation: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """Run `fn` on a pooled connection, retrying transient failures. `fn` must be safe to
        repeat (wrap writes in a transaction inside it). Raises UNAVAILABLE when it gives up."""
        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(TRANSIENT_ERRORS),
                stop=stop_after_attempt(self.settings.db_retry_attempts),
                # 50 ms, then 100 ms, ... plus up to 50 ms of jitter (tenacity's default jitter
                # is a whole second, which held requests for seconds during an outage).
                wait=wait_exponential_jitter(multiplier=0.05, max=1.0, jitter=0.05),
                reraise=False,
            ):
                with attempt:
                    async with self.perf.track(f"db.{operation}"):
                        pool = await self.pool()
                        async with pool.acquire() as conn:
                            return await fn(conn)  # type: ignore[arg-type]
        except RetryError as err:
            log.warning("database gave up on %s: %s", operation, err.last_attempt.exception())
            raise database_unavailable() from err
        raise AssertionError("unreachable")  # pragma: no cover - AsyncRetrying always yields

    async def transaction(
        self, operation: str, fn: Callable[[asyncpg.Connection], Awaitable[T]]
    ) -> T:
        async def in_tx(conn: asyncpg.Connection) -> T:
            async with conn.transaction():
                return await fn(conn)

        return await self.run(operation, in_tx)

    async def fetchrow(self, operation: str, query: str, *args: Any) -> asyncpg.Record | None:
        async def go(conn: asyncpg.Connection) -> asyncpg.Record | None:
            return await conn.fetchrow(query, *args)

        return await self.run(operation, go)

    async def ping(self) -> None:
        pool = await self.pool()
        async with pool.acquire() as conn:
            await conn.fetchval("SELECT 1")

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None
