"""The quota service's settings, read once from the environment."""

from __future__ import annotations

from pathlib import Path
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import Field, field_validator

from services.common.settings import PostgresSettings, RedisSettings, ServiceSettings
from services.quota.ratelimit.config import DEFAULT_CONFIG


class QuotaSettings(ServiceSettings, PostgresSettings, RedisSettings):
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

    # Guests' quotas and per-IP rate limits count client networks of these prefix lengths:
    # one IPv6 subscriber holds a whole /64, so counting single addresses would let one person
    # be unlimited guests. IPv4-mapped IPv6 addresses count as IPv4.
    client_ipv4_prefix_length: int = Field(
        default=32, alias="CLIENT_IPV4_PREFIX_LENGTH", ge=1, le=32
    )
    client_ipv6_prefix_length: int = Field(
        default=64, alias="CLIENT_IPV6_PREFIX_LENGTH", ge=1, le=128
    )

    # The rate limits Envoy's rate limit service (served here) enforces: a YAML file, by
    # default services/quota/ratelimit/limits.yaml; RATE_LIMIT_* variables override its
    # common knobs (see that file).
    rate_limit_config: Path = Field(default=DEFAULT_CONFIG, alias="RATE_LIMIT_CONFIG")
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
