"""Wires the quota service together: settings -> stores -> ledger -> servicer -> server, and
the reservation sweeper that runs beside the server."""

from __future__ import annotations

import grpc

from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.server import Dependency, GrpcService
from services.quota.clock import QuotaClock
from services.quota.guest_store import (
    FallbackGuestQuotaStore,
    MemoryGuestQuotaStore,
    RedisGuestQuotaStore,
)
from services.quota.ledger import QuotaLedger
from services.quota.network import ClientNetworks
from services.quota.plans import QuotaLimits
from services.quota.profile_cache import ProfileCache
from services.quota.profile_store import ProfileStore
from services.quota.reservation_sweeper import ReservationSweeper
from services.quota.servicer import QuotaServicer
from services.quota.settings import QuotaSettings

SERVICE_NAME = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name


def build_ledger(
    settings: QuotaSettings,
    db: Database,
    redis: ResilientRedis,
    perf: PerformanceMonitor,
    clock: QuotaClock | None = None,
) -> QuotaLedger:
    clock = clock or QuotaClock(settings.quota_timezone)
    limits = QuotaLimits(
        guest=settings.guest_daily_limit,
        free=settings.free_daily_limit,
        pro=settings.pro_daily_limit,
    )
    return QuotaLedger(
        clock=clock,
        limits=limits,
        guests=FallbackGuestQuotaStore(
            RedisGuestQuotaStore(redis, settings.quota_reservation_ttl_seconds),
            MemoryGuestQuotaStore(settings.quota_reservation_ttl_seconds),
        ),
        profiles=ProfileStore(db, clock, limits, perf),
        cache=ProfileCache(redis, settings.profile_cache_ttl_seconds),
        networks=client_networks(settings),
    )


def client_networks(settings: QuotaSettings) -> ClientNetworks:
    return ClientNetworks(settings.client_ipv4_prefix_length, settings.client_ipv6_prefix_length)


def build_sweeper(
    settings: QuotaSettings, profiles: ProfileStore, cache: ProfileCache | None = None
) -> ReservationSweeper:
    return ReservationSweeper(
        profiles,
        ttl_seconds=settings.quota_reservation_ttl_seconds,
        retention_seconds=settings.quota_settled_retention_seconds,
        interval_seconds=settings.quota_sweep_interval_seconds,
        cache=cache,
    )


async def create_service(
    settings: QuotaSettings, *, clock: QuotaClock | None = None
) -> GrpcService:
    """The quota service, built but not started. `clock` lets tests move the day."""
    perf = PerformanceMonitor(settings.slow_operation_ms)
    db = Database(settings, perf)
    redis = ResilientRedis(settings, perf)
    ledger = build_ledger(settings, db, redis, perf, clock)
    sweeper = build_sweeper(settings, ledger.profiles, ledger.cache)

    def register(server: grpc.aio.Server) -> None:
        quota_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaServicer(ledger), server)

    return GrpcService(
        "quota",
        settings,
        [SERVICE_NAME],
        register,
        dependencies=[
            # Profiles live only in PostgreSQL; guests fall back to memory without Redis.
            Dependency("postgres", db.ping, required=True),
            Dependency("redis", redis.ping, required=False),
        ],
        on_start=[sweeper.start],
        # The sweeper first: it uses the database and Redis.
        on_stop=[sweeper.stop, db.close, redis.close],
    )
