"""The gateway's settings: everything environment-specific in the Envoy config, read once from
the environment (each field reads the env var in its alias) and checked before Envoy sees it."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_DESCRIPTOR_SET = REPO_ROOT / "gen" / "genmesh.pb"

# A host is an IPv4/IPv6 address or a DNS name; nothing that could mean something to YAML.
_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]+$")
# An origin: scheme://host[:port], nothing after (scheme and host in any case).
_ORIGIN_RE = re.compile(
    r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?$|^https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?$",
    re.IGNORECASE,
)
# A claim path such as "app_metadata.role": JSON names separated by dots.
_CLAIM_RE = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def _check_host(value: str) -> str:
    if not _HOST_RE.fullmatch(value):
        raise ValueError(f"not a host name or IP address: {value!r}")
    return value


def split_addr(addr: str) -> tuple[str, int]:
    """Split "host:port" or "[v6]:port" into its parts."""
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"expected host:port, got {addr!r}")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    number = int(port)
    if not 0 < number < 65536:
        raise ValueError(f"port out of range in {addr!r}")
    return _check_host(host), number


def split_addrs(value: str) -> list[tuple[str, int]]:
    """Split "host:port[,host:port...]" (one service's endpoints) into (host, port) pairs."""
    parts = [part.strip() for part in value.split(",")]
    if not all(parts):
        raise ValueError(f"expected host:port[,host:port...], got {value!r}")
    endpoints = [split_addr(part) for part in parts]
    if len(set(endpoints)) != len(endpoints):
        raise ValueError(f"an endpoint is listed twice in {value!r}")
    return endpoints


def _split_list(value: str) -> list[str]:
    return [item.strip() for item in value.split(",") if item.strip()]


_DEFAULT_PORTS = {"http": ":80", "https": ":443"}


def _normalise_origin(origin: str) -> str:
    """An origin as browsers serialise it in the Origin header, which Envoy matches exactly:
    scheme and host in lower case (both are case-insensitive, so "https://App.Example.com"
    names the same site) and no default port ("https://app.example.com:443" is sent as
    "https://app.example.com")."""
    origin = origin.lower()
    scheme = origin.split("://", 1)[0]
    return origin.removesuffix(_DEFAULT_PORTS[scheme])


class GatewaySettings(BaseSettings):
    """Everything environment-specific in the gateway. Each field reads the env var in its alias."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    # Public listener address. 127.0.0.1 locally; 0.0.0.0 in a container.
    listen_host: str = Field(default="127.0.0.1", alias="GATEWAY_LISTEN_HOST")
    # Public listener port (REST/JSON and HTTP/2).
    port: int = Field(default=8080, ge=1, le=65535, alias="GATEWAY_PORT")
    # Envoy's admin API port. The admin API can stop Envoy and dump its config (the JWT secret
    # included), so it always listens on 127.0.0.1 and nothing else.
    admin_port: int = Field(default=9901, ge=1, le=65535, alias="GATEWAY_ADMIN_PORT")
    # The operations listener (on GATEWAY_LISTEN_HOST): /stats/prometheus and /ready only,
    # proxied to the loopback admin API, for Prometheus and the kubelet.
    ops_port: int = Field(default=9902, ge=1, le=65535, alias="GATEWAY_OPS_PORT")
    # gRPC upstreams, host:port; a host may be an IP or a DNS name (STRICT_DNS clusters). Several
    # endpoints, comma-separated ("127.0.0.1:50061,127.0.0.1:50062"), are one cluster's hosts:
    # replicas on processes (the rollout drill). Kubernetes names one headless Service instead.
    generation_addr: str = Field(default="127.0.0.1:50051", alias="GENERATION_ADDR")
    quota_addr: str = Field(default="127.0.0.1:50052", alias="QUOTA_ADDR")
    telemetry_addr: str = Field(default="127.0.0.1:50053", alias="TELEMETRY_ADDR")
    # FileDescriptorSet for the JSON transcoder (from scripts/build_protos.py); made absolute.
    descriptor_set: Path = Field(default=DEFAULT_DESCRIPTOR_SET, alias="GATEWAY_DESCRIPTOR_SET")

    # -- identity: where user JWTs come from and what they must say ---------------------------
    # The Supabase project URL; the expected issuer is "<url>/auth/v1".
    supabase_url: str = Field(default="", alias="SUPABASE_URL")
    # HS256 secret that signs user JWTs (Supabase's legacy JWT secret).
    supabase_jwt_secret: SecretStr = Field(default=SecretStr(""), alias="SUPABASE_JWT_SECRET")
    # Asymmetric keys (RS256, ES256, ...) from a JWKS: a URL fetched and cached by Envoy (for
    # Supabase, "<url>/auth/v1/.well-known/jwks.json"), or a local file read at start.
    jwks_url: str = Field(default="", alias="GATEWAY_JWKS_URL")
    jwks_file: str = Field(default="", alias="GATEWAY_JWKS_FILE")
    # How long a fetched JWKS is used before Envoy fetches it again.
    jwks_cache_seconds: int = Field(
        default=600, ge=10, le=86_400, alias="GATEWAY_JWKS_CACHE_SECONDS"
    )
    # CA bundle that verifies an https JWKS URL.
    jwks_ca_file: str = Field(
        default="/etc/ssl/certs/ca-certificates.crt", alias="GATEWAY_JWKS_CA_FILE"
    )
    # Required `iss`; empty means "<SUPABASE_URL>/auth/v1".
    jwt_issuer: str = Field(default="", alias="GATEWAY_JWT_ISSUER")
    # Accepted `aud` values, comma-separated (Supabase user tokens carry "authenticated").
    jwt_audience: str = Field(default="authenticated", alias="GATEWAY_JWT_AUDIENCE")
    # Where a token names its role (dots for nested claims); "admin" there opens the admin API.
    admin_role_claim: str = Field(default="app_metadata.role", alias="GATEWAY_ADMIN_ROLE_CLAIM")

    # -- the edge --------------------------------------------------------------------------
    # Proxies in front of Envoy that append to X-Forwarded-For (a cloud load balancer: 1).
    # 0 means the TCP peer is the client and X-Forwarded-For is ignored.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=10, alias="GATEWAY_TRUSTED_PROXY_HOPS")
    # Largest body of the generate routes; larger gets 413. 8 MiB: a 5 MiB image in base64 JSON.
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, alias="GATEWAY_MAX_REQUEST_BYTES"
    )
    # Largest body of every other route; larger gets 413.
    max_body_bytes: int = Field(
        default=64 * 1024, ge=1024, le=64 * 1024 * 1024, alias="GATEWAY_MAX_BODY_BYTES"
    )
    # Web origins allowed to call the API from a browser (CORS), comma-separated, as
    # "https://app.example.com". Empty: same-origin only (no CORS headers are sent). Kept as
    # browsers send them (see _normalise_origin): lower case, without a default port.
    cors_origins: str = Field(default="", alias="GATEWAY_CORS_ORIGINS")
    # Send Strict-Transport-Security (two years, subdomains). Only behind TLS: production.
    hsts: bool = Field(default=False, alias="GATEWAY_HSTS")
    # Cap on open downstream connections across the listener.
    max_connections: int = Field(default=10000, ge=1, alias="GATEWAY_MAX_CONNECTIONS")
    # Envoy's heap budget for the overload manager: above 90 % it stops accepting new
    # requests and resets the streams holding the most buffered data (keep it under the
    # container's memory limit).
    max_heap_bytes: int = Field(
        default=384 * 1024 * 1024, ge=64 * 1024 * 1024, alias="GATEWAY_MAX_HEAP_BYTES"
    )
    # Rate limits and blocks from the quota service (Envoy's rate limit service API); false
    # turns the check off (the filter stays but asks nothing).
    rate_limit: bool = Field(default=True, alias="GATEWAY_RATE_LIMIT")
    # The services' `x-admin-token` credential. Envoy never sees it (the services compare it):
    # it is read here only so render can warn when failed admin attempts go unthrottled.
    admin_token: SecretStr = Field(default=SecretStr(""), alias="GENMESH_ADMIN_TOKEN")
    # How long Envoy waits for the rate-limit decision before letting the request pass.
    rate_limit_timeout_ms: int = Field(
        default=100, ge=1, le=10_000, alias="GATEWAY_RATE_LIMIT_TIMEOUT_MS"
    )
    # Refuse requests (503) when no decision comes in time, instead of letting them pass.
    rate_limit_fail_closed: bool = Field(default=False, alias="GATEWAY_RATE_LIMIT_FAIL_CLOSED")
    # -- deadlines ------------------------------------------------------------------------------
    # How long a Generate call (/api/generate) may take. Envoy sends it to the generation service
    # as the call's gRPC deadline (grpc-timeout, so context.time_remaining() starts here) and
    # answers 504 when it has passed. At most 300: the listener's stream_idle_timeout (300 s)
    # would end a unary call that long silent anyway.
    generate_timeout_seconds: int = Field(
        default=60, ge=1, le=300, alias="GATEWAY_GENERATE_TIMEOUT_SECONDS"
    )
    # The same for a whole StreamGenerate stream (/api/generate:stream). Unset or empty: the
    # value of GATEWAY_GENERATE_TIMEOUT_SECONDS.
    generate_stream_timeout_seconds: int | None = Field(
        default=None, ge=1, le=3600, alias="GATEWAY_GENERATE_STREAM_TIMEOUT_SECONDS"
    )

    # -- draining (`--exec` only) -------------------------------------------------------------
    # Envoy's --drain-time-s: after POST /drain_listeners?graceful (the Kubernetes preStop hook,
    # devstack's stop, the rollout drill) the listeners keep accepting this long while every
    # response closes its connection (--drain-strategy immediate: HTTP/1.1 "Connection: close",
    # HTTP/2 GOAWAY), so clients move elsewhere without a refused connection. It must outlast
    # whoever drains: the preStop waits up to 80 s (15 s + a 60 s stream + a margin). Envoy
    # exits at once on SIGTERM whatever this says: the drain happens before it.
    drain_time_seconds: int = Field(default=80, ge=1, le=3600, alias="GATEWAY_DRAIN_TIME_SECONDS")

    # Envoy worker threads (`--exec` only). 0 = Envoy's default, one per CPU of the machine,
    # which in a container means the node's CPUs, not the pod's limit: set it there.
    concurrency: int = Field(default=0, ge=0, le=256, alias="GATEWAY_CONCURRENCY")
    # Envoy's own log level (`--exec` only; access logs always go to stdout).
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = Field(
        default="info", alias="GATEWAY_LOG_LEVEL"
    )

    @field_validator("listen_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_host(value)

    @field_validator("generation_addr", "quota_addr", "telemetry_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        split_addrs(value)
        return value

    @field_validator("descriptor_set")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value if value.is_absolute() else (REPO_ROOT / value).resolve()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @field_validator("generate_stream_timeout_seconds", mode="before")
    @classmethod
    def _unset(cls, value: object) -> object:
        # `NAME=` in an env file means "not set", not "not a number".
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("supabase_url", "jwks_url")
    @classmethod
    def _url(cls, value: str) -> str:
        if value and (
            urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname
        ):
            raise ValueError(f"expected an http(s) URL, got {value!r}")
        return value.rstrip("/")

    @field_validator("cors_origins")
    @classmethod
    def _origins(cls, value: str) -> str:
        origins: list[str] = []
        for origin in _split_list(value):
            if not _ORIGIN_RE.fullmatch(origin):
                raise ValueError(f"expected origins like https://app.example.com, got {origin!r}")
            normalised = _normalise_origin(origin)
            if normalised not in origins:
                origins.append(normalised)
        return ", ".join(origins)

    @field_validator("admin_role_claim")
    @classmethod
    def _claim(cls, value: str) -> str:
        if not _CLAIM_RE.fullmatch(value):
            raise ValueError(f"expected a claim path like app_metadata.role, got {value!r}")
        return value

    @model_validator(mode="after")
    def _issuer_when_keys(self) -> GatewaySettings:
        # A key without an issuer would accept tokens minted for any other project or purpose
        # with the same key: refuse to start rather than accept any `iss`.
        if self.has_keys and not self.issuer:
            raise ValueError(
                "SUPABASE_URL or GATEWAY_JWT_ISSUER must be set when a JWT key is configured "
                "(SUPABASE_JWT_SECRET, GATEWAY_JWKS_URL or GATEWAY_JWKS_FILE)"
            )
        if not self.audiences and self.has_keys:
            raise ValueError("GATEWAY_JWT_AUDIENCE must name at least one audience")
        return self

    @property
    def has_keys(self) -> bool:
        return bool(self.supabase_jwt_secret.get_secret_value() or self.jwks_url or self.jwks_file)

    @property
    def admin_credential_configured(self) -> bool:
        """Whether an admin credential may open /api/admin/... here: a token whose role claim
        says admin (any configured key can sign one), or GENMESH_ADMIN_TOKEN."""
        return self.has_keys or bool(self.admin_token.get_secret_value())

    @property
    def issuer(self) -> str:
        if self.jwt_issuer:
            return self.jwt_issuer
        return f"{self.supabase_url}/auth/v1" if self.supabase_url else ""

    @property
    def stream_timeout_seconds(self) -> int:
        """The StreamGenerate timeout: its own setting, else the Generate one."""
        if self.generate_stream_timeout_seconds is None:
            return self.generate_timeout_seconds
        return self.generate_stream_timeout_seconds

    @property
    def audiences(self) -> list[str]:
        return _split_list(self.jwt_audience)

    @property
    def origins(self) -> list[str]:
        return _split_list(self.cors_origins)
