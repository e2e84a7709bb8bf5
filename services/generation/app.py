"""Builds the generation service from its settings: clients, stores, the pipeline, servicers,
health dependencies and the shutdown sequence. Nothing runs until `start()`."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import grpc
import openai

from genmesh.generation.v1 import generation_pb2_grpc
from services.common.admin_auth import AdminGuard
from services.common.background import BackgroundTasks
from services.common.breaker import CircuitBreaker
from services.common.channels import internal_channel
from services.common.perf import PerformanceMonitor
from services.common.redis import ResilientRedis
from services.common.replica_stats import ReplicaStatsBuilder, redis_fallback, replica_id
from services.common.security_events import TelemetrySecurityEvents
from services.common.server import Dependency, GrpcService
from services.common.stats_service import STATS_SERVICE_NAME, StatsReporter, add_stats_service
from services.generation.cache import (
    MemoryResponseCache,
    RedisResponseCache,
    ResilientResponseCache,
)
from services.generation.flight_leases import FlightLeases
from services.generation.inflight import InFlightLimiter
from services.generation.pipeline import GenerationPipeline, PipelineConfig
from services.generation.quota_client import QuotaClient
from services.generation.servicer import GenerationAdminServicer, GenerationServicer
from services.generation.settings import GenerationSettings
from services.generation.shared_calls import SharedCalls
from services.generation.upstream import OpenAIUpstream
from services.generation.upstream_calls import RetryPolicy, UpstreamCaller

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    "genmesh.generation.v1.GenerationService",
    "genmesh.generation.v1.GenerationAdminService",
    STATS_SERVICE_NAME,
)
OPENAI_DEFAULT_BASE_URL = "https://api.openai.com/v1"
# How long stop() waits for in-flight settlements and security events.
BACKGROUND_DRAIN_SECONDS = 5.0
SECURITY_EVENT_TIMEOUT_SECONDS = 2.0


def build_openai_client(settings: GenerationSettings) -> openai.AsyncOpenAI | None:
    """The SDK client, or None when no key is configured. Its own retries are off: the
    pipeline's retry loop makes them, so the circuit breaker sees every attempt."""
    if not settings.openai_api_key:
        return None
    return openai.AsyncOpenAI(
        api_key=settings.openai_api_key,
        # Explicit, so the SDK never picks up a different OPENAI_BASE_URL on its own.
        base_url=settings.openai_base_url or OPENAI_DEFAULT_BASE_URL,
        timeout=settings.openai_timeout_seconds,
        max_retries=0,
        # None: the SDK's own httpx client.
        http_client=openai.DefaultAioHttpClient()
        if settings.openai_http_client == "aiohttp"
        else None,
    )


@dataclass
class GenerationComponents:
    """The parts a running service is made of (tests and the replica's stats read them)."""

    settings: GenerationSettings
    perf: PerformanceMonitor
    redis: ResilientRedis
    cache: ResilientResponseCache
    breaker: CircuitBreaker
    limiter: InFlightLimiter
    quota: QuotaClient
    pipeline: GenerationPipeline
    stats: ReplicaStatsBuilder
    reporter: StatsReporter
    background: BackgroundTasks


class GenerationService(GrpcService):
    def __init__(
        self,
        components: GenerationComponents,
        register: Callable[[grpc.aio.Server], None],
        dependencies: Sequence[Dependency],
        on_stop: Sequence[Callable[[], Awaitable[None]]],
        on_start: Sequence[Callable[[], Awaitable[None]]] = (),
    ) -> None:
        super().__init__(
            "generation",
            components.settings,
            SERVICE_NAMES,
            register,
            dependencies,
            on_stop,
            on_start,
        )
        self.components = components


