"""The gateway's Envoy configuration: rendering, validation by the real Envoy binary, and the
behaviour of a real Envoy in front of a small in-test gRPC service that echoes what it receives.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import pytest
import yaml  # type: ignore[import-untyped]
from google.api import annotations_pb2
from google.protobuf import descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_status import rpc_status
from pydantic import SecretStr, ValidationError

from genmesh.generation.v1 import generation_pb2, generation_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.gateway.render import (
    DEFAULT_DESCRIPTOR_SET,
    HSTS_VALUE,
    GatewaySettings,
    envoy_binary,
    envoy_command,
    render,
    split_addr,
)

REPO = Path(__file__).resolve().parents[2]
SECRET = "test-jwt-secret-0123456789-abcdefghijklmnop"
SETTING_ENV = [str(f.alias) for f in GatewaySettings.model_fields.values()]
TRANSCODED = [
    "genmesh.generation.v1.GenerationService",
    "genmesh.generation.v1.GenerationAdminService",
    "genmesh.quota.v1.QuotaService",
    "genmesh.telemetry.v1.TelemetryService",
]
# The REST surface from the design: gRPC method -> (cluster, timeout).
PUBLIC_ROUTES = {
    "/genmesh.generation.v1.GenerationService/Generate": ("generation", "60s"),
    "/genmesh.generation.v1.GenerationService/StreamGenerate": ("generation", "60s"),
    "/genmesh.generation.v1.GenerationAdminService/GetCacheStats": ("generation", "30s"),
    "/genmesh.generation.v1.GenerationAdminService/InvalidateCache": ("generation", "30s"),
    "/genmesh.generation.v1.GenerationAdminService/GetPerformanceStats": ("generation", "30s"),
    "/genmesh.quota.v1.QuotaService/GetQuota": ("quota", "30s"),
    "/genmesh.quota.v1.QuotaService/GetProfile": ("quota", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/SubmitFeedback": ("telemetry", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/JoinWishlist": ("telemetry", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/TrackEvents": ("telemetry", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/GetHealth": ("telemetry", "5s"),
}
SECURITY_HEADERS = {
    "content-security-policy": "default-src 'none'; frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "referrer-policy": "no-referrer",
    "x-xss-protection": "0",
    "cache-control": "no-store",
}
GRPC_PLUMBING = ("grpc-status", "grpc-message", "grpc-accept-encoding")


# -- helpers ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def descriptor_set() -> Path:
    """The transcoder's descriptor set, built if this checkout has none yet."""
    if not DEFAULT_DESCRIPTOR_SET.exists():
        env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
        subprocess.run(
            [sys.executable, str(REPO / "scripts" / "build_protos.py")],
            cwd=REPO,
            env=env,
            check=True,
            timeout=300,
        )
    return DEFAULT_DESCRIPTOR_SET


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """No gateway setting leaks in from the environment running the tests."""
    for name in SETTING_ENV:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def load(config: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(config)
    return loaded


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    listener = config["static_resources"]["listeners"][0]
    typed: dict[str, Any] = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return typed


def http_filter(config: dict[str, Any], name: str) -> dict[str, Any]:
    for f in hcm(config)["http_filters"]:
        if f["name"] == name:
            typed: dict[str, Any] = f["typed_config"]
            return typed
    raise AssertionError(f"no {name} filter")


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def endpoint(cluster: dict[str, Any]) -> tuple[str, int]:
    lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    sock = lb["endpoint"]["address"]["socket_address"]
    return sock["address"], sock["port_value"]


def jwks_key(config: dict[str, Any]) -> str:
    provider = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["supabase"]
    keys = json.loads(provider["local_jwks"]["inline_string"])["keys"]
    assert len(keys) == 1
    assert keys[0]["kty"] == "oct"
    assert keys[0]["alg"] == "HS256"
    k: str = keys[0]["k"]
    return k


def envoy_validate(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def token(claims: dict[str, Any], secret: str = SECRET) -> str:
    now = int(time.time())
    return jwt.encode({"iat": now, "exp": now + 600, **claims}, secret, algorithm="HS256")


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def hs256(claims: dict[str, Any], secret: str) -> str:
    """An HS256 token by hand: PyJWT refuses an empty key, which is one case worth trying."""
    signing_input = f"{b64url({'alg': 'HS256', 'typ': 'JWT'})}.{b64url(claims)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


# -- rendering -------------------------------------------------------------------------------


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
        "envoy.filters.http.jwt_authn",
        "envoy.filters.http.buffer",
        "envoy.filters.http.grpc_json_transcoder",
        "envoy.filters.http.router",
    ]
    assert http_filter(config, "envoy.filters.http.buffer")["max_request_bytes"] == 8 * 1024 * 1024
    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
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
    provider = jwt_config["providers"]["supabase"]
    assert provider["issuer"] == ""
    assert provider["audiences"] == []
    assert provider["claim_to_headers"] == [
        {"header_name": "x-genmesh-user-id", "claim_name": "sub"},
        {"header_name": "x-genmesh-user-email", "claim_name": "email"},
    ]
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
    upstreams = clusters(config)
    assert endpoint(upstreams["generation"]) == ("127.0.0.1", 50051)
    assert endpoint(upstreams["quota"]) == ("127.0.0.1", 50052)
    assert endpoint(upstreams["telemetry"]) == ("127.0.0.1", 50053)


def test_environment_overrides_every_setting(clean_env: pytest.MonkeyPatch) -> None:
    for name, value in {
        "GATEWAY_LISTEN_HOST": "0.0.0.0",
        "GATEWAY_PORT": "18080",
        "GATEWAY_ADMIN_HOST": "127.0.0.2",
        "GATEWAY_ADMIN_PORT": "19901",
        "GENERATION_ADDR": "generation.genmesh.svc.cluster.local:7001",
        "QUOTA_ADDR": "[::1]:7002",
        "TELEMETRY_ADDR": "10.0.0.3:7003",
        "GATEWAY_DESCRIPTOR_SET": "/etc/genmesh/genmesh.pb",
        "SUPABASE_JWT_SECRET": SECRET,
        "GATEWAY_JWT_ISSUER": "https://example.supabase.co/auth/v1",
        "GATEWAY_JWT_AUDIENCE": "authenticated, other",
        "GATEWAY_TRUSTED_PROXY_HOPS": "2",
        "GATEWAY_MAX_REQUEST_BYTES": "1048576",
        "GATEWAY_HSTS": "true",
        "GATEWAY_MAX_CONNECTIONS": "500",
        "GATEWAY_LOG_LEVEL": "DEBUG",
    }.items():
        clean_env.setenv(name, value)
    settings = GatewaySettings()
    config = load(render(settings))
    listener = config["static_resources"]["listeners"][0]
    assert listener["address"]["socket_address"] == {"address": "0.0.0.0", "port_value": 18080}
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.2"
    assert config["admin"]["address"]["socket_address"]["port_value"] == 19901
    upstreams = clusters(config)
    assert endpoint(upstreams["generation"]) == ("generation.genmesh.svc.cluster.local", 7001)
    assert endpoint(upstreams["quota"]) == ("::1", 7002)
    assert endpoint(upstreams["telemetry"]) == ("10.0.0.3", 7003)
    assert all(c["type"] == "STRICT_DNS" for c in upstreams.values())
    transcoder = http_filter(config, "envoy.filters.http.grpc_json_transcoder")
    assert transcoder["proto_descriptor"] == "/etc/genmesh/genmesh.pb"
    assert hcm(config)["xff_num_trusted_hops"] == 2
    assert http_filter(config, "envoy.filters.http.buffer")["max_request_bytes"] == 1048576
    provider = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["supabase"]
    assert provider["issuer"] == "https://example.supabase.co/auth/v1"
    assert provider["audiences"] == ["authenticated", "other"]
    # The secret's UTF-8 bytes, base64url without padding.
    key = jwks_key(config)
    assert "=" not in key
    assert base64.urlsafe_b64decode(key + "=" * (-len(key) % 4)) == SECRET.encode()
    assert HSTS_VALUE in render(settings)
    overload = config["overload_manager"]["resource_monitors"][0]["typed_config"]
    assert overload["max_active_downstream_connections"] == 500
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
    provider = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["supabase"]
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
    config = load(render(GatewaySettings(SUPABASE_JWT_SECRET=SecretStr(SECRET))))
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
    # The only other route is the /api/ marker, which sends nowhere.
    others = [r for r in vhost["routes"] if "path" not in r["match"]]
    assert len(others) == 1
    assert others[0]["match"]["prefix"] == "/api/"
    assert others[0]["direct_response"] == {"status": 404}


def test_clusters_speak_http2_and_health_check_their_service(clean_env: pytest.MonkeyPatch) -> None:
    services = {
        "generation": "genmesh.generation.v1.GenerationService",
        "quota": "genmesh.quota.v1.QuotaService",
        "telemetry": "genmesh.telemetry.v1.TelemetryService",
    }
    for name, cluster in clusters(load(render(GatewaySettings()))).items():
        options = cluster["typed_extension_protocol_options"]
        http = options["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
        assert "http2_protocol_options" in http["explicit_http_config"]
        (check,) = cluster["health_checks"]
        assert check["grpc_health_check"] == {"service_name": services[name]}
        assert check["interval"] == "2s"
        thresholds = cluster["circuit_breakers"]["thresholds"][0]
        assert thresholds["max_requests"] > 0
        assert thresholds["max_pending_requests"] > 0


@pytest.mark.parametrize("variant", ["defaults", "overrides", "no-secret"])
def test_envoy_accepts_the_rendered_config(
    clean_env: pytest.MonkeyPatch, tmp_path: Path, descriptor_set: Path, variant: str
) -> None:
    clean_env.setenv("GATEWAY_DESCRIPTOR_SET", str(descriptor_set))
    if variant != "no-secret":
        clean_env.setenv("SUPABASE_JWT_SECRET", SECRET)
    if variant == "overrides":
        clean_env.setenv("GATEWAY_HSTS", "true")
        clean_env.setenv("GATEWAY_TRUSTED_PROXY_HOPS", "1")
        clean_env.setenv("GATEWAY_JWT_AUDIENCE", "authenticated")
        clean_env.setenv("GATEWAY_JWT_ISSUER", "https://example.supabase.co/auth/v1")
        clean_env.setenv("GENERATION_ADDR", "generation:50051")
        clean_env.setenv("GATEWAY_LISTEN_HOST", "0.0.0.0")
    path = tmp_path / "envoy.yaml"
    path.write_text(render(GatewaySettings()))
    result = envoy_validate(path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK" in result.stdout + result.stderr


def test_cli_writes_an_owner_only_file(tmp_path: Path, descriptor_set: Path) -> None:
    out = tmp_path / "sub" / "envoy.yaml"
    env = {k: v for k, v in os.environ.items() if k not in SETTING_ENV}
    env |= {"SUPABASE_JWT_SECRET": SECRET, "GATEWAY_PORT": "18081"}
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


# -- a real Envoy in front of an in-test gRPC service ------------------------------------------


def received(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


@dataclass
class Telemetry(telemetry_pb2_grpc.TelemetryServiceServicer):
    """Echoes the metadata it received as GetHealth's dependencies (name = header)."""

    calls: list[str] = field(default_factory=list)

    async def GetHealth(
        self, request: telemetry_pb2.GetHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> telemetry_pb2.GetHealthResponse:
        self.calls.append("GetHealth")
        metadata = received(context)
        if "x-test-delay" in metadata:
            await asyncio.sleep(float(metadata["x-test-delay"]))
        deps = [telemetry_pb2.DependencyHealth(name=k, detail=v) for k, v in metadata.items()]
        return telemetry_pb2.GetHealthResponse(status="healthy", dependencies=deps)

    async def SubmitFeedback(
        self,
        request: telemetry_pb2.SubmitFeedbackRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> telemetry_pb2.SubmitFeedbackResponse:
        self.calls.append("SubmitFeedback")
        if request.rating == 0:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field="rating", description="must be between 1 and 5"
            )
            status = status_pb2.Status(code=code_pb2.INVALID_ARGUMENT, message="invalid rating")
            status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
            grpc_status = rpc_status.to_status(status)
            await context.abort(
                grpc_status.code,
                grpc_status.details,
                trailing_metadata=grpc_status.trailing_metadata,
            )
        if request.rating == 9:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                "slow down",
                trailing_metadata=(("retry-after", "42"),),
            )
        return telemetry_pb2.SubmitFeedbackResponse(feedback_id=str(len(request.comment)))

    async def JoinWishlist(
        self,
        request: telemetry_pb2.JoinWishlistRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> telemetry_pb2.JoinWishlistResponse:
        self.calls.append("JoinWishlist")
        return telemetry_pb2.JoinWishlistResponse(created=True)

    async def TrackEvents(
        self, request: telemetry_pb2.TrackEventsRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> telemetry_pb2.TrackEventsResponse:
        self.calls.append("TrackEvents")
        return telemetry_pb2.TrackEventsResponse(accepted=len(request.events))

    async def RecordSecurityEvent(
        self,
        request: telemetry_pb2.RecordSecurityEventRequest,
        context: grpc.aio.ServicerContext[Any, Any],
    ) -> telemetry_pb2.RecordSecurityEventResponse:
        self.calls.append("RecordSecurityEvent")
        return telemetry_pb2.RecordSecurityEventResponse(event_id="reached")


class Generation(generation_pb2_grpc.GenerationServiceServicer):
    async def Generate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> generation_pb2.GenerateResponse:
        return generation_pb2.GenerateResponse(text=request.text.upper())

    async def StreamGenerate(
        self, request: generation_pb2.GenerateRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[generation_pb2.StreamGenerateResponse]:
        for piece in ("Hel", "lo"):
            yield generation_pb2.StreamGenerateResponse(delta=generation_pb2.TextDelta(text=piece))
        yield generation_pb2.StreamGenerateResponse(
            done=generation_pb2.GenerateResponse(text="Hello")
        )


@dataclass
class Upstream:
    port: int
    telemetry: Telemetry


@pytest.fixture(scope="session")
async def upstream() -> AsyncIterator[Upstream]:
    """TelemetryService and GenerationService with grpc.health.v1, in the test event loop (so
    every test talks to Envoy asynchronously: a blocking call would starve this server)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 0),
            ("grpc.max_receive_message_length", 8 * 1024 * 1024),
        ]
    )
    telemetry = Telemetry()
    telemetry_pb2_grpc.add_TelemetryServiceServicer_to_server(telemetry, server)
    generation_pb2_grpc.add_GenerationServiceServicer_to_server(Generation(), server)
    health = HealthServicer()
    for name in (
        "genmesh.telemetry.v1.TelemetryService",
        "genmesh.generation.v1.GenerationService",
    ):
        await health.set(name, health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    yield Upstream(port=port, telemetry=telemetry)
    await server.stop(grace=None)


@dataclass
class Gateway:
    url: str
    port: int
    admin: str
    log: Path


async def start_gateway(
    directory: Path, upstream_port: int, secret: str, max_request_bytes: int
) -> tuple[Gateway, subprocess.Popen[bytes]]:
    port, admin_port = free_port(), free_port()
    settings = GatewaySettings(
        GATEWAY_PORT=port,
        GATEWAY_ADMIN_PORT=admin_port,
        GENERATION_ADDR=f"127.0.0.1:{upstream_port}",
        TELEMETRY_ADDR=f"127.0.0.1:{upstream_port}",
        # Nothing listens here: quota is the "service down" case.
        QUOTA_ADDR=f"127.0.0.1:{free_port()}",
        GATEWAY_DESCRIPTOR_SET=DEFAULT_DESCRIPTOR_SET,
        SUPABASE_JWT_SECRET=SecretStr(secret),
        GATEWAY_MAX_REQUEST_BYTES=max_request_bytes,
        GATEWAY_LOG_LEVEL="warning",
    )
    config = directory / "envoy.yaml"
    config.write_text(render(settings))
    log = directory / "envoy.log"
    with log.open("wb") as sink:
        # Its own session: the teardown signals exactly this process group.
        process = subprocess.Popen(
            # Flush access logs quickly so a test can read them.
            [*envoy_command(settings, config), "--file-flush-interval-msec", "100"],
            stdout=sink,
            stderr=sink,
            start_new_session=True,
        )
    gateway = Gateway(
        url=f"http://127.0.0.1:{port}", port=port, admin=f"http://127.0.0.1:{admin_port}", log=log
    )
    try:
        await wait_until_routable(gateway, process)
    except BaseException:
        stop(process)
        raise
    return gateway, process


async def wait_until_routable(gateway: Gateway, process: subprocess.Popen[bytes]) -> None:
    """Ready, and the clusters with a live upstream have passed a health check."""
    deadline = time.monotonic() + 30
    async with httpx.AsyncClient(timeout=2) as admin:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"envoy exited:\n{gateway.log.read_text()[-4000:]}")
            try:
                ready = await admin.get(f"{gateway.admin}/ready")
                clusters = (await admin.get(f"{gateway.admin}/clusters")).text
            except httpx.TransportError:
                await asyncio.sleep(0.1)
                continue
            healthy = [
                line
                for line in clusters.splitlines()
                if line.startswith(("telemetry::", "generation::"))
                and line.endswith("::health_flags::healthy")
            ]
            if ready.text.strip() == "LIVE" and len(healthy) == 2:
                return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"envoy not ready in 30s:\n{gateway.log.read_text()[-4000:]}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


MAX_BYTES = 3 * 1024 * 1024


@pytest.fixture(scope="session")
async def gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy"), upstream.port, SECRET, MAX_BYTES
    )
    yield running
    stop(process)


@pytest.fixture(scope="session")
async def secretless_gateway(
    upstream: Upstream, tmp_path_factory: pytest.TempPathFactory, descriptor_set: Path
) -> AsyncIterator[Gateway]:
    running, process = await start_gateway(
        tmp_path_factory.mktemp("envoy-no-secret"), upstream.port, "", MAX_BYTES
    )
    yield running
    stop(process)


@pytest.fixture
async def client(gateway: Gateway) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=gateway.url, timeout=20) as http:
        yield http


def echoed(response: httpx.Response) -> dict[str, str]:
    """The metadata the service received, from the echoing GetHealth."""
    assert response.status_code == 200, response.text
    return {d["name"]: d["detail"] for d in response.json()["dependencies"]}


def assert_json_error(response: httpx.Response, status: int, code: int, reason: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code
    assert isinstance(body["message"], str)
    infos = [d for d in body["details"] if d["@type"].endswith("google.rpc.ErrorInfo")]
    assert infos == [
        {
            "@type": "type.googleapis.com/google.rpc.ErrorInfo",
            "reason": reason,
            "domain": "gateway.genmesh",
        }
    ]


async def test_health_reaches_the_service_with_request_id_and_trace_context(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    r = await client.get(
        "/api/health",
        headers={
            "traceparent": traceparent,
            "tracestate": "vendor=value",
            "x-admin-token": "s3cret",
            "x-request-id": "client-chosen",
        },
    )
    seen = echoed(r)
    assert r.json()["status"] == "healthy"
    assert seen["traceparent"] == traceparent
    assert seen["tracestate"] == "vendor=value"
    assert seen["x-admin-token"] == "s3cret"
    # Envoy mints the request id, hands it to the service and returns it to the client.
    assert seen["x-request-id"] != "client-chosen"
    assert r.headers["x-request-id"] == seen["x-request-id"]
    assert seen["x-envoy-original-path"] == "/api/health"
    # A guest: no identity headers.
    assert "x-genmesh-user-id" not in seen
    assert "authorization" not in seen


async def test_client_ip_is_the_peer_whatever_the_client_claims(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/health",
        headers={"x-genmesh-client-ip": "6.6.6.6", "X-Forwarded-For": "6.6.6.6"},
    )
    assert echoed(r)["x-genmesh-client-ip"] == "127.0.0.1"


async def test_client_sent_identity_headers_are_dropped(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/health",
        headers={
            "x-genmesh-user-id": "someone-else",
            "x-genmesh-user-email": "victim@example.com",
            # Underscore spellings could be folded into the real names by another hop.
            "x_genmesh_user_id": "someone-else",
        },
    )
    seen = echoed(r)
    assert "x-genmesh-user-id" not in seen
    assert "x-genmesh-user-email" not in seen
    assert "x_genmesh_user_id" not in seen


async def test_a_valid_jwt_names_the_user(client: httpx.AsyncClient) -> None:
    bearer = token({"sub": "user-123", "email": "ada@example.com", "aud": "authenticated"})
    r = await client.get(
        "/api/health",
        headers={
            "authorization": f"Bearer {bearer}",
            "x-genmesh-user-id": "someone-else",
            "x-genmesh-user-email": "victim@example.com",
        },
    )
    seen = echoed(r)
    assert seen["x-genmesh-user-id"] == "user-123"
    assert seen["x-genmesh-user-email"] == "ada@example.com"
    # The services get the claims, not the token.
    assert "authorization" not in seen


async def test_a_token_without_email_leaves_no_email_header(client: httpx.AsyncClient) -> None:
    r = await client.get(
        "/api/health",
        headers={
            "authorization": f"Bearer {token({'sub': 'user-9'})}",
            "x-genmesh-user-email": "victim@example.com",
        },
    )
    seen = echoed(r)
    assert seen["x-genmesh-user-id"] == "user-9"
    assert "x-genmesh-user-email" not in seen


@pytest.mark.parametrize(
    "bearer",
    [
        pytest.param(
            token({"sub": "u"}, secret="another-secret-0123456789-abcdefghijkl"), id="key"
        ),
        pytest.param(token({"sub": "u", "exp": int(time.time()) - 3600}), id="expired"),
        pytest.param(jwt.encode({"sub": "u"}, SECRET, algorithm="HS256"), id="no-expiry"),
        pytest.param(
            f"{b64url({'alg': 'none', 'typ': 'JWT'})}.{b64url({'sub': 'u'})}.", id="alg-none"
        ),
        pytest.param("garbage", id="garbage"),
    ],
)
async def test_bad_tokens_are_401_json(
    client: httpx.AsyncClient, upstream: Upstream, bearer: str
) -> None:
    before = len(upstream.telemetry.calls)
    r = await client.get("/api/health", headers={"authorization": f"Bearer {bearer}"})
    assert_json_error(r, 401, 16, "UNAUTHENTICATED")
    assert len(upstream.telemetry.calls) == before


async def test_without_a_secret_tokens_are_refused_and_guests_pass(
    secretless_gateway: Gateway,
) -> None:
    async with httpx.AsyncClient(base_url=secretless_gateway.url, timeout=20) as http:
        for secret in ("", SECRET):
            bearer = hs256({"sub": "u", "exp": int(time.time()) + 60}, secret)
            r = await http.get("/api/health", headers={"authorization": f"Bearer {bearer}"})
            assert_json_error(r, 401, 16, "UNAUTHENTICATED")
        assert "x-genmesh-user-id" not in echoed(await http.get("/api/health"))


async def test_unknown_paths_are_404_json_with_security_headers(client: httpx.AsyncClient) -> None:
    for r in (
        await client.get("/api/nope"),
        await client.post("/api/nope", json={}),
        await client.get("/"),
        await client.delete("/api/health"),
    ):
        assert_json_error(r, 404, 5, "NOT_FOUND")
        for name, value in SECURITY_HEADERS.items():
            assert r.headers[name] == value
        assert "strict-transport-security" not in r.headers


async def test_security_headers_and_no_grpc_plumbing_on_success(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health")
    assert r.status_code == 200
    assert r.headers["content-type"] == "application/json"
    for name, value in SECURITY_HEADERS.items():
        assert r.headers[name] == value
    for name in (*GRPC_PLUMBING, "x-envoy-upstream-service-time"):
        assert name not in r.headers
    assert r.headers["server"] == "genmesh"


async def test_unknown_query_parameters_are_400_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health", params={"access_token": "x"})
    assert_json_error(r, 400, 3, "INVALID_ARGUMENT")


async def test_malformed_json_is_400_json(client: httpx.AsyncClient) -> None:
    r = await client.post(
        "/api/feedback", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert_json_error(r, 400, 3, "INVALID_ARGUMENT")


async def test_field_violations_come_through_as_400(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/feedback", json={"rating": 0})
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["code"] == code_pb2.INVALID_ARGUMENT
    assert body["message"] == "invalid rating"
    (bad,) = [d for d in body["details"] if d["@type"].endswith("google.rpc.BadRequest")]
    assert [v["field"] for v in bad["field_violations"]] == ["rating"]
    for name in GRPC_PLUMBING:
        assert name not in r.headers
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_retry_after_from_the_service_reaches_the_client(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/feedback", json={"rating": 9})
    assert r.status_code == 429
    assert r.headers["retry-after"] == "42"
    assert r.json()["code"] == code_pb2.RESOURCE_EXHAUSTED


async def test_body_limit(client: httpx.AsyncClient) -> None:
    # Over Envoy's default 1 MiB buffer but under the limit: accepted whole.
    comment = "a" * (2 * 1024 * 1024)
    r = await client.post("/api/feedback", json={"rating": 5, "comment": comment})
    assert r.status_code == 200, r.text
    assert r.json() == {"feedback_id": str(len(comment))}
    r = await client.post("/api/feedback", json={"rating": 5, "comment": "a" * (MAX_BYTES + 1)})
    assert_json_error(r, 413, 3, "REQUEST_TOO_LARGE")
    assert str(MAX_BYTES) in r.json()["message"]
    assert r.headers["x-frame-options"] == "DENY"


async def test_internal_rpcs_are_not_reachable_as_rest(
    client: httpx.AsyncClient, upstream: Upstream
) -> None:
    for path in (
        "/genmesh.telemetry.v1.TelemetryService/RecordSecurityEvent",
        "/genmesh.quota.v1.QuotaService/ReserveQuota",
        "/genmesh.telemetry.v1.TelemetryService/GetHealth",
    ):
        r = await client.post(path, json={"event_type": "x", "severity": "SEVERITY_HIGH"})
        assert_json_error(r, 404, 5, "NOT_FOUND")
    assert "RecordSecurityEvent" not in upstream.telemetry.calls


async def test_raw_grpc_is_refused(gateway: Gateway, upstream: Upstream) -> None:
    """The gateway speaks REST only: gRPC over HTTP/2 to any gRPC path, internal or public, is
    refused before it reaches a service."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{gateway.port}") as channel:
        stub = telemetry_pb2_grpc.TelemetryServiceStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as internal:
            await stub.RecordSecurityEvent(
                telemetry_pb2.RecordSecurityEventRequest(
                    event_type="forged", severity=telemetry_pb2.SEVERITY_CRITICAL
                ),
                timeout=10,
            )
        with pytest.raises(grpc.aio.AioRpcError) as public:
            await stub.GetHealth(
                telemetry_pb2.GetHealthRequest(),
                metadata=(("x-envoy-original-path", "/api/health"),),
                timeout=10,
            )
    for caught in (internal, public):
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        assert json.loads(caught.value.details() or "")["code"] == 5
    assert "RecordSecurityEvent" not in upstream.telemetry.calls


async def test_stream_generate_is_server_sent_events(client: httpx.AsyncClient) -> None:
    async with client.stream("POST", "/api/generate:stream", json={"text": "hi"}) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        body = (await r.aread()).decode()
    events = [
        json.loads(line.removeprefix("data:").strip())
        for line in body.splitlines()
        if line.startswith("data:")
    ]
    assert [e.get("delta", {}).get("text") for e in events[:2]] == ["Hel", "lo"]
    assert events[2]["done"]["text"] == "Hello"
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_unary_generate(client: httpx.AsyncClient) -> None:
    r = await client.post("/api/generate", json={"text": "hi", "lang": "en"})
    assert r.status_code == 200
    body = r.json()
    assert body["text"] == "HI"
    # Primitive fields are printed even at their defaults, with proto field names.
    assert body["cached"] is False
    assert body["generation_id"] == ""


async def test_a_service_that_is_down_is_503_json(client: httpx.AsyncClient) -> None:
    r = await client.get("/api/quota")
    assert_json_error(r, 503, 14, "UPSTREAM_UNAVAILABLE")
    assert r.headers["x-content-type-options"] == "nosniff"


async def test_the_route_timeout_is_504_json(client: httpx.AsyncClient) -> None:
    # GetHealth's route allows 5 s.
    started = time.monotonic()
    r = await client.get("/api/health", headers={"x-test-delay": "8"})
    assert_json_error(r, 504, 4, "UPSTREAM_TIMEOUT")
    assert 4.5 < time.monotonic() - started < 7.5


async def test_access_log_is_json_lines(gateway: Gateway, client: httpx.AsyncClient) -> None:
    r = await client.get("/api/health")
    request_id = r.headers["x-request-id"]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        for line in gateway.log.read_text().splitlines():
            if request_id in line and line.startswith("{"):
                entry = json.loads(line)
                assert entry["logger"] == "gateway.access"
                assert entry["path"] == "/api/health"
                assert entry["rpc"] == "/genmesh.telemetry.v1.TelemetryService/GetHealth"
                assert entry["status"] == 200
                assert entry["client_ip"] == "127.0.0.1"
                return
        # Envoy flushes access logs every few seconds.
        await asyncio.sleep(0.2)
    raise AssertionError("no access log line for the request")
