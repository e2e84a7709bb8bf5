"""Telemetry settings, read once from the environment."""

from __future__ import annotations

from pydantic import Field

from services.common.client_networks import ClientNetworkSettings
from services.common.settings import PostgresSettings, RedisSettings, ServiceSettings


# Edge events count client networks of CLIENT_IPV4_PREFIX_LENGTH / CLIENT_IPV6_PREFIX_LENGTH
# (ClientNetworkSettings), the same as the quota service's quotas, rate limits and blocks.
class TelemetrySettings(ServiceSettings, PostgresSettings, RedisSettings, ClientNetworkSettings):
    # GRPC_PORT; 0 picks a free port (tests).
    grpc_port: int = Field(default=50053, ge=0, le=65535)
    # METRICS_PORT; 0 disables the Prometheus endpoint.
    metrics_port: int = Field(default=9103, ge=0, le=65535)

    # Group commit: the most rows one batch (one transaction) holds. A single request larger
    # than this still goes in one transaction of its own, so a request is never split.
    telemetry_batch_max_rows: int = Field(default=500, alias="TELEMETRY_BATCH_MAX_ROWS", ge=1)
    # How long the first request of a batch waits for company before the batch is written.
    # It is the latency a lone request pays for batching; 0 writes as soon as possible.
    telemetry_batch_max_wait_ms: float = Field(
        default=5.0, alias="TELEMETRY_BATCH_MAX_WAIT_MS", ge=0, le=1000
    )
    # Batches of one kind written at once (each on its own pooled connection). Keep it
    # below DB_POOL_MAX_SIZE divided by the three committed kinds (feedback, events, security).
    telemetry_batch_max_in_flight: int = Field(
        default=2, alias="TELEMETRY_BATCH_MAX_IN_FLIGHT", ge=1, le=32
    )
    # Rows of one kind allowed to wait for a batch; past it (the database is down or cannot
    # keep up) writes fail fast with UNAVAILABLE and Retry-After instead of piling up.
    telemetry_batch_max_pending_rows: int = Field(
        default=10_000, alias="TELEMETRY_BATCH_MAX_PENDING_ROWS", ge=1
    )

    # The generation and quota services (gRPC host:port): the health report asks them for
    # grpc.health.v1 Check and StatsService.GetStats.
    generation_addr: str = Field(default="127.0.0.1:50051", alias="GENERATION_ADDR")
    quota_addr: str = Field(default="127.0.0.1:50052", alias="QUOTA_ADDR")
    # Timeout of each call of a health check (they run concurrently), capped by the deadline.
    health_check_timeout_seconds: float = Field(
        default=1.5, alias="HEALTH_CHECK_TIMEOUT_SECONDS", gt=0, lt=5
    )
    # The hard bound of a whole health check: whatever has not answered by then is reported
    # as timed out. Below Envoy's 5 s route timeout so /api/health and /api/admin/health
    # always answer; the default answers within 2 s whatever hangs.
    health_report_deadline_seconds: float = Field(
        default=1.8, alias="HEALTH_REPORT_DEADLINE_SECONDS", gt=0, lt=4.5
    )
    # A dependency answering slower than this is reported degraded (the spec's alert line).
    health_degraded_latency_ms: float = Field(
        default=500.0, alias="HEALTH_DEGRADED_LATENCY_MS", gt=0
    )
    # How long a health check's result answers the public GetHealth (/api/health): within it
    # callers get the last result, and a burst shares the one check in flight, so the
    # endpoint cannot multiply probes of the stores. The answer is at most about this old.
    # 0 checks on every call that does not find a check already running.
    health_cache_seconds: float = Field(default=1.0, alias="HEALTH_CACHE_SECONDS", ge=0, le=60)
    # The name of the generation service's upstream (OpenAI) circuit breaker in its replicas'
    # stats; the `openai` dependency of the health report follows that breaker.
    health_openai_breaker_name: str = Field(
        default="openai", alias="HEALTH_OPENAI_BREAKER_NAME", min_length=1
    )

    # Edge security events (services/telemetry/edge_events.py), from the gateway's access log:
    # the window, in seconds, in which one client network's failures of one status are counted.
    edge_event_window_seconds: float = Field(
        default=60.0, alias="EDGE_EVENT_WINDOW_SECONDS", gt=0, le=86_400
    )
    # Failures of one status from one client network within a window that make a burst: the
    # one that reaches it records one security event; the rest of that window records none.
    edge_event_threshold: int = Field(default=20, alias="EDGE_EVENT_THRESHOLD", ge=1)
    # The most (client network, status) windows held in memory; past it the oldest is dropped,
    # so a flood of distinct addresses costs bounded memory (about 0.5 KB a window).
    edge_event_max_tracked: int = Field(default=100_000, alias="EDGE_EVENT_MAX_TRACKED", ge=1)

    # Retention of funnel and security events (services/telemetry/retention.py): both tables
    # are partitioned by month (UTC) of created_at. A month is dropped whole once its last
    # instant is older than this many days, so rows live between this and about a month more.
    events_retention_days: int = Field(default=90, alias="EVENTS_RETENTION_DAYS", ge=1)
    # Months created ahead of the current one. A row whose month has no partition cannot be
    # written, so keep this well above what one failed maintenance run could leave missing.
    events_partitions_ahead: int = Field(default=2, alias="EVENTS_PARTITIONS_AHEAD", ge=1, le=24)
    # How often each replica runs the maintenance (at start, then at this interval); one
    # replica at a time does the work (an advisory lock), the others skip that round.
    events_maintenance_interval_seconds: float = Field(
        default=3600.0, alias="EVENTS_MAINTENANCE_INTERVAL_SECONDS", gt=0
    )

    # The admin credential expected in the `x-admin-token` header (the full health report,
    # /api/admin/health). Empty disables the admin API (every call gets PERMISSION_DENIED).
    genmesh_admin_token: str = Field(default="", alias="GENMESH_ADMIN_TOKEN", repr=False)
