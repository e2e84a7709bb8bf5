"""Settings every service reads from the environment, once, into a typed object.

Each service subclasses `ServiceSettings` and adds its own fields; every field is documented
in the README with its default. Names from the product spec stay (`OPENAI_*`, `GEN_*`);
`DATABASE_URL` and `REDIS_URL` replace the Supabase and Upstash variables.
"""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServiceSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    # Where the gRPC server listens. 0 picks a free port (tests).
    grpc_host: str = "127.0.0.1"
    grpc_port: int = Field(default=0, ge=0, le=65535)
    # Prometheus metrics at http://<metrics_host>:<metrics_port>/metrics; 0 disables them.
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=0, ge=0, le=65535)
    log_level: str = Field(default="INFO", alias="LOG_LEVEL")
    # OTLP/gRPC collector for traces, e.g. http://127.0.0.1:4317; empty = no export.
    otel_exporter_otlp_endpoint: str = Field(default="", alias="OTEL_EXPORTER_OTLP_ENDPOINT")
    # OpenTelemetry's sampler name (the SDK reads it and OTEL_TRACES_SAMPLER_ARG). Empty: the
    # SDK's parent-based always-on with an exporter, parent-based always-off without one.
    otel_traces_sampler: str = Field(default="", alias="OTEL_TRACES_SAMPLER")
    # Operations slower than this are counted and logged as slow.
    slow_operation_ms: float = Field(default=1000.0, alias="SLOW_OPERATION_MS", gt=0)
    # How long in-flight RPCs may finish after SIGTERM before they are cancelled.
    shutdown_grace_seconds: float = Field(default=10.0, alias="SHUTDOWN_GRACE_SECONDS", ge=0)
    # After SIGTERM, how long the replica keeps taking calls while it reports NOT_SERVING, before
    # the drain above: time for its callers to stop sending (Envoy's health checks, every 2 s,
    # take a NOT_SERVING host out at the next check; the services' channels watch the
    # `liveness` status and move at once). 0: it stops taking calls at once, and a call that
    # reaches it in that instant fails with CANCELLED.
    shutdown_drain_delay_seconds: float = Field(
        default=0.0, alias="SHUTDOWN_DRAIN_DELAY_SECONDS", ge=0
    )
    # How often dependency health is probed for grpc.health.v1.
    health_probe_interval_seconds: float = Field(
        default=5.0, alias="HEALTH_PROBE_INTERVAL_SECONDS", gt=0
    )
    # How often this replica pushes its stats (breakers, cache, operations: ReplicaStats in
    # protos/genmesh/stats/v1/stats.proto) to telemetry for the operators' health report;
    # telemetry keeps each push for three intervals.
    stats_publish_interval_seconds: float = Field(
        default=5.0, alias="STATS_PUBLISH_INTERVAL_SECONDS", gt=0
    )
    # This replica's name in those stats (REPLICA_ID, else POD_NAME); empty = "<hostname>-<pid>".
    replica_id: str = Field(default="", validation_alias=AliasChoices("REPLICA_ID", "POD_NAME"))


class PostgresSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/genmesh", alias="DATABASE_URL"
    )
    db_pool_min_size: int = Field(default=1, alias="DB_POOL_MIN_SIZE", ge=0)
    db_pool_max_size: int = Field(default=10, alias="DB_POOL_MAX_SIZE", ge=1)
    # Per-statement timeout; a query past it fails rather than holding a connection.
    db_command_timeout_seconds: float = Field(default=5.0, alias="DB_COMMAND_TIMEOUT_SECONDS", gt=0)
    # Transient failures (connection lost, serialization) are retried this many times.
    db_retry_attempts: int = Field(default=3, alias="DB_RETRY_ATTEMPTS", ge=1)


class RedisSettings(BaseSettings):
    model_config = SettingsConfigDict(extra="ignore", frozen=True, populate_by_name=True)

    # Empty means no Redis: the documented in-memory, per-replica fallback.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", alias="REDIS_URL")
    # Prefix for every key, so several deployments (or test runs) share one Redis safely.
    redis_key_prefix: str = Field(default="genmesh:", alias="REDIS_KEY_PREFIX")
    # A Redis call slower than this counts as a failure, so no request hangs on Redis.
    redis_timeout_seconds: float = Field(default=0.5, alias="REDIS_TIMEOUT_SECONDS", gt=0)
    # After this many consecutive errors Redis is bypassed (in-memory fallback) ...
    redis_error_threshold: int = Field(default=10, alias="REDIS_ERROR_THRESHOLD", ge=1)
    # ... for this long, then one call probes whether it is back.
    redis_cooldown_seconds: float = Field(default=60.0, alias="REDIS_COOLDOWN_SECONDS", gt=0)
