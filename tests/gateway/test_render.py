"""The gateway's Envoy configuration as rendered from settings, and validated by the real Envoy
binary."""

from __future__ import annotations

import base64
import os
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from pydantic import SecretStr, ValidationError

from services.gateway.render import (
    HSTS_VALUE,
    GatewaySettings,
    config_warnings,
    envoy_command,
    render,
    split_addr,
    split_addrs,
)
from tests.gateway.harness import (
    PUBLIC_ROUTES,
    REPO,
    SECRET,
    SECURITY_HEADERS,
    SETTING_ENV,
    SUPABASE_URL,
    TRANSCODED,
    clusters,
    cors,
    endpoint,
    envoy_validate,
    generate_transcoder,
    hcm,
    http_filter,
    jwks_key,
    load,
    ops_listener,
)


def test_defaults_render_to_the_documented_config(clean_env: pytest.MonkeyPatch) -> None:
    config = load(render(GatewaySettings()))
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9901,
    }
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "127.0.0.1", "port_value": 8080}
    manager = hcm(config)
    assert manager["use_remote_address"] is True
    assert manager["xff_num_trusted_hops"] == 0
    assert manager["generate_request_id"] is True
    assert [f["name"] for f in manager["http_filters"]] == [
        "envoy.filters.http.header_mutation",
        "envoy.filters.http.cors",
        "genmesh.body_first",
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.ratelimit",
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    assert manager["max_request_headers_kb"] == 32
    assert manager["common_http_protocol_options"]["max_headers_count"] == 100
    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    # Every route but generate takes a small body; generate's own limit is on its marker route.
    assert transcoder["max_request_body_size"] == 64 * 1024
    assert generate_transcoder(config)["max_request_body_size"] == 8 * 1024 * 1024
    assert transcoder["proto_descriptor"] == str(REPO / "gen" / "genmesh.pb")
    assert transcoder["services"] == TRANSCODED
    assert transcoder["convert_grpc_status"] is True
    assert transcoder["auto_mapping"] is False
    assert transcoder["match_incoming_request_route"] is False
    assert transcoder["print_options"]["always_print_primitive_fields"] is True
    assert transcoder["print_options"]["preserve_proto_field_names"] is True
    assert transcoder["print_options"]["stream_sse_style_delimited"] is True
    assert transcoder["request_validation_options"] == {
        "reject_unknown_method": True,
        "reject_unknown_query_parameters": True,
    }
    jwt_config = http_filter(config, "envoy.filters.http.jwt_authn")
    # No key configured: one provider with a random key, so every token is refused.
    assert list(jwt_config["providers"]) == ["supabase_hs256"]
    provider = jwt_config["providers"]["supabase_hs256"]
    assert provider["audiences"] == ["authenticated"]
    assert provider["require_expiration"] is True
    assert provider["forward"] is False
    assert provider["claim_to_headers"] == [
        {"header_name": "x-genmesh-user-id", "claim_name": "sub"},
        {"header_name": "x-genmesh-user-email", "claim_name": "email"},
        {"header_name": "x-genmesh-user-role", "claim_name": "app_metadata.role"},
    ]
    assert jwt_config["rules"] == [
        {
            "match": {"prefix": "/"},
            "requires": {
                "requires_any": {
                    "requirements": [{"provider_name": "supabase_hs256"}, {"allow_missing": {}}]
                }
            },
        }
    ]
    # The admin API is on loopback whatever the settings; the ops listener serves the rest.
    assert ops_listener(config)["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 9902,
    }
    # No CORS origin: no origin matches.
    assert cors(config)["allow_origin_string_match"] == []
    heap = config["overload_manager"]["resource_monitors"][1]["typed_config"]
    assert heap["max_heap_size_bytes"] == 384 * 1024 * 1024
    actions = {a["name"] for a in config["overload_manager"]["actions"]}
    assert {
        "envoy.overload_actions.stop_accepting_requests",
        "envoy.overload_actions.reset_high_memory_stream",
    } <= actions
    # HSTS is off: its value is empty, and Envoy adds no header with an empty value.
    mutations = http_filter(config, "envoy.filters.http.header_mutation")["mutations"]
    values = {
        m["append"]["header"]["key"]: m["append"]["header"]["value"]
        for m in mutations["response_mutations"]
        if "append" in m
    }
    assert values["strict-transport-security"] == ""
    for name, value in SECURITY_HEADERS.items():
        assert values[name] == value
    # Rate limits: asked of the quota service before the body is read, failing open in 100 ms.
    ratelimit = http_filter(config, "envoy.filters.http.ratelimit")
    assert ratelimit["domain"] == "genmesh"
    assert ratelimit["timeout"] == "0.1s"
    assert ratelimit["failure_mode_deny"] is False
    assert ratelimit["filter_enabled"]["default_value"]["numerator"] == 100
    assert ratelimit["enable_x_ratelimit_headers"] == "DRAFT_VERSION_03"
    assert ratelimit["disable_x_envoy_ratelimited_header"] is True
    service = ratelimit["rate_limit_service"]
    assert service["grpc_service"]["envoy_grpc"]["cluster_name"] == "quota"
    assert service["transport_api_version"] == "V3"
    assert [[next(iter(a)) for a in limit["actions"]] for limit in ratelimit["rate_limits"]] == [
        ["request_headers", "remote_address"],
        ["request_headers", "request_headers"],
        [
            "header_value_match",
            "request_headers",
            "remote_address",
            "request_headers",
            "request_headers",
            "request_headers",
        ],
    ]
    admin_auth = ratelimit["rate_limits"][2]["actions"]
    assert admin_auth[0]["header_value_match"]["headers"] == [
        {"name": ":path", "string_match": {"prefix": "/api/admin/"}}
    ]
    assert [
        a["request_headers"]["descriptor_key"] for a in admin_auth if "request_headers" in a
    ] == [
        "path",
        "admin_token",
        "user",
        "role",
    ]
    assert ratelimit["rate_limits"][1]["actions"][1]["request_headers"] == {
        "header_name": "x-genmesh-user-id",
        "descriptor_key": "user",
    }
    upstreams = clusters(config)
    assert endpoint(upstreams["generation"]) == ("127.0.0.1", 50051)
    assert endpoint(upstreams["quota"]) == ("127.0.0.1", 50052)
    assert endpoint(upstreams["telemetry"]) == ("127.0.0.1", 50053)


def test_environment_overrides_every_setting(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        "GATEWAY_LISTEN_HOST": "0.0.0.0",
        "GATEWAY_PORT": "18080",
        "GATEWAY_ADMIN_PORT": "19901",
        "GATEWAY_OPS_PORT": "19902",
        "GENERATION_ADDR": "generation.genmesh.svc.cluster.local:7001",
        "QUOTA_ADDR": "[::1]:7002",
        "TELEMETRY_ADDR": "10.0.0.3:7003",
        "GATEWAY_DESCRIPTOR_SET": "/etc/genmesh/genmesh.pb",
        "SUPABASE_JWT_SECRET": SECRET,
        "GATEWAY_JWT_ISSUER": "https://example.supabase.co/auth/v1",
        "GATEWAY_JWT_AUDIENCE": "authenticated, other",
        "GATEWAY_JWKS_FILE": "/etc/genmesh/jwks.json",
        "GATEWAY_ADMIN_ROLE_CLAIM": "claims.genmesh_role",
        "GATEWAY_TRUSTED_PROXY_HOPS": "2",
        "GATEWAY_MAX_REQUEST_BYTES": "1048576",
        "GATEWAY_MAX_BODY_BYTES": "4096",
        "GATEWAY_MAX_HEAP_BYTES": str(256 * 1024 * 1024),
        "GATEWAY_CORS_ORIGINS": "https://app.example.com, http://localhost:5173",
        "GATEWAY_HSTS": "true",
        "GATEWAY_MAX_CONNECTIONS": "500",
        "GATEWAY_RATE_LIMIT": "false",
        "GATEWAY_RATE_LIMIT_TIMEOUT_MS": "250",
        "GATEWAY_RATE_LIMIT_FAIL_CLOSED": "true",
        "GATEWAY_LOG_LEVEL": "DEBUG",
    }.items():
        clean_env.setenv(name, value)
    settings = GatewaySettings()
    config = load(render(settings))
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 18080}
    assert config["admin"]["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": 19901,
    }
    assert ops_listener(config)["address"]["socket_address"] == {
        "address": "0.0.0.0",
        "port_value": 19902,
    }
    upstreams = clusters(config)
    assert endpoint(upstreams["generation"]) == ("generation.genmesh.svc.cluster.local", 7001)
    assert endpoint(upstreams["quota"]) == ("::1", 7002)
    assert endpoint(upstreams["telemetry"]) == ("10.0.0.3", 7003)
    assert all(
        c["type"] == "STRICT_DNS"
        for name, c in upstreams.items()
        if name not in ("not_transcoded", "envoy_admin")
    )
    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["proto_descriptor"] == "/etc/genmesh/genmesh.pb"
    assert hcm(config)["xff_num_trusted_hops"] == 2
    assert transcoder["max_request_body_size"] == 4096
    assert generate_transcoder(config)["max_request_body_size"] == 1048576
    # The marker routes for a declared length that fits follow both limits.
    vhost = hcm(config)["route_config"]["virtual_hosts"][0]
    declared = [
        (r["match"]["prefix"], h["range_match"], r["request_body_buffer_limit"])
        for r in vhost["routes"]
        for h in r["match"].get("headers", [])
        if h["name"] == "content-length"
    ]
    assert declared == [
        ("/api/generate", {"start": 0, "end": 1048577}, 1048576),
        ("/api/", {"start": 0, "end": 4097}, 4096),
    ]
    providers = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]
    # Both key sources at once: a token passes if either verifies it.
    assert set(providers) == {"supabase_hs256", "jwks"}
    assert providers["jwks"]["local_jwks"] == {"filename": "/etc/genmesh/jwks.json"}
    for provider in providers.values():
        assert provider["issuer"] == "https://example.supabase.co/auth/v1"
        assert provider["audiences"] == ["authenticated", "other"]
        assert provider["claim_to_headers"][2] == {
            "header_name": "x-genmesh-user-role",
            "claim_name": "claims.genmesh_role",
        }
    assert cors(config)["allow_origin_string_match"] == [
        {"exact": "https://app.example.com"},
        {"exact": "http://localhost:5173"},
    ]
    assert cors(config)["allow_credentials"] is True
    heap = config["overload_manager"]["resource_monitors"][1]["typed_config"]
    assert heap["max_heap_size_bytes"] == 256 * 1024 * 1024
    # The secret's UTF-8 bytes, base64url without padding.
    key = jwks_key(config)
    assert "=" not in key
    assert base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)) == SECRET.encode()
    assert HSTS_VALUE in render(settings)
    overload = config["overload_manager"]["resource_monitors"][0]["typed_config"]
    assert overload["max_active_downstream_connections"] == 500
    ratelimit = http_filter(config, "envoy.filters.http.ratelimit")
    assert ratelimit["filter_enabled"]["default_value"]["numerator"] == 0
    assert ratelimit["timeout"] == "0.25s"
    assert ratelimit["failure_mode_deny"] is True
    assert envoy_command(settings, Path("/x.yaml"))[1:5] == [
        "--config-path",
        "/x.yaml",
        "--log-level",
        "debug",
    ]


