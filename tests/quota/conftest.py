"""Helpers for the quota tests: a movable clock, unique callers, and the service started
in-process against this run's PostgreSQL database and Redis prefix."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import grpc
import pytest

from genmesh.quota.v1 import quota_pb2_grpc
from services.common.db import Database
from services.common.identity import CLIENT_IP_HEADER, USER_EMAIL_HEADER, USER_ID_HEADER
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.server import GrpcService
from services.quota.app import create_service
from services.quota.clock import QuotaClock
from services.quota.settings import QuotaSettings

GUEST_LIMIT = 3
FREE_LIMIT = 10
PRO_LIMIT = 20


class MovableNow:
    """A clock for QuotaClock: real time shifted by `offset`, which tests move."""

    def __init__(self, offset: timedelta = timedelta(0)) -> None:
        self.offset = offset

    def __call__(self) -> datetime:
        return datetime.now(UTC) + self.offset

    def set(self, instant: datetime) -> None:
        self.offset = instant - datetime.now(UTC)

    def advance(self, delta: timedelta) -> None:
        self.offset += delta


def before_a_future_midnight(clock: QuotaClock, seconds: float = 60) -> datetime:
    """An instant `seconds` before a midnight two days from now: Redis expiries computed
    from it (EXPIREAT) stay in the real future."""
    window = clock.window(datetime.now(UTC) + timedelta(days=2))
    return window.resets_at - timedelta(seconds=seconds)


def unique_ip() -> str:
    """A fresh IPv6 address from the documentation range."""
    h = uuid.uuid4().hex
    return f"2001:db8:{h[0:4]}:{h[4:8]}:{h[8:12]}:{h[12:16]}:{h[16:20]}:{h[20:24]}"


def unique_user() -> tuple[str, str]:
    user_id = f"user-{uuid.uuid4()}"
    return user_id, f"{user_id}@example.com"


def user_metadata(user_id: str, email: str = "", ip: str = "") -> tuple[tuple[str, str], ...]:
    md = [(USER_ID_HEADER, user_id), (CLIENT_IP_HEADER, ip or unique_ip())]
    if email:
        md.append((USER_EMAIL_HEADER, email))
    return tuple(md)


def guest_metadata(ip: str) -> tuple[tuple[str, str], ...]:
    return ((CLIENT_IP_HEADER, ip),)


@dataclass
class SettingsFactory:
    database_url: str
    redis_url: str
    redis_prefix: str

    def __call__(self, **overrides: Any) -> QuotaSettings:
        values: dict[str, Any] = {
            "grpc_port": 0,
            "metrics_port": 0,
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "redis_key_prefix": self.redis_prefix,
            "guest_daily_limit": GUEST_LIMIT,
            "free_daily_limit": FREE_LIMIT,
            "pro_daily_limit": PRO_LIMIT,
            "quota_timezone": "UTC",
            "shutdown_grace_seconds": 1.0,
        }
        values.update(overrides)
        return QuotaSettings(**values)


@pytest.fixture
def quota_settings(database_url: str, redis_url: str, redis_prefix: str) -> SettingsFactory:
    return SettingsFactory(database_url, redis_url, redis_prefix)


@pytest.fixture
async def redis(quota_settings: SettingsFactory) -> AsyncIterator[ResilientRedis]:
    """The shared resilient client on this run's Redis and key prefix."""
    client = ResilientRedis(quota_settings(), PerformanceMonitor())
    yield client
    await client.close()


@pytest.fixture
async def database(quota_settings: SettingsFactory) -> AsyncIterator[Database]:
    """The shared PostgreSQL client on this run's database."""
    db = Database(quota_settings(), PerformanceMonitor())
    yield db
    await db.close()


@dataclass
class RunningQuota:
    service: GrpcService
    channel: grpc.aio.Channel
    stub: quota_pb2_grpc.QuotaServiceAsyncStub


@asynccontextmanager
async def running_quota(
    settings: QuotaSettings, clock: QuotaClock | None = None
) -> AsyncIterator[RunningQuota]:
    service = await create_service(settings, clock=clock)
    port = await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        yield RunningQuota(service, channel, quota_pb2_grpc.QuotaServiceStub(channel))
    finally:
        await channel.close(None)
        await service.stop()


@pytest.fixture(scope="module")
async def quota(
    database_url: str, redis_url: str, redis_prefix: str
) -> AsyncIterator[RunningQuota]:
    """The service on real PostgreSQL and Redis, with the real clock."""
    settings = SettingsFactory(database_url, redis_url, redis_prefix)()
    async with running_quota(settings) as running:
        yield running
