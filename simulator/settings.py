"""Simulator settings, read from `SIM_*` environment variables."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from simulator.faults import FaultLatencyMs, FaultRate, FaultStatus, RetryAfter


class SimSettings(BaseSettings):
    """Every field maps to `SIM_<NAME>`; an empty variable counts as unset."""

    model_config = SettingsConfigDict(env_prefix="SIM_", env_ignore_empty=True, frozen=True)

    host: str = "127.0.0.1"
    """SIM_HOST: interface to bind. Default 127.0.0.1 (a test tool has no business on 0.0.0.0)."""
    port: int = Field(default=8900, ge=0, le=65535)
    """SIM_PORT: TCP port; 0 picks a free one. Default 8900."""
    api_key: SecretStr | None = None
    """SIM_API_KEY: if set, /v1/* requires `Authorization: Bearer <key>`. Default unset: any key.
    `make run` sets it (the developer's, else random per run) and gives generation the same."""
    latency_ms: int = Field(default=0, ge=0)
    """SIM_LATENCY_MS: base delay before every chat completion answers. Default 0."""
    stream_chunk_delay_ms: int = Field(default=5, ge=0)
    """SIM_STREAM_CHUNK_DELAY_MS: delay before each streamed content chunk. Default 5."""
    access_log: bool = False
    """SIM_ACCESS_LOG: log every request (aiohttp's access log). Default false."""
    seed: int | None = None
    """SIM_SEED: seeds the fault-rate dice so runs are reproducible. Default unset (random)."""

    # Faults active from start-up; same meaning as the fields of POST /_sim/faults.
    fault_status: FaultStatus = 0
    """SIM_FAULT_STATUS: HTTP status (400-599) injected errors use; 0 = none. Default 0."""
    fault_rate: FaultRate = 1.0
    """SIM_FAULT_RATE: probability (0..1) that a request is affected by the faults. Default 1.0."""
    fault_latency_ms: FaultLatencyMs = 0
    """SIM_FAULT_LATENCY_MS: extra delay for affected requests. Default 0."""
    fault_retry_after: RetryAfter = 0
    """SIM_FAULT_RETRY_AFTER: seconds sent as `Retry-After` on injected errors; 0 = no header.
    Default 0."""
    fault_hang: bool = False
    """SIM_FAULT_HANG: affected requests hang until the faults change. Default false."""