def test_worker_threads_follow_the_setting(clean_env: pytest.MonkeyPatch) -> None:
    assert "--concurrency" not in envoy_command(GatewaySettings(), Path("/x.yaml"))
    clean_env.setenv("GATEWAY_CONCURRENCY", "2")
    command = envoy_command(GatewaySettings(), Path("/x.yaml"))
    assert command[command.index("--concurrency") + 1] == "2"


def test_without_a_secret_the_key_is_random_and_unknown(clean_env: pytest.MonkeyPatch) -> None:
    first = jwks_key(load(render(GatewaySettings())))
    second = jwks_key(load(render(GatewaySettings())))
    assert first != second
    assert len(base64.urlsafe_b64decode(first + "=" * (-len(first) % 4))) == 32


def test_strings_cannot_break_out_of_the_yaml(clean_env: pytest.MonkeyPatch) -> None:
    tricky = 'a"b\\c\n  injected: true'
    settings = GatewaySettings(SUPABASE_JWT_SECRET=SecretStr(tricky), GATEWAY_JWT_ISSUER=tricky)
    config = load(render(settings))
    provider = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["supabase_hs256"]
    assert provider["issuer"] == tricky
    key = jwks_key(config)
    assert base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)) == tricky.encode()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GENERATION_ADDR", "no-port"),
        ("QUOTA_ADDR", "host:99999"),
        ("TELEMETRY_ADDR", "bad host:1"),
        ("GATEWAY_LISTEN_HOST", "0.0.0.0\n"),
        ("GATEWAY_PORT", "0"),
        ("GATEWAY_TRUSTED_PROXY_HOPS", "-1"),
        ("GATEWAY_LOG_LEVEL", "loud"),
        ("GATEWAY_CORS_ORIGINS", "https://app.example.com/path"),
        ("GATEWAY_CORS_ORIGINS", "*"),
        ("GATEWAY_ADMIN_ROLE_CLAIM", "app_metadata..role"),
        ("GATEWAY_JWKS_URL", "file:///etc/passwd"),
        ("SUPABASE_URL", "not a url"),
        ("GATEWAY_MAX_BODY_BYTES", "10"),
        ("GENERATION_ADDR", "127.0.0.1:1,,127.0.0.1:2"),
        ("QUOTA_ADDR", "127.0.0.1:1,127.0.0.1:1"),
        ("TELEMETRY_ADDR", "127.0.0.1:1,127.0.0.1"),
        ("GATEWAY_DRAIN_TIME_SECONDS", "0"),
    ],
)
def test_invalid_settings_are_refused(clean_env: pytest.MonkeyPatch, name: str, value: str) -> None:
    clean_env.setenv(name, value)
    with pytest.raises(ValidationError):
        GatewaySettings()


