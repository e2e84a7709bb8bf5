"""The gateway tests' shared parts: the expected REST surface, helpers that read a rendered
config, tokens, and a real Envoy in front of small in-test gRPC services."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import jwt
import yaml
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from pydantic import SecretStr

from devstack.infra import free_port
from genmesh.generation.v1 import generation_pb2, generation_pb2_grpc
from genmesh.telemetry.v1 import telemetry_pb2, telemetry_pb2_grpc
from services.gateway.render import (
    DEFAULT_DESCRIPTOR_SET,
    GatewaySettings,
    envoy_binary,
    envoy_command,
    render,
)
from services.quota.ratelimit.rls import SERVICE_NAME as RLS_SERVICE
from services.quota.ratelimit.rls import RlsMessages
from tests import raw_http

REPO = Path(__file__).resolve().parents[2]
SECRET = "test-jwt-secret-0123456789-abcdefghijklmnop"
SUPABASE_URL = "https://project.supabase.test"
ISSUER = f"{SUPABASE_URL}/auth/v1"
SETTING_ENV = [str(f.alias) for f in GatewaySettings.model_fields.values()]
TRANSCODED = [
    "genmesh.generation.v1.GenerationService",
    "genmesh.generation.v1.GenerationAdminService",
    "genmesh.quota.v1.QuotaService",
    "genmesh.quota.v1.QuotaAdminService",
    "genmesh.telemetry.v1.TelemetryService",
    "genmesh.telemetry.v1.TelemetryAdminService",
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
    "/genmesh.quota.v1.QuotaAdminService/ListBlocks": ("quota", "30s"),
    "/genmesh.quota.v1.QuotaAdminService/LiftBlock": ("quota", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/SubmitFeedback": ("telemetry", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/JoinWishlist": ("telemetry", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/TrackEvents": ("telemetry", "30s"),
    "/genmesh.telemetry.v1.TelemetryService/GetHealth": ("telemetry", "5s"),
    "/genmesh.telemetry.v1.TelemetryAdminService/GetHealthReport": ("telemetry", "5s"),
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


def ops_listener(config: dict[str, Any]) -> dict[str, Any]:
    (ops,) = [x for x in config["static_resources"]["listeners"] if x["name"] == "ops"]
    listener: dict[str, Any] = ops
    return listener


def cors(config: dict[str, Any]) -> dict[str, Any]:
    """The CORS policy on the API's virtual host."""
    vhost = hcm(config)["route_config"]["virtual_hosts"][0]
    policy: dict[str, Any] = vhost["typed_per_filter_config"]["envoy.filters.http.cors"]
    return policy


def generate_transcoder(config: dict[str, Any]) -> dict[str, Any]:
    """The transcoder's per-route config on the generate marker routes (its body limit): the
    same on both (a declared length that fits the limit, and any other)."""
    vhost = hcm(config)["route_config"]["virtual_hosts"][0]
    markers = [
        r for r in vhost["routes"] if r["match"].get("prefix") == "/api/generate" and "route" in r
    ]
    assert len(markers) == 2
    name = "envoy.filters.http.grpc_json_transcoder"
    fits, other = (r["typed_per_filter_config"][name] for r in markers)
    assert fits == other
    typed: dict[str, Any] = fits
    return typed


def clusters(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {c["name"]: c for c in config["static_resources"]["clusters"]}


def endpoint(cluster: dict[str, Any]) -> tuple[str, int]:
    lb = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]
    sock = lb["endpoint"]["address"]["socket_address"]
    return sock["address"], sock["port_value"]


def jwks_key(config: dict[str, Any]) -> str:
    provider = http_filter(config, "envoy.filters.http.jwt_authn")["providers"]["supabase_hs256"]
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


def token(claims: dict[str, Any], secret: str = SECRET) -> str:
    """An HS256 user token as Supabase mints it (issuer, audience, a 10 minute life)."""
    now = int(time.time())
    payload = {"iss": ISSUER, "aud": "authenticated", "iat": now, "exp": now + 600, **claims}
    return jwt.encode(payload, secret, algorithm="HS256")


