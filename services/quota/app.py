"""Wires the quota service together: settings -> stores -> ledger -> servicer -> server, the
rate limit service Envoy asks (config -> limiter -> decider -> RLS adapter), the operators'
block admin, the reservation sweeper that runs beside the server, and this replica's stats
(GetStats, pushed to telemetry)."""

from __future__ import annotations

import os

import grpc

from genmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.background import BackgroundTasks
from services.common.channels import internal_channel
from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.replica_stats import ReplicaStatsBuilder, redis_fallback, replica_id
from services.common.security_events import SecurityEventSink, TelemetrySecurityEvents
from services.common.server import Dependency, GrpcService
from services.common.stats_service import STATS_SERVICE_NAME, StatsReporter, add_stats_service
from services.quota.clock import QuotaClock
from services.quota.guest_store import (
    FallbackGuestQuotaStore,
    MemoryGuestQuotaStore,
    RedisGuestQuotaStore,
)
from services.quota.ledger import QuotaLedger
from services.quota.plans import QuotaLimits
from services.quota.profile_cache import ProfileCache
from services.quota.profile_store import ProfileStore
from services.quota.ratelimit.blocks import BlockAdmin
from services.quota.ratelimit.config import load_config
from services.quota.ratelimit.decider import RateLimitDecider
from services.quota.ratelimit.limiter import FallbackLimiter
from services.quota.ratelimit.memory_limiter import MemoryLimiter
from services.quota.ratelimit.redis_limiter import RedisLimiter
from services.quota.ratelimit.rls import SERVICE_NAME as RLS_SERVICE_NAME
from services.quota.ratelimit.rls import RlsMessages, add_rate_limit_service
from services.quota.reservation_sweeper import ReservationSweeper
from services.quota.servicer import QuotaAdminServicer, QuotaServicer
from services.quota.settings import QuotaSettings

SERVICE_NAME = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
ADMIN_SERVICE_NAME = quota_pb2.DESCRIPTOR.services_by_name["QuotaAdminService"].full_name
# How long stop() waits for security events still being sent.
BACKGROUND_DRAIN_SECONDS = 5.0
SECURITY_EVENT_TIMEOUT_SECONDS = 2.0


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
        networks=settings.client_networks,
    )


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


def build_decider(
    settings: QuotaSettings, redis: ResilientRedis, security_events: SecurityEventSink | None
) -> RateLimitDecider:
    """Raises ConfigError (a ValueError naming the field) for a bad rate-limit config."""
    limiter = RedisLimiter(redis, timeout_seconds=settings.rate_limit_redis_timeout_ms / 1000)
    return RateLimitDecider(
        load_config(settings.rate_limit_config, os.environ),
        FallbackLimiter(limiter, MemoryLimiter()),
        settings.client_networks,
        security_events,
        admin_token=settings.genmesh_admin_token,
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
    background = BackgroundTasks()
    telemetry_channel = internal_channel(settings.telemetry_addr)
    security_events = TelemetrySecurityEvents(
        telemetry_channel, SECURITY_EVENT_TIMEOUT_SECONDS, background
    )
    decider = build_decider(settings, redis, security_events)
    blocks = BlockAdmin(decider.limiter, decider.networks, security_events)
    rls_messages = RlsMessages()
    # This replica's stats for the operators' health report: served by GetStats and pushed
    # to telemetry (ReportStats) every STATS_PUBLISH_INTERVAL_SECONDS.
    stats = ReplicaStatsBuilder(
        "quota",
        replica_id(settings.replica_id),
        perf=perf,
        breakers=[redis.breaker] if redis.configured else [],
        fallbacks={"redis": redis_fallback(redis)},
    )
    reporter = StatsReporter(stats, telemetry_channel, settings.stats_publish_interval_seconds)

    def register(server: grpc.aio.Server) -> None:
        quota_pb2_grpc.add_QuotaServiceServicer_to_server(QuotaServicer(ledger), server)
        quota_pb2_grpc.add_QuotaAdminServiceServicer_to_server(
            QuotaAdminServicer(AdminGuard(settings.genmesh_admin_token, security_events), blocks),
            server,
        )
        add_rate_limit_service(server, decider, rls_messages)
        add_stats_service(server, stats, reporter.ttl_seconds)

    async def close_telemetry() -> None:
        await background.drain(BACKGROUND_DRAIN_SECONDS)
        await telemetry_channel.close(grace=None)

    service = GrpcService(
        "quota",
        settings,
        [SERVICE_NAME, ADMIN_SERVICE_NAME, STATS_SERVICE_NAME],
        register,
        dependencies=[
            # Profiles live only in PostgreSQL; guests fall back to memory without Redis.
            Dependency("postgres", db.ping, required=True),
            Dependency("redis", redis.ping, required=False),
        ],
        on_start=[sweeper.start, reporter.start],
        lean_services=[RLS_SERVICE_NAME],
        # The stats reporter and the sweeper first (the last stats report needs the telemetry
        # channel; the sweeper uses the database and Redis); pending security events next.
        on_stop=[reporter.stop, sweeper.stop, close_telemetry, db.close, redis.close],
    )
    stats.follow_health(service.health)
    return service