def test_split_addr() -> None:
    assert split_addr("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_addr("[fd00::2]:80") == ("fd00::2", 80)
    assert split_addr("quota:50052") == ("quota", 50052)
    assert split_addrs("quota:50052") == [("quota", 50052)]
    assert split_addrs("127.0.0.1:1, [::1]:2") == [("127.0.0.1", 1), ("::1", 2)]


def test_several_endpoints_are_hosts_of_one_cluster(clean_env: pytest.MonkeyPatch) -> None:
    """Replicas on processes (the rollout drill): each host:port of a comma-separated *_ADDR is
    an endpoint of the service's cluster. One name stays one endpoint (Kubernetes: a headless
    Service, which STRICT_DNS resolves to every pod)."""
    clean_env.setenv("GENERATION_ADDR", "127.0.0.1:50061,127.0.0.1:50062,127.0.0.1:50063")
    clean_env.setenv("QUOTA_ADDR", "quota.genmesh.svc.cluster.local:50052")
    upstreams = clusters(load(render(GatewaySettings())))
    (generation,) = upstreams["generation"]["load_assignment"]["endpoints"]
    assert [lb["endpoint"]["address"]["socket_address"] for lb in generation["lb_endpoints"]] == [
        {"address": "127.0.0.1", "port_value": port} for port in (50061, 50062, 50063)
    ]
    (quota,) = upstreams["quota"]["load_assignment"]["endpoints"]
    assert len(quota["lb_endpoints"]) == 1
    assert endpoint(upstreams["quota"]) == ("quota.genmesh.svc.cluster.local", 50052)
    assert upstreams["generation"]["type"] == upstreams["quota"]["type"] == "STRICT_DNS"


def test_envoy_drains_as_the_setting_says(clean_env: pytest.MonkeyPatch) -> None:
    """/drain_listeners?graceful (the preStop hook) closes every connection after its next
    response at once, and the listeners accept for GATEWAY_DRAIN_TIME_SECONDS (80 s)."""

    def option(command: list[str], name: str) -> str:
        return command[command.index(name) + 1]

    command = envoy_command(GatewaySettings(), Path("/x.yaml"))
    assert option(command, "--drain-strategy") == "immediate"
    assert option(command, "--drain-time-s") == "80"
    clean_env.setenv("GATEWAY_DRAIN_TIME_SECONDS", "30")
    command = envoy_command(GatewaySettings(), Path("/x.yaml"))
    assert option(command, "--drain-time-s") == "30"


def test_relative_descriptor_path_is_made_absolute(clean_env: pytest.MonkeyPatch) -> None:
    settings = GatewaySettings(GATEWAY_DESCRIPTOR_SET=Path("gen/genmesh.pb"))
    assert settings.descriptor_set == REPO / "gen" / "genmesh.pb"


def test_routes_are_exactly_the_annotated_methods(descriptor_set: Path) -> None:
    """Every method with a google.api.http rule has a route, and nothing else has one: adding an
    RPC to a proto without a route here (or routing an internal one) fails this test."""
    fds = descriptor_pb2.FileDescriptorSet.FromString(descriptor_set.read_bytes())
    annotated = set()
    for file in fds.file:
        for service in file.service:
            if f"{file.package}.{service.name}" not in TRANSCODED:
                continue
            for rpc in service.method:
                if rpc.options.HasExtension(annotations_pb2.http):
                    annotated.add(f"/{file.package}.{service.name}/{rpc.name}")
    config = load(
        render(GatewaySettings(SUPABASE_JWT_SECRET=SecretStr(SECRET), SUPABASE_URL=SUPABASE_URL))
    )
    vhost = hcm(config)["route_config"]["virtual_hosts"][0]
    routed = {r["match"]["path"]: r for r in vhost["routes"] if "path" in r["match"]}
    assert set(routed) == annotated == set(PUBLIC_ROUTES)
    for path, (cluster, timeout) in PUBLIC_ROUTES.items():
        route = routed[path]
        assert route["route"]["cluster"] == cluster
        assert route["route"]["timeout"] == timeout
        # Only requests the transcoder produced: raw gRPC requests match nothing.
        assert route["match"]["headers"] == [
            {"name": "x-envoy-original-path", "present_match": True}
        ]
        retry_on = set(route["route"]["retry_policy"]["retry_on"].split(","))
        assert retry_on <= {"connect-failure", "refused-stream", "reset", "unavailable"}
    # Writes that are not idempotent retry only when the service never saw the request.
    for method in ("Generate", "StreamGenerate"):
        policy = routed[f"/genmesh.generation.v1.GenerationService/{method}"]["route"]
        assert policy["retry_policy"]["retry_on"] == "connect-failure,refused-stream"
    feedback = routed["/genmesh.telemetry.v1.TelemetryService/SubmitFeedback"]["route"]
    assert feedback["retry_policy"]["retry_on"] == "connect-failure,refused-stream"
    # The other routes are the /api/ markers, which lead to a cluster with no endpoints: two
    # for each body limit, the first for requests whose content-length fits the limit.
    markers = [r for r in vhost["routes"] if "path" not in r["match"]]
    assert [r["match"]["prefix"] for r in markers] == [
        "/api/generate",
        "/api/generate",
        "/api/",
        "/api/",
    ]
    assert {r["route"]["cluster"] for r in markers} == {"not_transcoded"}
    limits = [8 * 1024 * 1024, 8 * 1024 * 1024, 64 * 1024, 64 * 1024]
    not_grpc = {
        "name": "content-type",
        "string_match": {"prefix": "application/grpc"},
        "invert_match": True,
        "treat_missing_header_as_empty": True,
    }
    for marker, limit in zip(markers[::2], limits[::2], strict=True):
        assert marker["match"]["headers"] == [
            not_grpc,
            {"name": "content-length", "range_match": {"start": 0, "end": limit + 1}},
        ]
    for marker in markers[1::2]:
        assert marker["match"]["headers"] == [not_grpc]
    # The stream never holds more than the limit while a filter waits.
    assert [r["request_body_buffer_limit"] for r in markers] == limits
    # Each marker route sets the body limit of the paths it covers, in both checks.
    buffer = "envoy.filters.http.buffer"
    transcoder = "envoy.filters.http.grpc_json_transcoder"
    assert [
        r["typed_per_filter_config"][buffer]["buffer"]["max_request_bytes"] for r in markers
    ] == limits
    # A body of unknown length, or declared over the limit, is read before anything can pause
    # the request (genmesh.body_first); one declared to fit is read after the rate limit.
    body_first = [r["typed_per_filter_config"]["genmesh.body_first"] for r in markers]
    assert [b.get("disabled", False) for b in body_first] == [True, False, True, False]
    assert [b["buffer"]["max_request_bytes"] for b in body_first[1::2]] == limits[1::2]
    for marker in markers[:2]:
        assert (
            marker["typed_per_filter_config"][transcoder]["max_request_body_size"]
            == 8 * 1024 * 1024
        )
    assert http_filter(config, transcoder)["max_request_body_size"] == 64 * 1024
    nowhere = clusters(config)["not_transcoded"]
    assert nowhere["load_assignment"] == {"cluster_name": "not_transcoded"}


def test_clusters_speak_http2_and_health_check_their_service(clean_env: pytest.MonkeyPatch) -> None:
    services = {
        "generation": "genmesh.generation.v1.GenerationService",
        "quota": "genmesh.quota.v1.QuotaService",
        "telemetry": "genmesh.telemetry.v1.TelemetryService",
    }
    for name, cluster in clusters(load(render(GatewaySettings()))).items():
        if name in ("not_transcoded", "envoy_admin"):
            continue
        options = cluster["typed_extension_protocol_options"]
        http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in http["explicit_http_config"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"] == {"service_name": services[name]}
        assert check["interval"] == "1s"
        assert check["unhealthy_threshold"] == 2
        # A host that refuses a connection leaves rotation until a health check passes again;
        # the services' own gRPC errors never eject one.
        outlier = cluster["outlier_detection"]
        assert outlier["split_external_local_origin_errors"] is True
        assert outlier["consecutive_local_origin_failure"] == 1
        assert outlier["enforcing_consecutive_local_origin_failure"] == 100
        assert outlier["successful_active_health_check_uneject_host"] is True
        for enforcing in (
            "enforcing_consecutive_5xx",
            "enforcing_consecutive_gateway_failure",
            "enforcing_success_rate",
            "enforcing_local_origin_success_rate",
            "enforcing_failure_percentage",
            "enforcing_failure_percentage_local_origin",
        ):
            assert outlier[enforcing] == 0, enforcing
        thresholds = cluster["circuit_breakers"]["thresholds"][0]
        assert thresholds["max_requests"] > 0
        assert thresholds["max_pending_requests"] > 0


@pytest.mark.parametrize("variant", ["defaults", "overrides", "no-secret", "jwks-url", "replicas"])
def test_envoy_accepts_the_rendered_config(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, descriptor_set: Path, variant: str
) -> None:
    clean_env.setenv("GATEWAY_DESCRIPTOR_SET", str(descriptor_set))
    if variant != "no-secret":
        clean_env.setenv("SUPABASE_JWT_SECRET", SECRET)
        clean_env.setenv("SUPABASE_URL", SUPABASE_URL)
    if variant == "jwks-url":
        clean_env.setenv("GATEWAY_JWKS_URL", f"{SUPABASE_URL}/auth/v1/.well-known/jwks.json")
        clean_env.setenv("GATEWAY_CORS_ORIGINS", "https://app.example.com")
    if variant == "overrides":
        clean_env.setenv("GATEWAY_HSTS", "true")
        clean_env.setenv("GATEWAY_TRUSTED_PROXY_HOPS", "1")
        clean_env.setenv("GATEWAY_JWT_AUDIENCE", "authenticated")
        clean_env.setenv("GATEWAY_JWT_ISSUER", "https://example.supabase.co/auth/v1")
        clean_env.setenv("GENERATION_ADDR", "generation:50051")
        clean_env.setenv("GATEWAY_LISTEN_HOST", "0.0.0.0")
    if variant == "replicas":
        clean_env.setenv("GENERATION_ADDR", "127.0.0.1:50061,127.0.0.1:50062,127.0.0.1:50063")
        clean_env.setenv("QUOTA_ADDR", "127.0.0.1:50071,[::1]:50072")
    path = tmp_path / "envoy.yaml"
    path.write_text(render(GatewaySettings()))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_cli_writes_an_owner_only_file(tmp_path: Path, descriptor_set: Path) -> None:
    out = tmp_path / "sub" / "envoy.yaml"
    env = {k: v for k, v in os.environ.items() if k not in SETTING_ENV}
    env |= {"SUPABASE_JWT_SECRET": SECRET, "SUPABASE_URL": SUPABASE_URL, "GATEWAY_PORT": "18081"}
    subprocess.run(
        [sys.executable, "-m", "services.gateway.render", "--out", str(out)],
        cwd=REPO,
        env=env,
        check=True,
        timeout=60,
    )
    # It holds the JWT secret.
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    config = load(out.read_text())
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"]["port_value"] == 18081


# -- CORS ----------------------------------------------------------------------------------------


def response_header_values(config: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """The header_mutation filter's response headers: name -> (value, append action)."""
    mutations = http_filter(config, "envoy.filters.http.header_mutation")["mutations"]
    return {
        m["append"]["header"]["key"]: (m["append"]["header"]["value"], m["append"]["append_action"])
        for m in mutations["response_mutations"]
        if "append" in m
    }


def test_cors_lets_browsers_send_cache_control(clean_env: pytest.MonkeyPatch) -> None:
    """generate honours Cache-Control: no-cache / no-store, so a page must be allowed to send it."""
    clean_env.setenv("GATEWAY_CORS_ORIGINS", "https://app.example.com")
    allowed = [h.strip() for h in cors(load(render(GatewaySettings())))["allow_headers"].split(",")]
    assert allowed == [
        "authorization",
        "cache-control",
        "content-type",
        "idempotency-key",
        "x-request-id",
    ]


@pytest.mark.parametrize(
    ("configured", "matched"),
    [
        ("https://App.Example.COM", ["https://app.example.com"]),
        ("HTTP://LocalHost:5173", ["http://localhost:5173"]),
        # Browsers leave the default port out of Origin.
        ("https://app.example.com:443", ["https://app.example.com"]),
        ("http://app.example.com:80", ["http://app.example.com"]),
        ("https://app.example.com:80", ["https://app.example.com:80"]),
        ("http://[FD00::1]:8080", ["http://[fd00::1]:8080"]),
        # One entry per origin however it was spelt.
        (
            "https://a.example, HTTPS://A.EXAMPLE:443, https://b.example",
            ["https://a.example", "https://b.example"],
        ),
    ],
)
def test_configured_origins_are_matched_as_browsers_send_them(
    clean_env: pytest.MonkeyPatch, configured: str, matched: list[str]
) -> None:
    clean_env.setenv("GATEWAY_CORS_ORIGINS", configured)
    settings = GatewaySettings()
    assert settings.origins == matched
    assert cors(load(render(settings)))["allow_origin_string_match"] == [
        {"exact": origin} for origin in matched
    ]


def test_vary_origin_only_when_origins_are_listed(clean_env: pytest.MonkeyPatch) -> None:
    # No origins: responses never depend on Origin, and an empty value is not added.
    assert response_header_values(load(render(GatewaySettings())))["vary"] == (
        "",
        "APPEND_IF_EXISTS_OR_ADD",
    )
    clean_env.setenv("GATEWAY_CORS_ORIGINS", "https://app.example.com")
    # Appended, so a Vary a service sent is kept.
    assert response_header_values(load(render(GatewaySettings())))["vary"] == (
        "Origin",
        "APPEND_IF_EXISTS_OR_ADD",
    )


# -- warnings ------------------------------------------------------------------------------------

ADMIN_WARNING = "GATEWAY_RATE_LIMIT=false while an admin credential is configured"


@pytest.mark.parametrize(
    ("env", "warned"),
    [
        ({}, False),  # the check is on: failed admin attempts are throttled
        ({"SUPABASE_JWT_SECRET": SECRET, "SUPABASE_URL": SUPABASE_URL}, False),
        # The check is off and a key can sign a token with the admin role claim.
        (
            {
                "GATEWAY_RATE_LIMIT": "false",
                "SUPABASE_JWT_SECRET": SECRET,
                "SUPABASE_URL": SUPABASE_URL,
            },
            True,
        ),
        (
            {
                "GATEWAY_RATE_LIMIT": "false",
                "GATEWAY_JWKS_FILE": "/etc/genmesh/jwks.json",
                "SUPABASE_URL": SUPABASE_URL,
            },
            True,
        ),
        ({"GATEWAY_RATE_LIMIT": "false", "GENMESH_ADMIN_TOKEN": "t0ken"}, True),
        # No key and no admin token: nothing can open the admin routes.
        ({"GATEWAY_RATE_LIMIT": "false"}, False),
    ],
)
def test_a_warning_when_admin_guessing_would_go_unthrottled(
    clean_env: pytest.MonkeyPatch, env: dict[str, str], warned: bool
) -> None:
    for name, value in env.items():
        clean_env.setenv(name, value)
    warnings = config_warnings(GatewaySettings())
    assert [ADMIN_WARNING in w for w in warnings] == ([True] if warned else [])


def test_the_cli_prints_the_warning_and_still_renders(tmp_path: Path, descriptor_set: Path) -> None:
    out = tmp_path / "envoy.yaml"
    env = {k: v for k, v in os.environ.items() if k not in SETTING_ENV}
    env |= {
        "SUPABASE_JWT_SECRET": SECRET,
        "SUPABASE_URL": SUPABASE_URL,
        "GATEWAY_RATE_LIMIT": "false",
    }
    done = subprocess.run(
        [sys.executable, "-m", "services.gateway.render", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    (line,) = done.stderr.splitlines()
    assert line.startswith(f"gateway: warning: {ADMIN_WARNING}")
    assert "guessed at full speed" in line
    assert SECRET not in done.stderr
    assert out.exists()
    # On by default: no warning.
    env.pop("GATEWAY_RATE_LIMIT")
    quiet = subprocess.run(
        [sys.executable, "-m", "services.gateway.render", "--out", str(out)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert quiet.stderr == ""