async def create_service(settings: GenerationSettings) -> GenerationService:
    perf = PerformanceMonitor(settings.slow_operation_ms)
    redis = ResilientRedis(settings, perf)
    cache = ResilientResponseCache(
        RedisResponseCache(redis, settings.gen_cache_ttl_seconds) if redis.configured else None,
        MemoryResponseCache(settings.gen_cache_ttl_seconds, settings.gen_cache_memory_max_entries),
    )
    breaker = CircuitBreaker(
        "openai",
        failure_threshold=settings.circuit_breaker_threshold,
        reset_timeout=settings.circuit_breaker_timeout_seconds,
        half_open_attempts=settings.circuit_breaker_half_open_attempts,
        max_open_seconds=settings.circuit_breaker_max_open_seconds,
    )
    limiter = InFlightLimiter(settings.gen_max_inflight)
    background = BackgroundTasks()

    quota_channel = internal_channel(settings.quota_addr)
    telemetry_channel = internal_channel(settings.telemetry_addr)
    quota = QuotaClient(quota_channel, settings.quota_timeout_seconds, perf)
    security_events = TelemetrySecurityEvents(
        telemetry_channel, SECURITY_EVENT_TIMEOUT_SECONDS, background
    )

    openai_client = build_openai_client(settings)
    calls: SharedCalls | None = None
    if openai_client is None:
        log.error("OPENAI_API_KEY is not set: generation is NOT_SERVING until it is configured")
    else:
        caller = UpstreamCaller(
            OpenAIUpstream(openai_client, perf),
            breaker,
            RetryPolicy(
                max_retries=settings.openai_max_retries,
                base_delay_seconds=settings.openai_retry_base_delay_seconds,
                max_delay_seconds=settings.openai_retry_max_delay_seconds,
            ),
            upstream_timeout_seconds=settings.openai_timeout_seconds,
        )
        leases = (
            FlightLeases(redis, settings.gen_singleflight_lease_seconds)
            if redis.configured
            else None
        )
        calls = SharedCalls(caller, cache, limiter, leases)
    pipeline = GenerationPipeline(
        PipelineConfig.from_settings(settings),
        calls,
        cache,
        quota,
        background,
        security_events,
    )
    # This replica's stats for the operators' health report: served by GetStats and pushed
    # to telemetry (ReportStats) every STATS_PUBLISH_INTERVAL_SECONDS.
    stats = ReplicaStatsBuilder(
        "generation",
        replica_id(settings.gen_replica_id, settings.replica_id),
        perf=perf,
        breakers=[breaker, redis.breaker] if redis.configured else [breaker],
        cache=cache.stats,
        inflight=lambda: limiter.active,
        fallbacks={"redis": redis_fallback(redis)},
    )
    reporter = StatsReporter(stats, telemetry_channel, settings.stats_publish_interval_seconds)
    components = GenerationComponents(
        settings,
        perf,
        redis,
        cache,
        breaker,
        limiter,
        quota,
        pipeline,
        stats,
        reporter,
        background,
    )

    def register(server: grpc.aio.Server) -> None:
        generation_pb2_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(pipeline), server
        )
        generation_pb2_grpc.add_GenerationAdminServiceServicer_to_server(
            GenerationAdminServicer(
                AdminGuard(settings.genmesh_admin_token, security_events), cache, perf
            ),
            server,
        )
        add_stats_service(server, stats, reporter.ttl_seconds)

    # Readiness follows what this process needs to answer, never a sibling service. Quota is
    # reported, not required: while it is away every replica would fail alike, so NOT_SERVING
    # would only pull them all out of rotation (and out of the health report, the admin API
    # and the cache's invalidation with them) and turn a quota blip into a generation outage;
    # instead each call fails fast with DEPENDENCY_UNAVAILABLE and a Retry-After. Redis is
    # optional (the in-memory fallback). The upstream model API is deliberately not probed:
    # its outages are what the circuit breaker is for (fail fast with UPSTREAM_UNAVAILABLE
    # and a Retry-After, cached answers still served, recovery found by half-open calls),
    # whereas NOT_SERVING would make every replica leave the load balancer at once, turning
    # a partial upstream outage into a total one and hiding the cache and admin API.
    dependencies = [
        Dependency("quota", quota.check_health, required=False),
        Dependency("redis", redis.ping, required=False),
    ]
    if openai_client is None:
        # A configuration error, not an outage: report it rather than serve certain failures.
        dependencies.append(Dependency("openai_config", _missing_api_key, required=True))

    async def close_clients() -> None:
        await background.drain(BACKGROUND_DRAIN_SECONDS)
        await quota_channel.close(grace=None)
        await telemetry_channel.close(grace=None)
        if openai_client is not None:
            await openai_client.close()

    service = GenerationService(
        components,
        register,
        dependencies,
        # Order matters: stop reporting stats (the last report needs the telemetry channel
        # and reads Redis), finish settlements (need the quota channel), then close the
        # clients, Redis last.
        on_stop=[reporter.stop, close_clients, redis.close],
        # Reported once right away, then every interval, so health sees a new replica at once.
        on_start=[reporter.start],
    )
    stats.follow_health(service.health)
    return service


async def _missing_api_key() -> None:
    raise RuntimeError("OPENAI_API_KEY is not set")
