"""Generation settings, read once from the environment. Names from the product spec stay
(`OPENAI_*`, `GEN_CACHE_TTL_SECONDS`, `GEN_MAX_INFLIGHT`, `CIRCUIT_BREAKER_*`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from services.common.settings import RedisSettings, ServiceSettings

DEFAULT_SYSTEM_PROMPT = (
    "You are genmesh, a helpful assistant. Answer clearly and concisely. "
    "When given an image, describe what matters in it and answer the question about it. "
    "Answer in {lang}."
)


# GEN_MAX_IMAGE_PIXELS' default, width times height: 25 megapixels (5000x5000). That is above
# a 24-megapixel camera photo (6000x4000) and far above what vision models look at (OpenAI
# scales an image to fit 2048x2048, then to 768 pixels on the short side), while a decoder
# holding it as RGBA needs at most 100 MB. An upload (at most 5 MiB) that declares more is a
# decompression bomb or a picture the model would shrink anyway.
DEFAULT_MAX_IMAGE_PIXELS = 25_000_000
# Pillow, which reads the header, refuses by itself anything over twice its MAX_IMAGE_PIXELS
# (178,956,970 pixels): a larger setting could not let such images through.
MAX_IMAGE_PIXELS_CEILING = 178_956_970


class GenerationSettings(ServiceSettings, RedisSettings):
    # GRPC_PORT; 0 picks a free port (tests).
    grpc_port: int = Field(default=50051, ge=0, le=65535)

    # API key for the upstream. Empty is allowed so the service can start and say what is
    # missing: it reports NOT_SERVING and Generate fails with UNAVAILABLE until it is set.
    openai_api_key: str = Field(default="", alias="OPENAI_API_KEY", repr=False)
    # Base URL of the OpenAI-compatible API, e.g. http://127.0.0.1:8900/v1; empty = OpenAI's.
    openai_base_url: str = Field(default="", alias="OPENAI_BASE_URL")
    # Model for text-only prompts.
    openai_text_model: str = Field(default="gpt-4o-mini", alias="OPENAI_TEXT_MODEL", min_length=1)
    # Model for prompts with an image (must accept image_url content parts).
    openai_vision_model: str = Field(
        default="gpt-4o-mini", alias="OPENAI_VISION_MODEL", min_length=1
    )
    # Per-attempt timeout of an upstream call (for streams: the longest gap between chunks).
    openai_timeout_seconds: float = Field(default=30.0, alias="OPENAI_TIMEOUT_SECONDS", gt=0)
    # The SDK's HTTP transport: aiohttp (its DefaultAioHttpClient: less CPU and latency per
    # call, measured by `make bench`) or httpx (the SDK's default).
    openai_http_client: Literal["aiohttp", "httpx"] = Field(
        default="aiohttp", alias="OPENAI_HTTP_CLIENT"
    )
    # Retries after a transient upstream failure (timeouts, connection errors, 408, 409, 429,
    # 5xx), within the caller's deadline; 0 disables them. The SDK's own retries are off: each
    # attempt is seen by the circuit breaker.
    openai_max_retries: int = Field(default=2, alias="OPENAI_MAX_RETRIES", ge=0, le=10)
    # Backoff before retry n: uniform in [0, min(max, base * 2**(n-1))] (full jitter).
    openai_retry_base_delay_seconds: float = Field(
        default=0.5, alias="OPENAI_RETRY_BASE_DELAY_SECONDS", gt=0
    )
    # The longest wait before a retry; an upstream Retry-After longer than this is not
    # waited out but returned to the caller.
    openai_retry_max_delay_seconds: float = Field(
        default=8.0, alias="OPENAI_RETRY_MAX_DELAY_SECONDS", gt=0
    )
    # Upper bound on the answer's length, in tokens.
    openai_max_tokens: int = Field(default=800, alias="OPENAI_MAX_TOKENS", ge=1)

    # How long a successful answer stays in the response cache.
    gen_cache_ttl_seconds: int = Field(default=3600, alias="GEN_CACHE_TTL_SECONDS", ge=1)
    # Entries the per-replica in-memory fallback cache holds (least recently used go first).
    gen_cache_memory_max_entries: int = Field(
        default=1000, alias="GEN_CACHE_MEMORY_MAX_ENTRIES", ge=1
    )
    # Upstream calls one replica runs at once; more fail fast with UNAVAILABLE/OVERLOADED.
    # Cache hits and requests sharing an identical call in flight never take a slot.
    gen_max_inflight: int = Field(default=25, alias="GEN_MAX_INFLIGHT", ge=1)
    # Largest image accepted, in pixels (width times height, read from the image's header
    # without decoding it); a larger one is INVALID_ARGUMENT naming image_data. See
    # DEFAULT_MAX_IMAGE_PIXELS for the default's reasons.
    gen_max_image_pixels: int = Field(
        default=DEFAULT_MAX_IMAGE_PIXELS,
        alias="GEN_MAX_IMAGE_PIXELS",
        ge=1,
        le=MAX_IMAGE_PIXELS_CEILING,
    )
    # The system prompt. "{lang}" is replaced by the requested language; a prompt without
    # the placeholder gets "Answer in <lang>." appended. Changing it changes cache keys.
    gen_system_prompt: str = Field(
        default=DEFAULT_SYSTEM_PROMPT, alias="GEN_SYSTEM_PROMPT", min_length=1
    )

    # Consecutive upstream failures (429, 500, 502, 503, 504, timeouts, connection errors)
    # that open the upstream circuit breaker ...
    circuit_breaker_threshold: int = Field(default=5, alias="CIRCUIT_BREAKER_THRESHOLD", ge=1)
    # ... how long it then fails fast before letting probes through half-open (longer when
    # the upstream's Retry-After says so, up to CIRCUIT_BREAKER_MAX_OPEN_SECONDS) ...
    circuit_breaker_timeout_seconds: float = Field(
        default=60.0, alias="CIRCUIT_BREAKER_TIMEOUT_SECONDS", gt=0
    )
    circuit_breaker_max_open_seconds: float = Field(
        default=600.0, alias="CIRCUIT_BREAKER_MAX_OPEN_SECONDS", gt=0
    )
    # ... and how many concurrent half-open probes it admits; that many successes close it.
    circuit_breaker_half_open_attempts: int = Field(
        default=3, alias="CIRCUIT_BREAKER_HALF_OPEN_ATTEMPTS", ge=1
    )

    # How long the Redis lease behind cross-replica single-flight lasts without renewal: the
    # leader renews it every third of this while its call runs, so a replica that dies
    # mid-call delays the others' own call by at most this long.
    gen_singleflight_lease_seconds: float = Field(
        default=10.0, alias="GEN_SINGLEFLIGHT_LEASE_SECONDS", gt=0
    )

    # The quota service (gRPC host:port). Required: no generation without a reservation.
    quota_addr: str = Field(default="127.0.0.1:50052", alias="QUOTA_ADDR")
    # Deadline of each call to the quota service.
    quota_timeout_seconds: float = Field(default=2.0, alias="QUOTA_TIMEOUT_SECONDS", gt=0)
    # The telemetry service (gRPC host:port), told about security events (best effort).
    telemetry_addr: str = Field(default="127.0.0.1:50053", alias="TELEMETRY_ADDR")

    # The admin credential expected in the `x-admin-token` header. Empty disables the admin
    # API (every call gets PERMISSION_DENIED).
    genmesh_admin_token: str = Field(default="", alias="GENMESH_ADMIN_TOKEN", repr=False)

    # This replica's name in its stats (GetStats and the pushes to telemetry); empty = the
    # shared REPLICA_ID/POD_NAME, else "<hostname>-<pid>". How often they are pushed is
    # STATS_PUBLISH_INTERVAL_SECONDS (services/common/settings.py).
    gen_replica_id: str = Field(default="", alias="GEN_REPLICA_ID")
