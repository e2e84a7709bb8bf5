"""Builds the telemetry service: database, Redis, the store with its group committers, the
health report and its probes. Nothing is started here."""

from __future__ import annotations

import grpc

from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.background import BackgroundTasks
from services.common.db import Database
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.replica_stats import ReplicaStatsBuilder, redis_fallback, replica_id
from services.common.server import Dependency, GrpcService
from services.common.stats_service import STATS_SERVICE_NAME, add_stats_service
from services.telemetry.access_log import SERVICE_NAME as ALS_SERVICE_NAME
from services.telemetry.access_log import AccessLogServicer, AlsMessages, add_access_log_service
from services.telemetry.edge_events import EdgeEventAggregator
from services.telemetry.group_commit import BatchLimits
from services.telemetry.health import (
    GENERATION_SERVICE,
    QUOTA_SERVICE,
    REQUIRED_SERVICES,
    Probe,
    ServiceTarget,
    SystemHealth,
    service_probes,
)
from services.telemetry.local_security_events import LocalSecurityEvents
from services.telemetry.public_health import CachedHealth
from services.telemetry.retention import RetentionJob
from services.telemetry.servicer import TelemetryAdminServicer, TelemetryServicer
from services.telemetry.settings import TelemetrySettings
from services.telemetry.stats_collector import (
    COLLECTOR_SERVICE_NAME,
    LocalReporter,
    ReplicaStatsStore,
    add_stats_collector,
)
from services.telemetry.store import TelemetryStore

SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryService"].full_name
ADMIN_SERVICE_NAME = telemetry_pb2.DESCRIPTOR.services_by_name["TelemetryAdminService"].full_name
# How long stop() waits for security events still being stored.
BACKGROUND_DRAIN_SECONDS = 5.0


class TelemetryService(GrpcService):
    """The service, with handles on what tests observe (the committers' counters)."""

    store: TelemetryStore
    system_health: SystemHealth
    public_health: CachedHealth
    replica_reports: ReplicaStatsStore


async def create_service(settings: TelemetrySettings) -> TelemetryService:
    perf = PerformanceMonitor(settings.slow_operation_ms)
    db = Database(settings, perf)
    redis = ResilientRedis(settings, perf)
    store = TelemetryStore(
        db,
        BatchLimits(
            max_rows=settings.telemetry_batch_max_rows,
            max_wait_seconds=settings.telemetry_batch_max_wait_ms / 1000,
            max_in_flight=settings.telemetry_batch_max_in_flight,
            max_pending_rows=settings.telemetry_batch_max_pending_rows,
        ),
    )
    # The replicas' stats: pushed here (ReportStats) by every replica of every service, kept
    # in Redis so every telemetry replica sees them all; this replica's own join them.
    replica_reports = ReplicaStatsStore(redis)
    own_stats = ReplicaStatsBuilder(
        "telemetry",
        replica_id(settings.replica_id),
        perf=perf,
        breakers=[redis.breaker] if redis.configured else [],
        fallbacks={"redis": redis_fallback(redis)},
    )
    own_reporter = LocalReporter(
        own_stats, replica_reports, settings.stats_publish_interval_seconds
    )
    generation = ServiceTarget("generation", settings.generation_addr, GENERATION_SERVICE)
    quota = ServiceTarget("quota", settings.quota_addr, QUOTA_SERVICE)
    deadline = settings.health_report_deadline_seconds
    timeout = min(settings.health_check_timeout_seconds, deadline)
    generation_check, generation_stats = service_probes(generation, timeout)
    quota_check, quota_stats = service_probes(quota, timeout)
    health = SystemHealth(
        [Probe("database", db.ping), Probe("redis", redis.ping), generation_check, quota_check],
        pulls=[generation_stats, quota_stats],
        pushed=replica_reports,
        own=own_stats.build,
        required_services=REQUIRED_SERVICES,
        timeout_seconds=timeout,
        deadline_seconds=deadline,
        degraded_latency_ms=settings.health_degraded_latency_ms,
        openai_breaker=settings.health_openai_breaker_name,
    )
    # /api/health: the overall status only, from a result at most HEALTH_CACHE_SECONDS old.
    public_health = CachedHealth(
        health.report,
        max_age_seconds=settings.health_cache_seconds,
        deadline_seconds=deadline + 0.5,
    )
    servicer = TelemetryServicer(store, public_health, settings.client_networks)
    # Monthly partitions of the event tables: created ahead, dropped past retention.
    retention = RetentionJob.from_settings(db, settings)
    background = BackgroundTasks()
    guard = AdminGuard(settings.genmesh_admin_token, LocalSecurityEvents(store, background))
    # Envoy's access log of the gateway's failures -> per-client bursts -> security events.
    access_log = AccessLogServicer(
        AlsMessages(),
        EdgeEventAggregator(
            window_seconds=settings.edge_event_window_seconds,
            threshold=settings.edge_event_threshold,
            max_tracked=settings.edge_event_max_tracked,
            networks=settings.client_networks,
        ),
        LocalSecurityEvents(store, background),
    )

    def register(server: grpc.aio.Server) -> None:
        telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(servicer, server)
        telemetry_pb2_grpc.add_TelemetryAdminServiceServicer_to_server(
            TelemetryAdminServicer(guard, health), server
        )
        add_access_log_service(server, access_log)
        add_stats_service(server, own_stats, own_reporter.ttl_seconds)
        add_stats_collector(server, replica_reports)

    async def drain_background() -> None:
        await background.drain(BACKGROUND_DRAIN_SECONDS)

    service = TelemetryService(
        "telemetry",
        settings,
        [SERVICE_NAME, ADMIN_SERVICE_NAME, STATS_SERVICE_NAME, COLLECTOR_SERVICE_NAME],
        register,
        dependencies=[
            Dependency("postgres", db.ping, required=True),
            # Only the health report's stats come from Redis: it is reported, not required.
            Dependency("redis", redis.ping, required=False),
        ],
        # Called by Envoy itself, at the rate of the gateway's failures: no span, no validation.
        # The stats pushes too: every replica's, every interval, each outside any trace.
        lean_services=[ALS_SERVICE_NAME, COLLECTOR_SERVICE_NAME],
        # Envoy never ends its access log streams: end them so the drain need not wait.
        on_drain=[access_log.close_streams],
        on_start=[retention.start, own_reporter.start],
        # In order: this replica's own stats leave the report (they use Redis), the retention
        # job stops (it uses the database); the server has drained,
        # so hand pending security events to the store, commit what is pending, then close
        # clients.
        on_stop=[
            own_reporter.stop,
            retention.stop,
            drain_background,
            store.close,
            generation.close,
            quota.close,
            db.close,
            redis.close,
        ],
    )
    service.store = store
    service.system_health = health
    service.public_health = public_health
    service.replica_reports = replica_reports
    own_stats.follow_health(service.health)
    return service
