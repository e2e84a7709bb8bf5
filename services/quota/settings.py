"""The quota service's settings, read once from the environment."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator, model_validator

from services.common.client_networks import ClientNetworkSettings
from services.common.settings import PostgresSettings, RedisSettings, ServiceSettings
from services.quota.ratelimit.config import DEFAULT_CONFIG

# What Envoy waits for a rate-limit decision by default (the gateway's
# GATEWAY_RATE_LIMIT_TIMEOUT_MS); the decision's Redis budget must stay below it.
GATEWAY_RATE_LIMIT_TIMEOUT_MS_DEFAULT = 100


# Guests' quotas, per-IP rate limits and blocks count client networks of
# CLIENT_IPV4_PREFIX_LENGTH / CLIENT_IPV6_PREFIX_LENGTH (ClientNetworkSettings, shared with
# telemetry): one IPv6 subscriber holds a whole /64, so counting single addresses would let one
# person be unlimited guests.
class QuotaSettings(ServiceSettings, PostgresSettings, RedisSettings, ClientNetworkSettings):
    # Where the gRPC server listens (GRPC_PORT); 0 picks a free port (tests).
    grpc_port: int = Field(default=50052, ge=0, le=65535)
    # Prometheus metrics port (METRICS_PORT); 0 disables the endpoint.
    metrics_port: int = Field(default=9102, ge=0, le=65535)
    # IANA zone whose midnight resets every daily quota, e.g. "Europe/Paris".
    quota_timezone: str = Field(default="UTC", alias="QUOTA_TIMEZONE")
    # Generations per day for a guest (no sign-in), counted per client network (below).
    guest_daily_limit: int = Field(default=3, alias="GUEST_DAILY_LIMIT", ge=0)
    # Generations per day for a signed-in user without pro.
    free_daily_limit: int = Field(default=10, alias="FREE_DAILY_LIMIT", ge=0)
    # Generations per day for a pro user (`profiles.is_pro`).
    pro_daily_limit: int = Field(default=100, alias="PRO_DAILY_LIMIT", ge=0)
    # How long GetQuota/GetProfile may serve a profile from the Redis cache; every reserve or
    # settlement of that user invalidates it at once. 0 turns the cache off.
    profile_cache_ttl_seconds: float = Field(default=60.0, alias="PROFILE_CACHE_TTL_SECONDS", ge=0)
    # A reservation (guest or user) still unsettled after this long (its caller crashed or
    # lost its connection) expires and gives its unit back; a settlement arriving later is
    # ignored. Keep it above the longest generation (the route timeout is 60 s): a
    # generation outliving it would be free.
    quota_reservation_ttl_seconds: float = Field(
        default=300.0, alias="QUOTA_RESERVATION_TTL_SECONDS", gt=0
    )
    # How often each replica looks for expired reservations and prunes settled ones.
    quota_sweep_interval_seconds: float = Field(
        default=30.0, alias="QUOTA_SWEEP_INTERVAL_SECONDS", gt=0
    )
    # How long settled reservations are kept, so a late duplicate settlement is still answered
    # "already settled" (applied=False with the caller's quota) rather than "unknown".
    quota_settled_retention_seconds: float = Field(
        default=86400.0, alias="QUOTA_SETTLED_RETENTION_SECONDS", ge=0
    )

    # The rate limits Envoy's rate limit service (served here) enforces: a YAML file, by
    # default services/quota/ratelimit/limits.yaml; RATE_LIMIT_* variables override its
    # common knobs (see that file).
    rate_limit_config: Path = Field(default=DEFAULT_CONFIG, alias="RATE_LIMIT_CONFIG")
    # The Redis budget of one rate-limit decision (its checks run concurrently, each bounded by
    # it). Past it Redis counts as unavailable for that decision: the decision is made from
    # this replica's memory and the failure feeds the Redis breaker, like any failed call.
    # Envoy waits GATEWAY_RATE_LIMIT_TIMEOUT_MS (100 ms) and then lets the request pass, so this
    # must stay below that wait, with room for the fallback and the gRPC hop; otherwise a slow
    # but alive Redis would make every request pass unchecked.
    rate_limit_redis_timeout_ms: int = Field(
        default=50, alias="RATE_LIMIT_REDIS_TIMEOUT_MS", ge=1, le=10_000
    )
    # Envoy's wait, read only to check the budget above against it: the gateway's default
    # unless GATEWAY_RATE_LIMIT_TIMEOUT_MS is set here too (set it to the gateway's value when
    # the gateway waits longer and this budget should grow with it).
    gateway_rate_limit_timeout_ms: int = Field(
        default=GATEWAY_RATE_LIMIT_TIMEOUT_MS_DEFAULT,
        alias="GATEWAY_RATE_LIMIT_TIMEOUT_MS",
        ge=1,
        le=10_000,
    )
    # The telemetry service (gRPC host:port), told about rate-limit bursts and blocks and
    # admin actions (best effort).
    telemetry_addr: str = Field(default="127.0.0.1:50053", alias="TELEMETRY_ADDR")
    # The admin credential expected in the `x-admin-token` header (rate-limit blocks). Empty
    # disables the admin API (every call gets PERMISSION_DENIED).
    genmesh_admin_token: str = Field(default="", alias="GENMESH_ADMIN_TOKEN", repr=False)

    @field_validator("quota_timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as err:
            raise ValueError(f"unknown IANA time zone {value!r}") from err
        return value

    @model_validator(mode="after")
    def _decision_fits_envoys_wait(self) -> QuotaSettings:
        if self.rate_limit_redis_timeout_ms >= self.gateway_rate_limit_timeout_ms:
            raise ValueError(
                f"RATE_LIMIT_REDIS_TIMEOUT_MS ({self.rate_limit_redis_timeout_ms}) must be below "
                f"GATEWAY_RATE_LIMIT_TIMEOUT_MS ({self.gateway_rate_limit_timeout_ms}), how long "
                "Envoy waits for a rate-limit decision before letting the request pass"
            )
        return self