def b64url(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def hs256(claims: dict[str, Any], secret: str) -> str:
    """An HS256 token by hand: PyJWT refuses an empty key, which is one case worth trying."""
    signing_input = f"{b64url({'alg': 'HS256', 'typ': 'JWT'})}.{b64url(claims)}"
    mac = hmac.new(secret.encode(), signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


# -- a real Envoy in front of in-test gRPC services -----------------------------------------


def received(context: grpc.aio.ServicerContext[Any, Any]) -> dict[str, str]:
    return {k: v for k, v in context.invocation_metadata() or () if isinstance(v, str)}


@dataclass
class Telemetry(telemetry_pb2_grpc.TelemetryServiceServicer):
    """Echoes the metadata it received, as JSON in GetHealth's `status` (the one free-text
    field the public health answer has)."""

    calls: list[str] = field(default_factory=list)

    async def GetHealth(
        self, request: telemetry_pb2.GetHealthRequest, context: grpc.aio.ServicerContext[Any, Any]
    ) -> telemetry_pb2.GetHealthResponse:
        self.calls.append("GetHealth")
        metadata = received(context)
        if "x-test-delay" in metadata:
            await asyncio.sleep(float(metadata["x-test-delay"]))
        return telemetry_pb2.GetHealthResponse(status=json.dumps(metadata))

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
class FakeRateLimitService:
    """Envoy's rate limit service, scripted: every request under /api/wishlist is over the
    limit, everything else passes with 7 of 10 left. Records the descriptors Envoy sends."""

    REFUSAL = b'{"code":8,"message":"scripted refusal","details":[]}'

    def __init__(self) -> None:
        self.messages = RlsMessages()
        self.calls: list[list[dict[str, str]]] = []

    async def should_rate_limit(
        self, request: Any, context: grpc.aio.ServicerContext[Any, Any]
    ) -> Any:
        descriptors = [{e.key: e.value for e in d.entries} for d in request.descriptors]
        self.calls.append(descriptors)
        over = any(d.get("path", "").startswith("/api/wishlist") for d in descriptors)
        response: Any = self.messages.response()
        response.overall_code = 2 if over else 1
        for _ in descriptors:
            status = response.statuses.add()
            status.code = response.overall_code
            status.current_limit.name = "test.per_ip"
            status.current_limit.requests_per_unit = 10
            status.current_limit.unit = 2  # MINUTE
            status.limit_remaining = 0 if over else 7
            status.duration_until_reset.seconds = 17 if over else 30
        if over:
            header = response.response_headers_to_add.add()
            header.key, header.value = "retry-after", "17"
            response.raw_body = self.REFUSAL
        return response

    def add_to(self, server: grpc.aio.Server) -> None:
        handler = grpc.unary_unary_rpc_method_handler(
            self.should_rate_limit,
            request_deserializer=self.messages.request.FromString,
            response_serializer=self.messages.response.SerializeToString,
        )
        server.add_generic_rpc_handlers(
            [grpc.method_handlers_generic_handler(RLS_SERVICE, {"ShouldRateLimit": handler})]
        )


@dataclass
class Upstream:
    port: int
    telemetry: Telemetry
    ratelimit: FakeRateLimitService


@dataclass
class Gateway:
    url: str
    port: int
    admin: str
    log: Path


async def start_gateway(
    directory: Path,
    upstream_port: int,
    secret: str,
    max_request_bytes: int,
    quota_port: int | None = None,
    edit: Callable[[dict[str, Any]], None] | None = None,
    **overrides: Any,
) -> tuple[Gateway, subprocess.Popen[bytes]]:
    """An Envoy in front of the in-test upstream. Without `quota_port` nothing listens where
    quota should: the "service down" case (rate limits then fail open). `edit` changes the
    rendered config before Envoy reads it (for what no setting allows, such as a tiny heap)."""
    port, admin_port = free_port(), free_port()
    settings = GatewaySettings(
        GATEWAY_PORT=port,
        GATEWAY_ADMIN_PORT=admin_port,
        GATEWAY_OPS_PORT=free_port(),
        GENERATION_ADDR=f"127.0.0.1:{upstream_port}",
        TELEMETRY_ADDR=f"127.0.0.1:{upstream_port}",
        QUOTA_ADDR=f"127.0.0.1:{quota_port or free_port()}",
        GATEWAY_DESCRIPTOR_SET=DEFAULT_DESCRIPTOR_SET,
        SUPABASE_JWT_SECRET=SecretStr(secret),
        SUPABASE_URL=SUPABASE_URL,
        GATEWAY_MAX_REQUEST_BYTES=max_request_bytes,
        **{"GATEWAY_LOG_LEVEL": "warning", **overrides},
    )
    config = directory / "envoy.yaml"
    rendered = render(settings)
    if edit is not None:
        loaded = load(rendered)
        edit(loaded)
        rendered = json.dumps(loaded)
    config.write_text(rendered)
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
        live = ("telemetry", "generation", *(["quota"] if quota_port else []))
        await wait_until_routable(gateway, process, live)
    except BaseException:
        stop(process)
        raise
    return gateway, process


async def wait_until_routable(
    gateway: Gateway, process: subprocess.Popen[bytes], live: tuple[str, ...]
) -> None:
    """Ready, and the `live` clusters (those with an upstream) have passed a health check."""
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
                if line.startswith(tuple(f"{name}::" for name in live))
                and line.endswith("::health_flags::healthy")
            ]
            if ready.text.strip() == "LIVE" and len(healthy) == len(live):
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
# The default limit of every route but generate (GATEWAY_MAX_BODY_BYTES).
BODY_BYTES = 64 * 1024


def echoed(response: httpx.Response) -> dict[str, str]:
    """The metadata the service received, from the echoing GetHealth."""
    assert response.status_code == 200, response.text
    echo: dict[str, str] = json.loads(response.json()["status"])
    return echo


async def post_chunked(port: int, path: str, body: bytes, chunk: int) -> tuple[int, bytes]:
    """POST `body` with chunked transfer encoding, reading the answer while sending, as
    browsers and curl do (httpx reads only once it has sent everything, and can miss an
    answer that comes early). Returns the status and the raw response head."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        writer.write(
            f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            "transfer-encoding: chunked\r\n\r\n".encode()
        )
        for start in range(0, len(body), chunk):
            piece = body[start : start + chunk]
            writer.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            await writer.drain()
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    sending = asyncio.create_task(send())
    try:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await sending
        writer.close()
    return int(head.split(b" ", 2)[1]), head


async def post_in_two_parts(
    port: int, path: str, body: bytes, first: int, *, chunked: bool = False
) -> tuple[int, bytes]:
    """POST `body` in two parts half a second apart (tests/raw_http.py), so that part of it is
    in Envoy when the rate limit filter gets its answer (the in-test service answers in
    milliseconds). Returns the status and the raw response head."""
    status, head, _ = await raw_http.post_in_two_parts(
        "127.0.0.1", port, path, body, first, chunked=chunked
    )
    return status, head


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
